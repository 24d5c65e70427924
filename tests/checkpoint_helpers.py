"""Helpers of the checkpoint tests: a tiny deterministic workload (ranks: tests/_dist.py)."""

from __future__ import annotations

import torch
from torch import nn


def make_model(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank: DDP's averaged gradient equals the single-process one."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x[:, :2])


def train_steps(model: nn.Module, opt, start: int, stop: int, scheduler=None) -> None:
    for step in range(start, stop):
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad(set_to_none=True)


def make_optimizer(model: nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return opt, sched


def reference_state(steps: int, seed: int = 0, width: int = 16) -> dict[str, torch.Tensor]:
    """The model after ``steps`` training steps, trained in this process (no DDP)."""
    model = make_model(seed, width)
    opt, sched = make_optimizer(model)
    train_steps(model, opt, 0, steps, sched)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded, un-prefixed) CPU state of a plain, DDP or FSDP2 model; collective for FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


class Position:
    """A user object (e.g. a data loader position) registered next to the training state."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.seen: list[int] = []

    def state_dict(self) -> dict:
        return {"value": self.value, "seen": list(self.seen), "extra": {}}

    def load_state_dict(self, sd: dict) -> None:
        self.value = int(sd["value"])
        self.seen = list(sd["seen"])
