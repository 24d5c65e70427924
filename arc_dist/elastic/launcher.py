"""``python -m arc_dist.launch``: torchrun with elastic settings and exit codes a scheduler can use.

:func:`main` builds a ``torchrun`` command from flags or ``ARC_*`` environment variables
(``PET_*``, as set by Kubeflow's PyTorchJob, are read as a fallback), always sets
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (without it, restarted groups often fail to connect or
hang), prints the command, runs it, and maps the outcome to an
:class:`~arc_dist.errors.ExitCode`. torchrun exits 1 whatever went wrong, so the launcher reads
the workers' error records (written by :func:`arc_dist.elastic.worker.main_entry` into the
folder the launcher gives them in ``$ARC_ERROR_DIR``; format and contract in
:mod:`arc_dist.elastic.exitcodes`) while torchrun runs and after it ends: a "do not
retry" cause (``UnrecoverableError``, ``CheckpointError``, a bad node) stops torchrun at once
instead of letting it burn its restarts, a device error that repeats on this host becomes
BAD_NODE, a forwarded SIGTERM (preemption) becomes RETRY.

Exit codes and the timeout hierarchy are documented in docs/elastic.md. The launcher process
imports no torch.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ExitCode
from .exitcodes import (
    ERROR_DIR_ENV,
    STOP_CODES,
    Outcome,
    WorkerFailure,
    decide,
    hardware_streak,
    no_progress_streak,
    read_error_file,
    scan_error_dir,
)

_F = TypeVar("_F", bound=Callable[..., Any])

#: environment every torchrun we start gets (see the module docstring)
FIXED_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

_PREFIX = "[arc-launch]"


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


@dataclass
class LaunchSpec:
    """Everything the launcher needs, after flags and environment are merged."""

    script: str
    script_args: list[str]
    nnodes: str = "1"
    nproc_per_node: str = "1"
    max_restarts: int = 3
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    rdzv_id: str = ""
    rdzv_conf: str = ""
    monitor_interval: float = 0.1
    log_dir: str = ""
    module: bool = False
    bad_node_after: int = 2
    no_progress_after: int = 3
    preflight: bool = False
    shutdown_timeout: float = 30.0
    torchrun_args: list[str] = field(default_factory=list)

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])


def _env_default(name: str, default: Any) -> Any:
    for prefix in ("ARC_", "PET_"):
        v = os.environ.get(prefix + name)
        if v not in (None, ""):
            return v
    return default


class _Parser(argparse.ArgumentParser):
    """Usage errors exit UNRECOVERABLE: a misconfigured job fails the same way when retried."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(int(ExitCode.UNRECOVERABLE))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m arc_dist.launch",
        description=(
            "Start torchrun with elastic settings and exit with a code a scheduler can act "
            "on: 0 done, 10 retry, 11 do not retry, 12 device error, 13 bad node. Every flag "
            "also reads ARC_<NAME> (then PET_<NAME>) from the environment as its default."
        ),
    )
    a = p.add_argument
    a(
        "--nnodes",
        default=_env_default("NNODES", "1"),
        help="nodes, or MIN:MAX for an elastic job (ARC_NNODES; default 1)",
    )
    a(
        "--nproc-per-node",
        "--nproc_per_node",
        default=_env_default("NPROC_PER_NODE", "1"),
        help="workers per node: an int, or auto/gpu/cpu (ARC_NPROC_PER_NODE; default 1)",
    )
    a(
        "--max-restarts",
        "--max_restarts",
        type=int,
        default=int(_env_default("MAX_RESTARTS", 3)),
        help="group restarts before giving up (ARC_MAX_RESTARTS; default 3)",
    )
    a(
        "--rdzv-backend",
        "--rdzv_backend",
        default=_env_default("RDZV_BACKEND", "c10d"),
        help="rendezvous backend (ARC_RDZV_BACKEND; default c10d)",
    )
    a(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        default=_env_default("RDZV_ENDPOINT", ""),
        help="HOST:PORT of the rendezvous store, the same on every node; required with more "
        "than one node (ARC_RDZV_ENDPOINT; default localhost:0 = a free port, single node)",
    )
    a(
        "--rdzv-id",
        "--rdzv_id",
        default=_env_default("RDZV_ID", ""),
        help="job id shared by every node; required with more than one node (ARC_RDZV_ID; "
        "default a random id on a single node)",
    )
    a(
        "--rdzv-conf",
        "--rdzv_conf",
        default=_env_default("RDZV_CONF", ""),
        help="extra rendezvous settings, e.g. join_timeout=900,last_call_timeout=30 "
        "(ARC_RDZV_CONF)",
    )
    a(
        "--monitor-interval",
        "--monitor_interval",
        type=float,
        default=float(_env_default("MONITOR_INTERVAL", 0.1)),
        help="seconds between the agent's checks of its workers (ARC_MONITOR_INTERVAL; "
        "default 0.1, as torchrun)",
    )
    a(
        "--log-dir",
        "--log_dir",
        default=_env_default("LOG_DIR", ""),
        help="torchrun's log folder; workers' error records land in its arc-errors/ (ARC_LOG_DIR; "
        "default a new temporary folder under $TMPDIR)",
    )
    a(
        "--bad-node-after",
        "--bad-host-after",
        type=int,
        default=int(_env_default("BAD_NODE_AFTER", 2)),
        help="attempts in a row ending in a device error on this host before exiting "
        "BAD_NODE (13); 0 disables (ARC_BAD_NODE_AFTER; default 2)",
    )
    a(
        "--no-progress-after",
        type=int,
        default=int(_env_default("NO_PROGRESS_AFTER", 3)),
        help="attempts in a row that fail with the same error before passing the step they "
        "resumed from (a bug in the script or its data, not a crash that moves on) before "
        "exiting UNRECOVERABLE (11) instead of restarting again; peer, network, storage and "
        "timeout errors never count; 0 disables (ARC_NO_PROGRESS_AFTER; default 3)",
    )
    a(
        "--preflight",
        action="store_true",
        default=_env_default("PREFLIGHT", "") not in ("", "0", "false", "no"),
        help="run python -m arc_dist.health (this node's GPUs and a local all-reduce) before "
        "torchrun; exit 13 (BAD_NODE) without starting training when it fails (ARC_PREFLIGHT=1)",
    )
    a(
        "--shutdown-timeout",
        type=float,
        default=float(_env_default("SHUTDOWN_TIMEOUT", 30)),
        help="seconds to wait for torchrun after asking it to stop, before SIGKILL "
        "(ARC_SHUTDOWN_TIMEOUT; default 30)",
    )
    a(
        "--torchrun-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra torchrun argument, passed verbatim; repeat for several "
        "(e.g. --torchrun-arg=--tee=3)",
    )
    a(
        "-m",
        "--module",
        action="store_true",
        help="SCRIPT is a module name, run as python -m SCRIPT",
    )
    a("--dry-run", action="store_true", help="print the torchrun command and exit 0")
    a("script", help="training script (or module with -m)")
    a("script_args", nargs=argparse.REMAINDER, help="arguments for the training script")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[LaunchSpec, bool]:
    """Flags (and ARC_*/PET_* environment defaults) -> a validated :class:`LaunchSpec`.

    Returns the spec and the ``--dry-run`` flag. Bad values exit with UNRECOVERABLE (11)
    and a message that names the flag and the fix.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        spec = LaunchSpec(
            script=ns.script,
            script_args=list(ns.script_args),
            nnodes=str(ns.nnodes),
            nproc_per_node=str(ns.nproc_per_node),
            max_restarts=ns.max_restarts,
            rdzv_backend=ns.rdzv_backend,
            rdzv_endpoint=ns.rdzv_endpoint,
            rdzv_id=ns.rdzv_id,
            rdzv_conf=ns.rdzv_conf,
            monitor_interval=ns.monitor_interval,
            log_dir=ns.log_dir,
            module=ns.module,
            bad_node_after=ns.bad_node_after,
            no_progress_after=ns.no_progress_after,
            preflight=ns.preflight,
            shutdown_timeout=ns.shutdown_timeout,
            torchrun_args=list(ns.torchrun_arg),
        )
        validate(spec)
    except ValueError as e:
        parser.error(str(e))
    return spec, ns.dry_run


def validate(spec: LaunchSpec) -> None:
    """Raise ``ValueError`` naming the flag, the value and the fix; fill single-node defaults."""
    parts = spec.nnodes.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1]))
        ok = len(parts) <= 2 and 1 <= lo <= hi
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"--nnodes={spec.nnodes!r} is invalid: use N or MIN:MAX with 1 <= MIN <= MAX"
        )
    if not (spec.nproc_per_node.isdigit() and int(spec.nproc_per_node) >= 1) and (
        spec.nproc_per_node not in ("auto", "gpu", "cpu", "xpu")
    ):
        raise ValueError(
            f"--nproc-per-node={spec.nproc_per_node!r} is invalid: use an integer >= 1, or "
            "auto/gpu/cpu"
        )
    if spec.max_restarts < 0:
        raise ValueError(f"--max-restarts={spec.max_restarts} is invalid: use an integer >= 0")
    if not spec.monitor_interval > 0:
        raise ValueError(f"--monitor-interval={spec.monitor_interval} is invalid: use seconds > 0")
    if spec.bad_node_after < 0:
        raise ValueError(f"--bad-node-after={spec.bad_node_after} is invalid: use >= 0")
    if spec.no_progress_after < 0:
        raise ValueError(f"--no-progress-after={spec.no_progress_after} is invalid: use >= 0")
    if not spec.shutdown_timeout > 0:
        raise ValueError(f"--shutdown-timeout={spec.shutdown_timeout} is invalid: use seconds > 0")
    if spec.max_nodes > 1:
        if not spec.rdzv_endpoint:
            raise ValueError(
                f"--nnodes={spec.nnodes} needs --rdzv-endpoint HOST:PORT (or ARC_RDZV_ENDPOINT), "
                "the same on every node, e.g. the first node's address and a free port"
            )
        if not spec.rdzv_id:
            raise ValueError(
                f"--nnodes={spec.nnodes} needs --rdzv-id (or ARC_RDZV_ID), the same on every "
                "node of this job and new for each job, e.g. the job's name"
            )
    spec.rdzv_endpoint = spec.rdzv_endpoint or "localhost:0"
    spec.rdzv_id = spec.rdzv_id or f"arc-{uuid.uuid4().hex[:8]}"
    if not spec.module and not os.path.isfile(spec.script):
        raise ValueError(
            f"training script {spec.script!r} does not exist (cwd {os.getcwd()}); pass a path, "
            "or -m for a module name"
        )


def error_dir(spec: LaunchSpec) -> str:
    """Where workers write their error records (``$ARC_ERROR_DIR``): inside the log folder, so a
    log folder shared by several nodes shares their records too."""
    return os.path.join(spec.log_dir, "arc-errors")


def build_command(spec: LaunchSpec, *, agent_error_file: str) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and the environment variables the launcher adds to it."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={spec.nnodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--max-restarts={spec.max_restarts}",
        f"--rdzv-backend={spec.rdzv_backend}",
        f"--rdzv-endpoint={spec.rdzv_endpoint}",
        f"--rdzv-id={spec.rdzv_id}",
        f"--monitor-interval={spec.monitor_interval:g}",
        f"--log-dir={spec.log_dir}",
    ]  # fmt: skip
    if spec.rdzv_conf:
        cmd.append(f"--rdzv-conf={spec.rdzv_conf}")
    cmd += spec.torchrun_args
    if spec.module:
        cmd.append("-m")
    cmd += [spec.script, *spec.script_args]
    env = dict(FIXED_ENV)
    # the agent's own record (its root-cause copy, or its own error such as a rendezvous
    # timeout); workers get their own TORCHELASTIC_ERROR_FILE from the agent
    env["TORCHELASTIC_ERROR_FILE"] = agent_error_file
    env[ERROR_DIR_ENV] = error_dir(spec)
    # torchrun gives workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after SIGTERM (a final
    # checkpoint) before SIGKILL; keep it inside our own wait so torchrun reports back in time
    if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = f"{max(1.0, spec.shutdown_timeout - 10):g}"
    return cmd, env


def format_command(cmd: Sequence[str], env: dict[str, str]) -> str:
    """The command as a shell line, environment first, ready to paste."""
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(cmd)])


def _say(msg: str) -> None:
    sys.stderr.write(f"{_PREFIX} {msg}\n")
    sys.stderr.flush()


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM if the launcher dies (Linux), so torchrun never outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, not Linux
        pass


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fp:
                ppid = int(fp.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def sigkill_all(pids) -> None:
    """SIGKILL each process and its process group (workers run in sessions of their own);
    ones already gone are skipped."""
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Launcher:
    """Runs one torchrun and decides the exit code. Use :meth:`run` from the main thread."""

    #: seconds between scans of the error folder for new records
    poll_interval = 0.2

    def __init__(self, spec: LaunchSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.signalled: str | None = None
        self._signum = signal.SIGTERM
        self._stopping_since: float | None = None
        self._preexisting: set[str] = set()
        self.agent_error_file = ""

    def _scan(self) -> tuple[int, list[WorkerFailure]]:
        """The records our workers wrote (not those of an earlier run in the same folder)."""
        return scan_error_dir(error_dir(self.spec), ignore=self._preexisting)

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signalled is None:
            self.signalled, self._signum = name, signum
            _say(
                f"received {name}: forwarding it to torchrun (pid {self.proc.pid if self.proc else '?'})"
            )
        self._stop(signum)  # nothing to stop yet before torchrun started: run() forwards it

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass
            if self._stopping_since is None:
                self._stopping_since = time.monotonic()

    def _kill_all(self) -> None:
        """torchrun did not stop in time: SIGKILL it and every worker (own process groups)."""
        assert self.proc is not None
        sigkill_all([self.proc.pid, *_descendants(self.proc.pid)])

    def run(self) -> Outcome:
        spec = self.spec
        if not spec.log_dir:
            spec.log_dir = tempfile.mkdtemp(prefix="arc-launch-")
        os.makedirs(error_dir(spec), exist_ok=True)
        self._preexisting = set(os.listdir(error_dir(spec)))
        self.agent_error_file = os.path.join(spec.log_dir, f"agent-error-{os.getpid()}.json")
        if os.path.exists(self.agent_error_file):
            os.remove(self.agent_error_file)
        if spec.preflight:
            failed = self._preflight()
            if failed is not None:
                _say(f"exit {int(failed.exit_code)} ({failed.exit_code.name}): {failed.reason}")
                return failed
        cmd, env_add = build_command(spec, agent_error_file=self.agent_error_file)
        _say(f"host {socket.gethostname()}, log dir {spec.log_dir}")
        _say(f"running: {format_command(cmd, env_add)}")
        env = {**os.environ, **env_add}

        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for s in old:
            signal.signal(s, self._on_signal)
        early: Outcome | None = None
        try:
            if self.signalled is None:  # preempted before anything started: start nothing
                # own session: a terminal's Ctrl-C reaches torchrun once, through us
                self.proc = subprocess.Popen(
                    cmd, env=env, start_new_session=True, preexec_fn=_set_pdeathsig
                )
                if self.signalled is not None:  # it came while torchrun was being started
                    _say(f"forwarding {self.signalled} to torchrun (pid {self.proc.pid})")
                    self._stop(self._signum)
            while self.proc is not None and self.proc.poll() is None:
                time.sleep(self.poll_interval)
                if early is None and self.signalled is None:
                    early = self._early_stop()
                    if early is not None:
                        _say(f"{early.reason}; stopping torchrun instead of restarting")
                        self._stop()
                if (
                    self._stopping_since is not None
                    and time.monotonic() - self._stopping_since > spec.shutdown_timeout + 5
                ):
                    _say(f"torchrun did not stop within {spec.shutdown_timeout:g} s: SIGKILL")
                    self._kill_all()
                    self._stopping_since = time.monotonic() + 3600  # once
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self._kill_all()
                self.proc.wait()
            for s, h in old.items():
                signal.signal(s, h)
        if self.proc is None:
            outcome = Outcome(
                ExitCode.RETRY, f"preempted: {self.signalled} before torchrun started"
            )
            _say(f"torchrun not started; exit {int(outcome.exit_code)} (RETRY): {outcome.reason}")
            return outcome
        rc = self.proc.returncode
        last_attempt, failures = self._scan()
        if not failures:
            failures = self._agent_failure(last_attempt)
        if early is not None:
            outcome = early
        else:
            outcome = decide(
                rc,
                failures,
                last_attempt,
                signalled=self.signalled,
                agent_message=self._agent_message(),
                bad_node_after=spec.bad_node_after,
                no_progress_after=spec.no_progress_after,
            )
        _say(
            f"torchrun exited {rc}; exit {int(outcome.exit_code)} "
            f"({outcome.exit_code.name}): {outcome.reason}"
        )
        return outcome

    def _early_stop(self) -> Outcome | None:
        """A failure that torchrun's restarts cannot fix, seen while torchrun still runs."""
        _, failures = self._scan()
        if not failures:
            return None
        # the newest attempt may still be running: count the streak from the newest failure
        last_attempt = failures[-1].attempt
        spec = self.spec
        if (
            any(f.exit_code in STOP_CODES for f in failures)
            or (0 < spec.bad_node_after <= hardware_streak(failures, last_attempt))
            or (0 < spec.no_progress_after <= no_progress_streak(failures, last_attempt))
        ):
            return decide(
                None,
                failures,
                last_attempt,
                bad_node_after=spec.bad_node_after,
                no_progress_after=spec.no_progress_after,
            )
        return None

    def _preflight(self) -> Outcome | None:
        """``python -m arc_dist.health`` on this node's local ranks; an Outcome if it failed."""
        report = os.path.join(self.spec.log_dir, f"preflight-{os.getpid()}.json")
        cmd = [sys.executable, "-m", "arc_dist.health",
               f"--nproc-per-node={self.spec.nproc_per_node}", f"--json={report}"]  # fmt: skip
        _say(f"preflight: {shlex.join(cmd)}")
        env = {**os.environ, **FIXED_ENV}
        rc = subprocess.run(cmd, env=env, preexec_fn=_set_pdeathsig).returncode
        if rc == ExitCode.OK:
            return None
        # a checker that cannot even finish (a crash in CUDA init, a hang) also means a bad node
        code = ExitCode.UNRECOVERABLE if rc == ExitCode.UNRECOVERABLE else ExitCode.BAD_NODE
        return Outcome(
            code,
            f"preflight health check failed (exit {rc}) on host {socket.gethostname()}; "
            f"torchrun not started; report: {report}",
        )

    def _agent_failure(self, last_attempt: int) -> list[WorkerFailure]:
        """No worker wrote a record (a script with torch's ``@record`` only): the agent's copy of
        its root cause, counted as the last attempt's, is the only evidence left."""
        f = read_error_file(self.agent_error_file, max(last_attempt, 0))
        return [f] if f is not None and f.exit_code != ExitCode.RETRY else []

    def _agent_message(self) -> str | None:
        f = read_error_file(self.agent_error_file)
        return f.message if f else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m arc_dist.launch``; returns the exit code."""
    spec, dry_run = parse_args(argv)
    if dry_run:
        spec.log_dir = spec.log_dir or "<new temporary folder>"
        cmd, env = build_command(
            spec, agent_error_file=os.path.join(spec.log_dir, "agent-error.json")
        )
        print(format_command(cmd, env))
        return int(ExitCode.OK)
    return int(Launcher(spec).run().exit_code)


if __name__ == "__main__":
    sys.exit(main())
