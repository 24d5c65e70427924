"""A small byte-level GPT and its data, for the training examples beside this file.

The data is Python's own standard library (its top-level ``.py`` files, read as bytes), so the
examples need no download and every rank of every node reads the same corpus. A batch is a pure
function of (seed, step, rank): a run resumed at step ``s`` trains on exactly the batches an
uninterrupted run would have, with no data-loader state to save.
"""

from __future__ import annotations

import glob
import math
import os

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256  # bytes


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The stdlib's top-level ``.py`` files, sorted and concatenated: the same bytes everywhere."""
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def get_batch(
    data: torch.Tensor, *, step: int, rank: int, batch_size: int, block_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s inputs and next-byte targets at ``step`` (CPU tensors)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    starts = torch.randint(0, len(data) - block_size - 1, (batch_size,), generator=g).tolist()
    x = torch.stack([data[i : i + block_size] for i in starts])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in starts])
    return x, y


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

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
    def __init__(self, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-byte logits, shape (batch, time, 256)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def configure_optimizers(
        self, lr: float, warmup: int, steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW with a linear warm-up over ``warmup`` steps, then a cosine decay to 0 at ``steps``.

        Call it after wrapping (DDP, FSDP): the optimizer must hold the parameters that train.
        """
        opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
            ),
        )
        return opt, sched


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
