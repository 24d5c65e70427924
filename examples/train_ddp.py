"""Train a small GPT on Python's own source code with DDP, protected by arc-dist.

The model and data are in ``gpt.py`` beside this file. Arc adds durable checkpoints to
``--checkpoint-dir``, in-memory rollbacks, the hang watchdog, and faults from
``arc_dist.chaos`` on demand. Every (re)start calls ``arc.resume()``, so a job restarted by
torchrun continues from the newest healthy checkpoint, also with a different number of ranks.
Runs on CPU (gloo); the CUDA (nccl) branch is written but not yet run on a GPU.

Single node, 2 workers, through the launcher (sets the elastic flags, maps exit codes)::

    python -m arc_dist.launch --nproc-per-node=2 --max-restarts=3 \\
        examples/train_ddp.py --steps 300 --checkpoint-dir runs/ddp

The same with plain torchrun (set the variable: restarts are flaky without it)::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node=2 \\
        --max-restarts=3 examples/train_ddp.py --steps 300 --checkpoint-dir runs/ddp

Two nodes, elastic (1 to 2 nodes; run on each node, HEAD = the first node's address)::

    python -m arc_dist.launch --nnodes=1:2 --nproc-per-node=8 --max-restarts=10 \\
        --rdzv-endpoint=HEAD:29400 --rdzv-id=gpt-run-1 \\
        examples/train_ddp.py --steps 5000 --checkpoint-dir s3://bucket/gpt-run-1

Fire drill (the faults fire in the first attempt only; restarts show the recovery)::

    ... examples/train_ddp.py --chaos "nan_loss@40/1 crash@90/1 hang@150/0"

``examples/train_fsdp.py`` is this script with FSDP2 instead of DDP.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from gpt import GPT, get_batch, load_corpus, loss_fn
from torch import nn

from arc_dist import Arc, ArcConfig
from arc_dist.launch import main_entry

log = logging.getLogger("train")


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.split("\n\n")[0])
    a = p.add_argument
    a("--steps", type=int, default=300, help="optimizer steps to train for")
    a("--batch-size", type=int, default=8, help="sequences per rank per step")
    a("--block-size", type=int, default=64, help="context length in bytes")
    a("--n-layer", type=int, default=2)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=64)
    a("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    a("--warmup", type=int, default=20, help="warm-up steps")
    a("--seed", type=int, default=0)
    a("--corpus-bytes", type=int, default=2_000_000, help="how much of the stdlib to read")
    a("--checkpoint-dir", default="runs/train", help="local path or fsspec URL; 'none' disables")
    a("--checkpoint-every", type=int, default=50, help="steps between durable checkpoints")
    a("--confirm-after", type=int, default=20, help="healthy steps that confirm a checkpoint")
    a("--snapshot-every", type=int, default=10, help="steps between in-memory snapshots")
    a("--local-dir", help="node-local folder for fast-restart snapshots (default: /dev/shm/...)")
    a("--no-local-snapshots", action="store_true", help="restarts resume from durable storage")
    a("--hang-timeout", type=float, default=300.0, help="seconds without a step before the "
      "watchdog exits the rank (0 disables); keep it above the collective timeout")  # fmt: skip
    a("--hang-grace", type=float, default=600.0, help="extra seconds for step 1, saves, loads")
    a("--collective-timeout", type=float, default=600.0, help="process-group timeout, seconds")
    a("--chaos", help="faults to inject, e.g. 'crash@40/1' (default: $ARC_CHAOS)")
    a("--log-every", type=int, default=10, help="steps between progress lines on rank 0")
    return p


def setup(args) -> tuple[torch.device, int, int]:
    """Pick this rank's device and join the process group (when run under torchrun)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=args.collective_timeout),
            device_id=device if device.type == "cuda" else None,
        )
    return device, rank, world


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model  # a single process: nothing to replicate
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def train(args, wrap: Callable[[nn.Module, torch.device], nn.Module], name: str = "ddp") -> None:
    """The whole run; ``wrap`` turns the plain model into the data-parallel one."""
    device, rank, world = setup(args)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[{name} rank {rank}] %(message)s",
        stream=sys.stdout,
    )
    data = load_corpus(args.corpus_bytes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    gpt = GPT(args.block_size, args.n_layer, args.n_head, args.n_embd).to(device)
    model = wrap(gpt, device)
    opt, sched = gpt.configure_optimizers(args.lr, args.warmup, args.steps)

    chaos = args.chaos if args.chaos is not None else os.environ.get("ARC_CHAOS", "")
    if restart > 0:
        chaos = ""  # a fire drill hits the first attempt; restarts show the recovery
    config = ArcConfig(
        snapshot_every=args.snapshot_every,
        checkpoint_every=args.checkpoint_every,
        confirm_after=args.confirm_after,
        hang_timeout=args.hang_timeout or None,
        hang_grace=args.hang_grace,
        local_snapshots=False if args.no_local_snapshots else None,
        local_dir=args.local_dir,
    )
    ckpt = None if args.checkpoint_dir.lower() == "none" else args.checkpoint_dir
    arc = Arc(model, opt, sched, checkpoint_dir=ckpt, config=config, chaos=chaos)
    # Collective: every rank loads the newest checkpoint all ranks agree is healthy (a
    # node-local snapshot when one is newer), resharded if the world size changed; 0 if none.
    # No sampler state to restore: get_batch is a pure function of the step. With a DataLoader,
    # use arc_dist.ResumableDistributedSampler, arc.register() it, and start the epoch
    # loop at sampler.epoch so that set_epoch keeps the resumed position.
    start = arc.resume()
    n_params = sum(p.numel() for p in gpt.parameters())
    resumed = f"resumed at step {start}" if start else "fresh start"
    log.info("run %s, restart %d, world size %d, %s: %s; %.2fM parameters; faults: %s", run_id,
             restart, world, device, resumed, n_params / 1e6, chaos or "none")  # fmt: skip

    t_log = time.monotonic()
    while arc.global_step < args.steps:
        x, y = get_batch(data, step=arc.global_step, rank=rank, batch_size=args.batch_size,
                         block_size=args.block_size, seed=args.seed)  # fmt: skip
        loss = loss_fn(model(x.to(device)), y.to(device))
        loss.backward()  # DDP has all-reduced the gradients when this returns
        # Between backward and optimizer.step: Arc sees this step's loss and averaged gradients
        # before they touch the weights. One collective gives every rank the same verdict.
        action = arc.step(loss)
        if action.rolled_back and rank == 0:  # every rank rolled back, to the same step
            lost = action.failed_step - action.restored_step
            log.warning("%s at step %d (ranks %s): rolled back to step %d, %d steps lost",
                        action.reason, action.failed_step, list(action.bad_ranks),
                        action.restored_step, lost)  # fmt: skip
        # Skip the update on a bad step (or after a rollback) on every rank alike: a rank
        # stepping alone would make the replicas diverge.
        if not action.should_skip:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (arc.global_step % args.log_every == 0 or arc.global_step == args.steps):
            dt, t_log = time.monotonic() - t_log, time.monotonic()
            tok_s = args.log_every * args.batch_size * args.block_size * world / max(dt, 1e-9)
            st = arc.stats()
            log.info("step %5d/%d | loss %.4f | %7.0f tok/s | rollbacks %d | checkpoints %d",
                     arc.global_step, args.steps, action.loss, tok_s, st["rollbacks"],
                     st["checkpoints"])  # fmt: skip
    if ckpt is not None:
        arc.save()  # the final state, durable
    arc.close()
    log.info("done: step %d", arc.global_step)
    if world > 1:
        dist.destroy_process_group()


# An ArcError escaping train() exits with its code (UnrecoverableError: 11, do not retry), which
# the launcher (and Kubernetes' podFailurePolicy) turns into "stop" instead of a restart loop.
@main_entry
def main() -> None:
    train(build_parser().parse_args(), wrap_ddp, "ddp")


if __name__ == "__main__":
    main()
