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

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import ExitCode
from . import zygote as warm
from .command import FIXED_ENV, LaunchSpec, build_command, error_dir, format_command, parse_args
from .exitcodes import (
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


_PREFIX = "[arc-launch]"


def _say(msg: str) -> None:
    sys.stderr.write(f"{_PREFIX} {msg}\n")
    sys.stderr.flush()


def _set_pdeathsig() -> None:
    """In the child: get SIGTERM if the launcher dies (Linux), so torchrun never outlives it."""
    warm.death_signal(signal.SIGTERM)


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
        self.zygote: subprocess.Popen | None = None

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
        if self.zygote is not None:  # its workers die with it (parent-death signal)
            sigkill_all([self.zygote.pid, *_descendants(self.zygote.pid)])

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
        address = self._start_zygote() if spec.warm_start else None
        cmd, env_add = build_command(spec, agent_error_file=self.agent_error_file, zygote=address)
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
            if self.zygote is not None:
                warm.stop(self.zygote)
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

    def _start_zygote(self) -> str | None:
        """The warm-start zygote's address; None (workers start normally) where it cannot run."""
        why = warm.unavailable()
        if why is not None:
            _say(f"{why}: starting workers normally")
            return None
        self.zygote, address = warm.start(self.spec.warm_imports)
        if not warm.wait_listening(address, self.zygote):
            _say("warm start: the zygote is not listening; starting workers normally")
            warm.stop(self.zygote)
            self.zygote = None
            return None
        _say(f"warm start: zygote pid {self.zygote.pid} forks the workers")
        return address

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
            spec,
            agent_error_file=os.path.join(spec.log_dir, "agent-error.json"),
            zygote="<zygote address>" if spec.warm_start else None,
        )
        print(format_command(cmd, env))
        return int(ExitCode.OK)
    return int(Launcher(spec).run().exit_code)


if __name__ == "__main__":
    sys.exit(main())
