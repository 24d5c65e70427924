"""Recovery under Ray Train: time from a worker's SIGKILL to the first resumed step, steps lost.

Runs ``examples/train_ray.py`` (2 workers by default) with ``crash@STEP/1``: worker 1 SIGKILLs
itself at the start of step STEP (fresh runs only). Ray restarts the worker group, whose loop
calls ``arc.resume()``. From the example's event file (wall-clock times, one line per event):

* ``kill``: rank 0's progress line for step STEP (worker 1 dies a forward/backward later);
* ``restarted``: the new group's ``start`` event (after process start, imports, DDP set-up and
  ``arc.resume()``); ``first_resumed_step``: its first completed step;
* ``steps_lost`` = STEP - the step it resumed from (checkpoints every ``--checkpoint-every``,
  confirmed after ``--confirm-after`` healthy steps);
* ``step_s``: median seconds per step before the kill, for scale.

    python benchmarks/ray_overhead.py                       # a local Ray instance, 2 CPUs
    python benchmarks/ray_overhead.py --address auto --workers 4 --repeats 3

docs/ray.md has the numbers measured here, beside the torchrun path's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def one_run(train_ray, args: argparse.Namespace, work: Path, index: int) -> dict:
    events_path = work / f"events-{index}.jsonl"
    flags = [
        "--workers", str(args.workers), "--steps", str(args.steps),
        "--checkpoint-every", str(args.checkpoint_every),
        "--confirm-after", str(args.confirm_after), "--checkpoint-mode", args.checkpoint_mode,
        "--chaos", f"crash@{args.crash_at}/1", "--max-failures", "2",
        "--log-every", "1", "--report-every", str(args.report_every),
        "--corpus-bytes", "300000", "--storage-path", str(work / "store"),
        "--name", f"bench-{index}", "--report", str(events_path),
    ]  # fmt: skip
    trainer = train_ray.make_trainer(train_ray.build_parser().parse_args(flags))
    t0 = time.time()
    result = trainer.fit()
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    if result.error is not None:
        raise RuntimeError(f"run {index} failed: {result.error}")

    def first(kind: str, **match) -> dict:
        return next(
            e for e in events if e["event"] == kind and all(e[k] == v for k, v in match.items())
        )

    starts = [e for e in events if e["event"] == "start" and e["rank"] == 0]
    if len(starts) != 2:
        raise RuntimeError(f"expected one restart, saw {len(starts) - 1}")
    progress = [e for e in events if e["event"] == "progress"]
    kill = first("progress", step=args.crash_at)
    before = [e["time"] for e in progress if e["time"] <= kill["time"]]
    restarted = starts[1]
    resumed_step = restarted["step"]
    first_after = next(
        e
        for e in events
        if e["event"] == "first_step" and e["rank"] == 0 and e["time"] > restarted["time"]
    )
    return {
        "kill_to_restarted_s": round(restarted["time"] - kill["time"], 2),
        "kill_to_first_resumed_step_s": round(first_after["time"] - kill["time"], 2),
        "steps_lost": args.crash_at - resumed_step,
        "resumed_from": resumed_step,
        "step_s": round(statistics.median(b - a for a, b in zip(before, before[1:])), 4),
        "fit_s": round(time.time() - t0, 1),
        "first_step_of_run_s": round(first("first_step", rank=0)["time"] - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=None, help="an existing cluster (default: start one)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--crash-at", type=int, default=28)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--confirm-after", type=int, default=3)
    p.add_argument("--checkpoint-mode", choices=["async", "blocking"], default="blocking")
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import ray

    sys.path.insert(0, str(EXAMPLES))
    import train_ray

    work = Path(tempfile.mkdtemp(prefix="arcraybench-", dir="/tmp"))
    try:
        if args.address:
            ray.init(address=args.address)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
            ray.init(
                num_cpus=args.workers,
                _temp_dir=str(work / "ray"),
                include_dashboard=False,
                logging_level="WARNING",
            )
        runs = [one_run(train_ray, args, work, i) for i in range(args.repeats)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    keys = ["kill_to_restarted_s", "kill_to_first_resumed_step_s", "steps_lost", "step_s"]
    summary = {
        "path": "ray",
        "workers": args.workers,
        "crash_at": args.crash_at,
        "checkpoint_every": args.checkpoint_every,
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
