"""The launcher's command line: flags and ``ARC_*``/``PET_*`` environment merged into a
:class:`LaunchSpec`, validated, and turned into the ``torchrun`` command. Pure: no processes."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ExitCode
from .exitcodes import ERROR_DIR_ENV

#: environment every torchrun we start gets (see arc_dist.elastic.launcher)
FIXED_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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
    warm_start: bool = False
    warm_imports: list[str] = field(default_factory=list)
    torchrun_args: list[str] = field(default_factory=list)

    @property
    def max_nodes(self) -> int:
        return int(self.nnodes.split(":")[-1])


def _env_flag(name: str) -> bool:
    """A boolean flag's default from ``ARC_<NAME>``/``PET_<NAME>``: set and not 0/false/no."""
    return _env_default(name, "") not in ("", "0", "false", "no")


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
        default=_env_flag("PREFLIGHT"),
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
        "--warm-start",
        action="store_true",
        default=_env_flag("WARM_START"),
        help="start workers by forking a per-node zygote that has torch and arc-dist imported "
        "already (Linux): a restart skips the imports; falls back to a normal start whenever "
        "the zygote is unavailable; see docs/elastic.md (ARC_WARM_START=1)",
    )
    a(
        "--warm-import",
        action="append",
        default=[m for m in _env_default("WARM_IMPORTS", "").split(",") if m],
        metavar="MODULE",
        help="with --warm-start, also import MODULE in the zygote (the script's own heavy "
        "imports); repeat for several (ARC_WARM_IMPORTS, comma-separated)",
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
            warm_start=ns.warm_start,
            warm_imports=list(ns.warm_import),
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
    bad = [m for m in spec.warm_imports if not all(p.isidentifier() for p in m.split("."))]
    if bad:
        raise ValueError(f"--warm-import={bad[0]!r} is invalid: use a module name such as pkg.mod")
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


def build_command(
    spec: LaunchSpec, *, agent_error_file: str, zygote: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line and the environment variables the launcher adds to it; with
    ``zygote`` (its address) the workers are started through the warm-start shim."""
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
    if zygote is not None:
        from .zygote import SHIM

        # torchrun runs the shim as it is (no "python -u" before it): with -S, no site start-up
        # (the editable installs' import hooks alone take a fifth of a second)
        cmd += ["--no-python", sys.executable, "-S", "-u", SHIM, zygote]
        cmd.append("-m" if spec.module else "--")
    elif spec.module:
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
