"""The arc-dist demo: a 2-rank DDP run that survives injected faults.

Trains the same small language model twice on every rank: once fault-free, once with faults
injected on rank 1 (a NaN loss, a gradient explosion, an LR spike; override with ``ARC_CHAOS``),
then prints what arc-dist saw and did, and the two final losses side by side.

    torchrun --standalone --nproc-per-node 2 examples/demo.py      # or: bash launch/demo.sh

``ARC_DEMO_STEPS`` shortens it (the tests run 150 steps).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig

STEPS = int(os.environ.get("ARC_DEMO_STEPS", 300))
FAULTS = os.environ.get("ARC_CHAOS", "nan_loss@60/1 grad_explosion@130/1 lr_spike@200/1")
TEXT = (open(os.__file__).read() * 2)[:200_000]  # a corpus that ships with Python
VOCAB = sorted(set(TEXT))
DATA = torch.tensor([VOCAB.index(c) for c in TEXT], dtype=torch.long)


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, ctx: int = 32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(ctx, dim))
        self.block = nn.TransformerEncoderLayer(
            dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(
            self.block(h, src_mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        )


def batches(rank: int, ctx: int = 32, batch: int = 16):
    g = torch.Generator().manual_seed(rank)
    while True:
        i = torch.randint(0, len(DATA) - ctx - 1, (batch,), generator=g)
        yield (
            torch.stack([DATA[j : j + ctx] for j in i]),
            torch.stack([DATA[j + 1 : j + ctx + 1] for j in i]),
        )


def run(chaos: str | None, rank: int) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = DDP(CharLM(len(VOCAB)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    arc = Arc(model, opt, sched, config=ArcConfig(snapshot_every=20), chaos=chaos or "")
    data, recent = batches(rank), []
    while arc.global_step < STEPS:
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        action = arc.step(loss)  # one collective; the same verdict on every rank
        if rank == 0 and action.status != "healthy":
            what = "continuing"
            if action.rolled_back:  # damaged state, or trouble that persisted
                what = f"rolled back to step {action.step}"
            elif action.should_skip:  # a one-step anomaly: the state is intact without its update
                what = "update skipped"
            print(
                f"  verdict {action.status:8s} {action.reason:16s} ranks {list(action.bad_ranks)} -> {what}"
            )
        if not action.should_skip:
            opt.step()
            sched.step()
            recent = (recent + [action.loss])[-20:]
        opt.zero_grad(set_to_none=True)
    stats = arc.stats()
    arc.close()
    return sum(recent) / len(recent), stats


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if rank == 0:
        print(f"arc-dist demo: {world} ranks, DDP on CPU, {STEPS} steps of a character-level LM")
        print("1) fault-free run")
    t0 = time.time()
    clean, _ = run(None, rank)
    if rank == 0:
        print(
            f"   final loss {clean:.4f} ({time.time() - t0:.1f}s)\n2) faulty run, chaos: {FAULTS}"
        )
    t0 = time.time()
    faulty, stats = run(FAULTS, rank)
    if rank == 0:
        print(f"   final loss {faulty:.4f} ({time.time() - t0:.1f}s)")
        print(f"\n{'run':12s}{'final loss':>12s}{'rollbacks':>11s}{'skips':>7s}{'steps':>7s}")
        print(f"{'fault-free':12s}{clean:12.4f}{0:11d}{0:7d}{STEPS:7d}")
        counts = f"{stats['rollbacks']:11d}{stats['skips']:7d}{stats['steps']:7d}"
        print(f"{'faulty':12s}{faulty:12.4f}{counts}")
        ok = abs(faulty - clean) <= 0.15 * clean
        print("recovered: final loss within 15% of the fault-free run" if ok else "NOT recovered")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
