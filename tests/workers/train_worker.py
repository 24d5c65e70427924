"""examples/train_ddp.py's run as a test worker: the example's own loop, plus what tests observe.

``python -m arc_dist.launch ... tests/workers/train_worker.py [--fsdp] [example flags]
[--report FILE] [--throttle S] [--chaos-on-restart]`` runs ``train_ddp.train`` (with FSDP2's
wrapping under ``--fsdp``) unchanged, with an :class:`~arc_dist.Arc` subclass that appends JSON
events to ``--report`` (per rank: ``start`` with the pid and parent pid, ``first_step``; rank 0: ``step`` every
``--log-every`` steps and ``done`` with the mean loss of the last 20 updates; per rank at the
end, ``params`` with the sum of the model's parameters; ``start`` also
carries the wall-clock times this process was created, ran its first line, finished its imports,
joined the process group and began ``resume()``, for benchmarks/recovery.py's breakdown), sleeps
``--throttle`` seconds per step so a test can act mid-run, and keeps ``--chaos`` in restarts
under ``--chaos-on-restart``. The subclass only observes: every decision is the real Arc's.
"""

from __future__ import annotations

# ruff: noqa: E402 (the first line takes a timestamp before the imports)
import time

T_MAIN = time.time()  # this script's first line: the interpreter started before, imports follow

import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import torch  # noqa: E402
import train_ddp  # noqa: E402
from train_fsdp import wrap_fsdp  # noqa: E402

from arc_dist import Arc  # noqa: E402
from arc_dist.launch import main_entry  # noqa: E402


def report(path: str | None, **event) -> None:
    """One JSON line per event; short appends from several ranks do not interleave."""
    if path:
        line = json.dumps({"time": time.time(), **event}) + "\n"
        with open(path, "a") as f:
            f.write(line)


def process_started() -> float | None:
    """When this process was created (fork/exec), wall clock, from Linux /proc (10 ms steps);
    None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


#: when this process reached each phase of its start (``start`` events carry them)
STAMPS: dict[str, float | None] = {"t_process": process_started(), "t_main": T_MAIN}


def reporting_arc(args) -> type[Arc]:
    """An Arc that also writes the events tests read (see the module docstring)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))

    class ReportingArc(Arc):
        def __init__(self, *a, chaos=None, **kw):
            if args.chaos_on_restart and restart > 0:
                chaos = args.chaos if args.chaos is not None else os.environ.get("ARC_CHAOS", "")
            super().__init__(*a, chaos=chaos, **kw)
            self._event = dict(rank=self.rank, restart=restart, world=self.world_size)
            self._recent: list[float] = []
            self._resumed_from, self._first = 0, True

        def resume(self) -> int:
            STAMPS["t_resume"] = time.time()
            self._resumed_from = start = super().resume()
            report(args.report, event="start", pid=os.getpid(), ppid=os.getppid(), step=start,
                   **STAMPS, **self._event)  # fmt: skip
            return start

        def step(self, loss, **kw):
            action = super().step(loss, **kw)
            if not action.should_skip:
                self._recent = (self._recent + [action.loss])[-20:]
            if self._first:
                report(args.report, event="first_step", step=self.global_step, **self._event)
                self._first = False
            time.sleep(args.throttle)  # before the step event, as a slower step would be
            at = self.global_step
            if self.rank == 0 and (at % args.log_every == 0 or at == args.steps):
                report(args.report, event="step", step=at, loss=action.loss, **self._event)
            return action

        def close(self) -> None:
            stats = self.stats()
            with torch.no_grad():  # every rank: tests compare the replicas
                local = [getattr(p, "to_local", lambda p=p: p)() for p in self.model.parameters()]
                total = float(sum(p.double().sum() for p in local))  # FSDP2: this rank's shard
            report(args.report, event="params", step=self.global_step, sum=total, **self._event)
            super().close()
            if self.rank == 0:
                loss = sum(self._recent) / len(self._recent) if self._recent else math.nan
                numbers = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
                report(args.report, event="done", step=self.global_step, loss=loss,
                       resumed_from=self._resumed_from, stats=numbers, **self._event)  # fmt: skip

    return ReportingArc


def build_parser(description: str = "train_ddp.py's run, reporting events for tests"):
    p = train_ddp.build_parser(description)
    p.add_argument("--fsdp", action="store_true", help="wrap with FSDP2 as train_fsdp.py does")
    p.add_argument("--report", help="append JSON events to this file")
    p.add_argument("--throttle", type=float, default=0.0, help="sleep per step, seconds")
    p.add_argument("--chaos-on-restart", action="store_true", help="inject faults in restarts too")
    return p


def timed_setup(args):
    """train_ddp.setup (device, process group), stamped."""
    STAMPS["t_setup"] = time.time()
    out = _setup(args)
    STAMPS["t_pg"] = time.time()
    return out


_setup = train_ddp.setup


@main_entry
def main() -> None:
    STAMPS["t_imported"] = time.time()
    args = build_parser().parse_args()
    train_ddp.setup = timed_setup
    train_ddp.Arc = reporting_arc(args)  # the example builds its Arc from this module global
    if args.fsdp:
        train_ddp.train(args, wrap_fsdp, "fsdp")
    else:
        train_ddp.train(args, train_ddp.wrap_ddp, "ddp")


if __name__ == "__main__":
    main()
