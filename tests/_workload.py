"""Small deterministic training workloads shared by the multi-process tests and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from arc_dist.silent import replica_digest as params_digest  # noqa: F401 - re-exported for the tests

#: one of every step fault a single process meets (an LR spike needs an attached scheduler)
EVERY_FAULT = (
    "nan_loss@30 grad_explosion@50 lr_spike@70 nan_weights@80 optimizer_reset@95 loss_spike@105"
)
#: what ``train`` reports for it, as (status, reason, rolled back): one-step anomalies skip their
#: update; damaged state (an LR the scheduler does not explain, NaN weights, a reset optimizer)
#: rolls back
EVERY_FAULT_EVENTS = [
    ("warning", "nonfinite_loss", False),
    ("warning", "grad_explosion", False),
    ("failure", "lr_spike", True),
    ("failure", "nonfinite_weights", True),
    ("failure", "optimizer_state", True),
    ("warning", "loss_spike", False),
]


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
        )
    if kind == "lm":
        return TinyLM()
    raise ValueError(kind)


class TinyLM(nn.Module):
    """A one-block transformer language model over a 64-token vocabulary."""

    def __init__(self, vocab: int = 64, dim: int = 32, ctx: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(ctx, dim))
        self.block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.block(self.emb(x) + self.pos[: x.shape[1]]))


class Data:
    """Per-rank batches from a fixed task; the evaluation set is the same on every rank."""

    def __init__(self, kind: str, rank: int, seed: int = 0, batch: int = 32):
        self.kind, self.batch = kind, batch
        self.gen = torch.Generator().manual_seed(1000 * seed + rank + 1)
        g = torch.Generator().manual_seed(12345)
        if kind == "mlp":
            self.w = torch.randn(16, 1, generator=g)
            self.eval = self._make(torch.Generator().manual_seed(999), 256)
        else:
            self.eval = self._make(torch.Generator().manual_seed(999), 64)

    def _make(self, gen, n):
        if self.kind == "mlp":
            x = torch.randn(n, 16, generator=gen)
            return x, torch.sin(x @ self.w)
        start = torch.randint(0, 64, (n, 1), generator=gen)
        seq = (start + 3 * torch.arange(17)) % 64  # a learnable arithmetic sequence
        return seq[:, :-1], seq[:, 1:]

    def next(self):
        return self._make(self.gen, self.batch)

    def loss(self, model, batch):
        x, y = batch
        out = model(x)
        if self.kind == "mlp":
            return nn.functional.mse_loss(out, y)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def eval_loss(model, data: Data) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        v = float(data.loss(model, data.eval))
        model.train(was)
    return v


def train(
    model,
    opt,
    arc,
    data: Data,
    steps: int,
    max_calls: int | None = None,
    sched=None,
    clip: float | None = None,
    before_step=None,
):
    """The contract's loop; returns the list of non-healthy actions (as tuples).
    ``before_step(global_step)`` runs before each forward."""
    events = []
    calls = 0
    while arc.global_step < steps:
        calls += 1
        if max_calls is not None and calls > max_calls:
            raise RuntimeError(f"loop did not reach {steps} steps in {max_calls} calls")
        if before_step is not None:
            before_step(arc.global_step)
        loss = data.loss(model, data.next())
        loss.backward()
        if clip is not None:  # the job clips anyway: Arc reuses the norm
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            action = arc.step(loss, grad_norm=norm)
        else:
            action = arc.step(loss)
        if action.status != "healthy":
            events.append(
                (action.step, action.status, action.reason, action.bad_ranks, action.rolled_back)
            )
        if not action.should_skip:
            opt.step()
            if sched is not None:
                sched.step()
        opt.zero_grad(set_to_none=True)
    return events


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finite(x: float) -> bool:
    return math.isfinite(x)
