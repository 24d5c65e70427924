"""Train the small GPT of examples/gpt.py under Ray Train, protected by arc-dist.

The model, data and schedule are ``gpt.py``'s, the flags ``train_ddp.py``'s and more; Ray's
``TorchTrainer`` starts the workers, joins them into a process group and wraps the model in DDP.
Arc runs inside ``train_loop_per_worker``: numeric faults are rolled back in place (Ray never
notices), and when a worker process dies Ray restarts the whole group (``--max-failures``), whose
loop calls ``arc.resume()`` and continues from the newest healthy checkpoint under
``<storage-path>/<name>/arc``. Metrics and arc-dist's committed checkpoints are reported to Ray, so
``Result.checkpoint`` points at the newest one.

On this machine (Ray starts a local instance; 2 CPU workers)::

    python examples/train_ray.py --workers 2 --steps 300 --storage-path /tmp/arc-ray --name gpt

Same name again: the run continues from its newest healthy checkpoint. On a cluster, as a
Ray job (the storage must be shared by every node: an object store or a shared mount)::

    python launch/ray_submit.py --address http://HEAD:8265 -- \\
        python examples/train_ray.py --workers 8 --gpu --max-failures 3 \\
        --storage-path s3://bucket/runs --name gpt-run-1

Fire drill (faults fire only in a fresh run, not after a resume, unless --chaos-on-restart)::

    python examples/train_ray.py --workers 2 --storage-path /tmp/arc-ray \\
        --chaos "nan_loss@40/1 crash@90/1"
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpt, train_ddp: beside this file

import torch  # noqa: E402
from gpt import GPT, get_batch, load_corpus, loss_fn  # noqa: E402
from train_ddp import build_parser as ddp_parser  # noqa: E402

import arc_dist.ray as arc_ray  # noqa: E402
from arc_dist import Arc, ArcConfig  # noqa: E402
from arc_dist.chaos import inject, parse  # noqa: E402
from arc_dist.silent import replica_digest  # noqa: E402

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    p = ddp_parser(__doc__)
    a = p.add_argument
    a("--workers", type=int, default=2, help="Ray Train workers (ScalingConfig.num_workers)")
    a("--gpu", action="store_true", help="one GPU per worker (ScalingConfig.use_gpu)")
    a("--cpus-per-worker", type=float, default=1.0)
    a("--storage-path", default=None, help="RunConfig.storage_path (default: ~/ray_results)")
    a("--name", default=None, help="RunConfig.name; reuse it to continue a run")
    a("--max-failures", type=int, default=3, help="worker-group restarts (FailureConfig)")
    a("--report-every", type=int, default=20, help="steps between ray.train.report calls")
    a("--chaos-on-restart", action="store_true", help="inject the faults after a resume too")
    a("--report", default=None, help="append JSON events (start, first step, done) to this file")
    a("--address", default=None, help="ray.init address (default: $RAY_ADDRESS, else local)")
    a(
        "--checkpoint-mode",
        choices=["async", "blocking"],
        default="async",
        help="async: training goes on while a checkpoint is written (ArcConfig.async_checkpoint)",
    )
    # under Ray the default checkpoint folder is <storage-path>/<name>/arc
    p.set_defaults(checkpoint_dir=None, log_every=20)
    return p


def report_event(path: str | None, **event) -> None:
    """One JSON line per event; short appends from several workers do not interleave."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")


def train_loop_per_worker(config: dict) -> None:
    """Run by Ray on every worker, again after every restart of the group."""
    import ray.train
    import ray.train.torch

    args = argparse.Namespace(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[ray rank {rank}] %(message)s",
        stream=sys.stdout,
        force=True,
    )
    device = ray.train.torch.get_device()
    data = load_corpus(args.corpus_bytes)
    torch.manual_seed(args.seed)  # the same initial weights on every worker
    gpt = GPT(args.block_size, args.n_layer, args.n_head, args.n_embd)
    model = ray.train.torch.prepare_model(gpt)  # to the device, DDP when world > 1
    opt, sched = gpt.configure_optimizers(args.lr, args.warmup, args.steps)
    if args.checkpoint_dir is None:
        ckpt = arc_ray.checkpoint_dir()  # <storage_path>/<name>/arc
    else:
        ckpt = None if args.checkpoint_dir.lower() == "none" else args.checkpoint_dir
    config_ = ArcConfig(
        snapshot_every=args.snapshot_every,
        checkpoint_every=args.checkpoint_every,
        confirm_after=args.confirm_after,
        hang_timeout=args.hang_timeout or None,
        hang_grace=args.hang_grace,
        async_checkpoint=args.checkpoint_mode == "async",
    )
    arc = Arc(model, opt, sched, checkpoint_dir=ckpt, config=config_, chaos="")
    start = arc.resume()  # collective: after a Ray restart, the newest healthy checkpoint
    chaos = args.chaos if args.chaos is not None else os.environ.get("ARC_CHAOS", "")
    if chaos and (start == 0 or args.chaos_on_restart):
        for f in parse(chaos):  # a fire drill hits the fresh run; the restart shows recovery
            inject(
                arc, f.kind, step=f.step, ranks=f.ranks, persistent=f.persistent, factor=f.factor
            )
    log.info(
        "world size %d on %s: %s; checkpoints in %s; faults: %s",
        world,
        device,
        f"resumed at step {start}" if start else "fresh start",
        ckpt,
        chaos or "none",
    )
    report_event(args.report, event="start", rank=rank, pid=os.getpid(), world=world, step=start)

    recent: list[float] = []
    t_log, first = time.monotonic(), True
    while arc.global_step < args.steps:
        x, y = get_batch(data, step=arc.global_step, rank=rank, batch_size=args.batch_size,
                         block_size=args.block_size, seed=args.seed)  # fmt: skip
        loss = loss_fn(model(x.to(device)), y.to(device))
        loss.backward()
        action = arc.step(loss)  # collective: the same verdict on every worker
        if not action.should_skip:
            opt.step()
            sched.step()
            recent = (recent + [action.loss])[-20:]
        opt.zero_grad(set_to_none=True)
        if action.rolled_back:
            log.warning("%s: rolled back to step %d", action.reason, action.step)
        if first:
            report_event(args.report, event="first_step", rank=rank, step=arc.global_step)
            first = False
        # every worker reports at the same steps (Action is identical on every rank)
        if not action.should_skip and arc.global_step % args.report_every == 0:
            arc_ray.report(arc, {"loss": sum(recent) / len(recent)}, action=action)
        if rank == 0 and arc.global_step % args.log_every == 0 and not action.should_skip:
            report_event(args.report, event="progress", rank=rank, step=arc.global_step)
            dt, t_log = time.monotonic() - t_log, time.monotonic()
            st = arc.stats()
            log.info(
                "step %5d/%d | loss %.4f | %.3fs/step | rollbacks %d | checkpoints %d",
                arc.global_step,
                args.steps,
                action.loss,
                dt / args.log_every,
                st["rollbacks"],
                st["checkpoints"],
            )
    if ckpt is not None:
        arc.save()  # the final state, durable (and listed by Ray below)
    final = sum(recent) / len(recent) if recent else math.nan
    arc_ray.report(arc, {"loss": final, "done": True})
    stats = arc.stats()
    arc.close()
    report_event(
        args.report,
        event="done",
        rank=rank,
        step=arc.global_step,
        resumed_from=start,
        loss=final,
        digest=replica_digest(model),
        stats={k: v for k, v in stats.items() if isinstance(v, (int, float))},
    )
    if rank == 0:
        log.info("done: step %d, loss %.4f", arc.global_step, final)


def make_trainer(args: argparse.Namespace, train_fn=train_loop_per_worker):
    """The ``TorchTrainer`` for ``args`` (the driver side; call after ``ray.init``)."""
    import gpt
    import ray.cloudpickle
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # ship this file and gpt.py by value: the workers (on other nodes, or in a Ray job's working
    # dir) need not have examples/ on their path
    ray.cloudpickle.register_pickle_by_value(gpt)
    if __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    storage = args.storage_path
    if storage is not None and "://" not in storage:
        storage = os.path.abspath(storage)
    run_config = RunConfig(
        storage_path=storage,
        name=args.name,
        failure_config=FailureConfig(max_failures=args.max_failures),
    )
    arc_ray.check_storage(run_config)  # fail here, not in every worker after every restart
    resources = {"CPU": args.cpus_per_worker}
    if args.gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_fn,
        train_loop_config=vars(args),
        scaling_config=ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources
        ),
        run_config=run_config,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        args.report = os.path.abspath(args.report)
    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)
    trainer = make_trainer(args)
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError once max_failures restarts are spent
        print(f"training failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"done: {result.metrics}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
