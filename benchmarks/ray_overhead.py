"""Recovery under Ray Train: time from a worker's SIGKILL to the first resumed step, steps lost,
for the arc-dist example and for a bare twin of it, in alternating runs of one invocation.

Runs ``examples/train_ray.py`` (2 workers by default) with ``crash@STEP/1``: worker 1 SIGKILLs
itself at the start of step STEP (fresh runs only). Ray restarts the worker group, whose loop
calls ``arc.resume()``. From the example's event file (wall-clock times, one line per event):

* ``kill``: rank 0's progress line for step STEP (worker 1 dies a forward/backward later);
* ``restarted``: the new group's ``start`` event (after process start, imports, DDP set-up and
  ``arc.resume()``); ``first_resumed_step``: its first completed step;
* ``steps_lost`` = STEP - the step it resumed from (checkpoints every ``--checkpoint-every``,
  confirmed after ``--confirm-after`` healthy steps);
* ``step_s``: median seconds per step before the kill, for scale.

The **bare** twin (:func:`bare_loop`, no arc-dist) trains the same model on the same data with
the same DDP set-up, ``torch.save``s model, optimizer and schedule into a Ray checkpoint every
``--checkpoint-every`` steps (``ray.train.report``), loads ``ray.train.get_checkpoint()`` after a
restart, and has worker 1 SIGKILL itself at the same step of a fresh run; Ray restarts it through
the same ``FailureConfig``. The ratio ``arc / bare`` of kill -> first resumed step is per pair
(one run of each, back to back).

    python benchmarks/ray_overhead.py                       # a local Ray instance, 2 CPUs
    python benchmarks/ray_overhead.py --address auto --workers 4 --repeats 3
    python benchmarks/ray_overhead.py --paths arc         # the arc-dist path only

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
sys.path.insert(0, str(EXAMPLES))
# train_ray.make_trainer has Ray ship gpt.py and train_ray.py's functions to the workers by value
import train_ray  # noqa: E402
from gpt import GPT, get_batch, load_corpus, loss_fn  # noqa: E402
from train_ray import report_event  # noqa: E402


def bare_loop(config: dict) -> None:
    """The example's loop without arc-dist: plain DDP, ``torch.save`` into Ray checkpoints."""
    import signal

    import ray.train
    import ray.train.torch
    import torch

    args = argparse.Namespace(**config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    data = load_corpus(args.corpus_bytes)
    torch.manual_seed(args.seed)
    net = GPT(args.block_size, args.n_layer, args.n_head, args.n_embd)
    model = ray.train.torch.prepare_model(net)
    opt, sched = net.configure_optimizers(args.lr, args.warmup, args.steps)
    step, restored = 0, ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
    report_event(args.report, event="start", rank=rank, pid=os.getpid(), step=step)
    first = True
    while step < args.steps:
        if restored is None and rank == 1 and step == args.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # what chaos "crash@STEP/1" does under Arc
        x, y = get_batch(data, step=step, rank=rank, batch_size=args.batch_size,
                         block_size=args.block_size, seed=args.seed)  # fmt: skip
        loss_fn(model(x.to(device)), y.to(device)).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if first:
            report_event(args.report, event="first_step", rank=rank, step=step)
            first = False
        if step % args.checkpoint_every == 0:
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    state = {"model": net.state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict(), "step": step}  # fmt: skip
                    torch.save(state, os.path.join(d, "state.pt"))
                    ckpt = ray.train.Checkpoint.from_directory(d)
                    ray.train.report({"step": step}, checkpoint=ckpt)
            else:
                ray.train.report({"step": step})
        if rank == 0:
            report_event(args.report, event="progress", rank=rank, step=step)


def timed(loop):
    """``loop`` reporting when a worker entered it and when it raised (the phases of a restart)."""

    def run(config: dict) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        report_event(config["report"], event="enter", rank=rank)
        try:
            loop(config)
        except BaseException:
            report_event(config["report"], event="raised", rank=rank)
            raise

    return run


def one_run(path: str, args: argparse.Namespace, work: Path, index: int) -> dict:
    events_path = work / f"events-{path}-{index}.jsonl"
    flags = [
        "--workers", str(args.workers), "--steps", str(args.steps),
        "--checkpoint-every", str(args.checkpoint_every),
        "--confirm-after", str(args.confirm_after), "--checkpoint-mode", args.checkpoint_mode,
        "--chaos", f"crash@{args.crash_at}/1", "--max-failures", "2",
        "--log-every", "1", "--report-every", str(args.report_every),
        "--corpus-bytes", "300000", "--storage-path", str(work / "store"),
        "--name", f"bench-{path}-{index}", "--report", str(events_path),
    ]  # fmt: skip
    parsed = train_ray.build_parser().parse_args(flags)
    parsed.crash_at = args.crash_at
    loop = bare_loop if path == "bare" else train_ray.train_loop_per_worker
    trainer = train_ray.make_trainer(parsed, train_fn=timed(loop))
    t0 = time.time()
    result = trainer.fit()
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    if result.error is not None:
        raise RuntimeError(f"{path} run {index} failed: {result.error}")

    def first(kind: str, **match) -> dict:
        return next(
            e for e in events if e["event"] == kind and all(e[k] == v for k, v in match.items())
        )

    starts = [e for e in events if e["event"] == "start" and e["rank"] == 0]
    if len(starts) != 2:
        raise RuntimeError(f"{path}: expected one restart, saw {len(starts) - 1}")
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
    raised = first("raised", rank=0)
    entered = next(
        e for e in events if e["event"] == "enter" and e["rank"] == 0 and e["time"] > kill["time"]
    )
    return {
        # the phases: the survivor's collective fails; Ray tears the group down and starts a
        # new one (processes, imports); the loop sets up and resumes; its first step
        "kill_to_survivor_raised_s": round(raised["time"] - kill["time"], 2),
        "raised_to_new_group_entered_s": round(entered["time"] - raised["time"], 2),
        "entered_to_resumed_s": round(restarted["time"] - entered["time"], 2),
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
    p.add_argument("--repeats", type=int, default=1, help="runs of each path, alternating")
    p.add_argument("--paths", default="arc,bare", help="comma-separated: arc, bare")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    paths = [x for x in args.paths.split(",") if x]
    if not paths or set(paths) - {"arc", "bare"}:
        p.error(f"--paths {args.paths!r}: give arc, bare or both, comma-separated")

    import ray

    work = Path(tempfile.mkdtemp(prefix="arcraybench-", dir="/tmp"))
    runs: dict[str, list[dict]] = {path: [] for path in paths}
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
        for i in range(args.repeats):
            order = paths if i % 2 == 0 else paths[::-1]  # alternate who goes first
            for path in order:
                runs[path].append(one_run(path, args, work, i))
                print(f"{path} run {i}: {json.dumps(runs[path][-1])}", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    keys = [
        "kill_to_survivor_raised_s",
        "raised_to_new_group_entered_s",
        "entered_to_resumed_s",
        "kill_to_restarted_s",
        "kill_to_first_resumed_step_s",
        "steps_lost",
        "step_s",
    ]
    summary = {
        "workers": args.workers,
        "crash_at": args.crash_at,
        "checkpoint_every": args.checkpoint_every,
        "load_average": os.getloadavg(),
        "runs": runs,
        "median": {
            path: {k: statistics.median(r[k] for r in rs) for k in keys}
            for path, rs in runs.items()
        },
    }
    if len(paths) == 2:
        key = "kill_to_first_resumed_step_s"
        ratios = [a[key] / b[key] for a, b in zip(runs["arc"], runs["bare"])]
        summary["arc_over_bare_median"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
