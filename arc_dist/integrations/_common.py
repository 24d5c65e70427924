"""What the framework integrations share.

* :class:`LossAccumulator`: the loss of one optimizer step, summed over its micro-batches
  (frameworks divide each micro-batch's loss by the accumulation count before backward, so the
  sum is the step's mean loss), kept on the device: no host sync.
* :class:`HeldSchedule`: after ``Arc.step`` says skip, the framework still calls
  ``scheduler.step()`` (Lightning and the HF Trainer step schedulers unconditionally after the
  optimizer step). The contract of ``Arc.step`` is that a skipped update advances nothing, so
  the scheduler state and the optimizer's learning rates are held at the skip and put back
  once the framework has stepped the scheduler.
* :func:`unwrap_optimizer`, :func:`unwrap_scheduler`: the torch objects under framework wrappers
  (accelerate's ``AcceleratedOptimizer``/``AcceleratedScheduler``), which Arc snapshots.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

#: keyword arguments of ``Arc`` that an integration supplies itself
RESERVED = ("model", "optimizer", "scheduler", "scaler")


def check_arc_kwargs(owner: str, kwargs: dict) -> dict:
    taken = [k for k in RESERVED if k in kwargs]
    if taken:
        raise TypeError(
            f"{owner}(**arc_kwargs) takes Arc's keyword arguments (checkpoint_dir, config, chaos, "
            f"log_dir, ...), not {taken}: the {owner} takes the model, optimizer and scheduler "
            "from the trainer"
        )
    return dict(kwargs)


class LossAccumulator:
    """Sums the detached losses of one optimizer step's micro-batches."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        if loss.numel() != 1:
            loss = loss.mean()
        self._sum = loss if self._sum is None else self._sum + loss

    def take(self) -> torch.Tensor | None:
        """The step's loss (None if no micro-batch reported one), and reset."""
        out, self._sum = self._sum, None
        return out


class HeldSchedule:
    """Scheduler states and learning rates at a skipped step, to put back after the framework
    has stepped the schedulers anyway."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedulers: Iterable[Any]):
        self._optimizer = optimizer
        self._lrs = [g["lr"] for g in optimizer.param_groups]
        self._states = [(s, copy.deepcopy(s.state_dict())) for s in schedulers if s is not None]

    def restore(self) -> None:
        for sched, state in self._states:
            sched.load_state_dict(state)
        for group, lr in zip(self._optimizer.param_groups, self._lrs):
            group["lr"] = lr


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` under accelerate's ``AcceleratedOptimizer`` (or itself)."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer).__name__ == "AcceleratedOptimizer" and isinstance(
        inner, torch.optim.Optimizer
    ):
        return inner
    return optimizer


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler under accelerate's ``AcceleratedScheduler`` (or itself)."""
    if type(scheduler).__name__ == "AcceleratedScheduler":
        return scheduler.scheduler
    return scheduler


def drop_grads(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming ``optimizer.step()`` a no-op: torch optimizers skip parameters whose
    ``grad`` is None, so neither the weights nor the state (Adam's step count and moments) move.
    ``Arc.step`` already does this on skip and rollback; this keeps the integrations safe if a
    framework hook ran in between."""
    optimizer.zero_grad(set_to_none=True)
