"""Train a small GPT on Python's own source code with DDP, protected by arc-dist.

A real (if small) training script: a byte-level GPT on the standard library's ``.py`` files (no
download), DDP, durable checkpoints to ``--checkpoint-dir``, in-memory rollbacks, the hang
watchdog, and faults from ``arc_dist.chaos`` on demand. Every (re)start calls ``arc.resume()``,
so a job restarted by torchrun continues from the newest healthy checkpoint, also with a
different number of ranks. Runs unchanged on CPU (gloo) and CUDA (nccl).

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

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:2 --nproc-per-node=8 \\
        --max-restarts=10 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29400 --rdzv-id=gpt-run-1 \\
        examples/train_ddp.py --steps 5000 --checkpoint-dir s3://bucket/gpt-run-1

Fire drills (faults fire in the first attempt only, unless --chaos-on-restart)::

    ... examples/train_ddp.py --chaos "nan_loss@40/1 crash@90/1 hang@150/0"

``examples/train_fsdp.py`` is the same script with FSDP2 instead of DDP.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from arc_dist import Arc, ArcConfig
from arc_dist.launch import main_entry

log = logging.getLogger("train")


# -- data: Python's standard library, as bytes -----------------------------------------------
def load_corpus(max_bytes: int) -> torch.Tensor:
    """The stdlib's top-level ``.py`` files, sorted and concatenated: the same bytes everywhere."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    chunks, total = [], 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def get_batch(data: torch.Tensor, step: int, rank: int, args, device) -> tuple:
    """The batch of ``rank`` at ``step``: a pure function of both, so a resumed run sees the
    same data stream as an uninterrupted one."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    n = len(data) - args.block_size - 1
    cut = int(n * 0.95)  # the last 5% is held out
    ix = torch.randint(0, cut, (args.batch_size,), generator=g)
    x = torch.stack([data[i : i + args.block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + args.block_size] for i in ix.tolist()])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# -- model: a small GPT ------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# -- the run -----------------------------------------------------------------------------------
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
    a(
        "--local-dir",
        default=None,
        help="node-local folder for the fast-restart snapshots (default: under /dev/shm)",
    )
    a(
        "--no-local-snapshots",
        action="store_true",
        help="restarts resume from --checkpoint-dir only, not from node-local snapshots",
    )
    a(
        "--hang-timeout",
        type=float,
        default=300.0,
        help="seconds without a step before the "
        "watchdog exits the rank (0 disables); keep it above the collective timeout",
    )
    a("--hang-grace", type=float, default=600.0, help="extra seconds for step 1, saves, loads")
    a("--collective-timeout", type=float, default=600.0, help="process-group timeout, seconds")
    a("--chaos", default=None, help="faults to inject, e.g. 'crash@40/1' (default: $ARC_CHAOS)")
    a("--chaos-on-restart", action="store_true", help="inject the faults in restarts too")
    a("--log-every", type=int, default=10, help="steps between progress lines on rank 0")
    a(
        "--throttle",
        type=float,
        default=0.0,
        help="sleep per step, seconds: slows a fire drill "
        "down enough to watch it (or to kill a node mid-run) on a fast machine",
    )
    a("--report", default=None, help="append JSON events (start, first step, done) to this file")
    return p


def report(path: str | None, **event) -> None:
    """One JSON line per event; short appends from several ranks do not interleave."""
    if path:
        line = json.dumps({"time": time.time(), **event}) + "\n"
        with open(path, "a") as f:
            f.write(line)


def setup() -> tuple[torch.device, int, int]:
    """Join the process group (when run under torchrun) and pick this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        )
    return device, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(args, wrap: Callable[[nn.Module, torch.device], nn.Module], name: str = "ddp") -> dict:
    """The whole run; ``wrap`` turns the plain model into the data-parallel one."""
    device, rank, world = setup()
    if world > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=args.collective_timeout),
            device_id=device if device.type == "cuda" else None,
        )
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[{name} rank {rank}] %(message)s",
        stream=sys.stdout,
    )

    data = load_corpus(args.corpus_bytes)
    torch.manual_seed(args.seed)  # same initial weights on every rank
    model = wrap(
        GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd).to(device), device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / args.warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    chaos = args.chaos if args.chaos is not None else os.environ.get("ARC_CHAOS", "")
    if restart > 0 and not args.chaos_on_restart:
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
    start = arc.resume()  # collective: the newest healthy checkpoint, if any
    log.info(
        "run %s, restart %d, world size %d, %s: %s; %.1fM parameters, %d corpus bytes, faults: %s",
        run_id,
        restart,
        world,
        device,
        f"resumed at step {start}" if start else "fresh start",
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(data),
        chaos or "none",
    )
    report(
        args.report,
        event="start",
        rank=rank,
        pid=os.getpid(),
        restart=restart,
        world=world,
        step=start,
    )

    recent: list[float] = []
    t_log, first = time.monotonic(), True
    while arc.global_step < args.steps:
        x, y = get_batch(data, arc.global_step, rank, args, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        action = arc.step(loss)  # collective: the same verdict on every rank
        if action.rolled_back:
            log.warning(
                "%s at step %d (ranks %s): rolled back to step %d",
                action.reason,
                action.step,
                list(action.bad_ranks),
                action.step,
            )
        if not action.should_skip:
            opt.step()
            sched.step()
            recent = (recent + [action.loss])[-20:]
        opt.zero_grad(set_to_none=True)
        if first:
            report(
                args.report, event="first_step", rank=rank, restart=restart, step=arc.global_step
            )
            first = False
        if args.throttle:
            time.sleep(args.throttle)
        if rank == 0 and (arc.global_step % args.log_every == 0 or arc.global_step == args.steps):
            dt, t_log = time.monotonic() - t_log, time.monotonic()
            tok_s = args.log_every * args.batch_size * args.block_size * world / max(dt, 1e-9)
            st = arc.stats()
            log.info(
                "step %5d/%d | loss %.4f | %7.0f tok/s | rollbacks %d | checkpoints %d | restart %d",
                arc.global_step,
                args.steps,
                action.loss,
                tok_s,
                st["rollbacks"],
                st["checkpoints"],
                restart,
            )
            report(
                args.report,
                event="step",
                rank=rank,
                restart=restart,
                world=world,
                step=arc.global_step,
                loss=action.loss,
            )
    if ckpt is not None:
        arc.save()  # the final state, durable
    stats = arc.stats()
    arc.close()
    final = sum(recent) / len(recent) if recent else math.nan
    summary = dict(
        step=arc.global_step,
        loss=final,
        restart=restart,
        world=world,
        resumed_from=start,
        stats={k: v for k, v in stats.items() if isinstance(v, (int, float))},
    )
    if rank == 0:
        log.info(
            "done: step %d, loss %.4f (mean of the last %d healthy steps)",
            arc.global_step,
            final,
            len(recent),
        )
        report(args.report, event="done", rank=rank, **summary)
    if world > 1:
        dist.destroy_process_group()
    return summary


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model  # a single process: nothing to replicate
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@main_entry  # an escaping ArcError exits with its code (11: do not retry) for the launcher
def main() -> None:
    train(build_parser().parse_args(), wrap_ddp, "ddp")


if __name__ == "__main__":
    main()
