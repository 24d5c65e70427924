"""The learning rate's part in recovery: evidence of a spike, backing off, restoring.

Arc keeps its LR backoff as a multiplier on whatever LR the training loop asks for:

* **with a scheduler** attached to Arc, the backoff also scales the scheduler's bases, so its
  next step keeps it; an LR more than ``lr_ratio_fail`` times what the scheduler says is
  evidence of a spike (nothing explains it);
* **without one**, the loop owns the schedule (a warm-up from 0, any manual schedule): an LR the
  loop sets is change, not damage. Arc notices the loop changed the LR since Arc last left it and
  applies its backoff on top (the loop sets the LR before ``arc.step``, ``optimizer.step``
  follows it). A too-high LR then shows in what it does to the loss, gradients and weights; a
  spike on some ranks only shows as ranks disagreeing on the LR (policy.py).

A non-finite LR is a spike either way. After a rollback that backs off, every group's LR is
multiplied by the backoff factor; once training is ``recovery_steps`` past the failure, the
factor is undone step by step. An instability forecast with ``early_warning.lr_factor`` lowers
the LR through the same scale, undone the same way.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger("arc_dist")


class LRGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, *, backoff: float,
                 restore: bool, recovery_steps: int):  # fmt: skip
        self.optimizer, self.scheduler = optimizer, scheduler
        self.backoff, self.restore, self.recovery_steps = backoff, restore, recovery_steps
        #: product of the backoffs in force (1.0: none)
        self.scale = 1.0
        self._restore_at = 0
        self._applied: list[float] | None = None  # the LRs as Arc last left them

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def remember(self) -> None:
        """The current LRs are the ones Arc applies."""
        self._applied = self.lrs()

    def follow_loop(self) -> None:
        """Before a step is judged: an LR the loop set since Arc last left it is the loop's own
        schedule; Arc's backoff applies on top of it. With a scheduler, its bases carry the
        backoff already."""
        if self.scheduler is None and self._applied is not None and self.scale != 1.0:
            for i, g in enumerate(self.optimizer.param_groups):
                lr = g["lr"]
                if isinstance(lr, (int, float)) and (
                    i >= len(self._applied) or lr != self._applied[i]
                ):
                    g["lr"] = lr * self.scale
        self.remember()

    def ratio(self) -> float:
        """How far the current LR exceeds the attached scheduler's (max over param groups);
        1.0 without a scheduler, inf for a non-finite LR."""
        lrs = self.lrs()
        if not all(math.isfinite(x) for x in lrs):
            return math.inf
        if self.scheduler is None or not hasattr(self.scheduler, "get_last_lr"):
            return 1.0
        try:
            expected = [float(x) for x in self.scheduler.get_last_lr()]
        except (AttributeError, RuntimeError):
            return 1.0
        if len(expected) != len(lrs):
            return 1.0
        ratios = [
            lr / e if e > 0 else (1.0 if lr <= 0 else math.inf) for lr, e in zip(lrs, expected)
        ]
        return max(ratios)

    def after_restore(self, snapshot_scale: float, failed_at: int, back_off: bool) -> None:
        """After restoring a snapshot taken under ``snapshot_scale``: the backoff in force, one
        more factor when the failure recurred."""
        if back_off:
            self.scale *= self.backoff
            self._restore_at = failed_at + self.recovery_steps
        self._apply(self.scale / snapshot_scale)
        self.remember()

    def lower(self, factor: float, step: int) -> None:
        """A pre-emptive lowering (an instability forecast, forecast.py): one more factor in the
        scale, undone as the backoff is, from ``recovery_steps`` after ``step`` on."""
        if factor == 1.0:
            return
        self.scale *= factor
        self._restore_at = max(self._restore_at, step + self.recovery_steps)
        self._apply(factor)

    def maybe_restore(self, step: int, rank: int) -> None:
        """Undo one backoff factor once ``recovery_steps`` healthy steps passed (the whole scale
        when ``lr_backoff`` is 1: then only a forecast's lowering can be in force)."""
        if not self.restore or self.scale >= 1.0 or step < self._restore_at:
            return
        factor = min(1.0 / self.backoff if self.backoff < 1.0 else math.inf, 1.0 / self.scale)
        self.scale *= factor
        self._apply(factor)
        self._restore_at = step + self.recovery_steps
        if rank == 0:
            log.info("arc_dist: recovered at step %d; lr scale back to %.3g", step, self.scale)

    def state_dict(self) -> dict:
        """The backoff in force and the step that may undo one factor of it (checkpointed)."""
        return {"scale": self.scale, "restore_at": self._restore_at}

    def load_state_dict(self, state: dict) -> None:
        """Only the bookkeeping: the LRs themselves come back with the optimizer and scheduler."""
        self.scale = float(state["scale"])
        self._restore_at = int(state["restore_at"])

    def _apply(self, factor: float) -> None:
        if factor == 1.0:
            return
        for g in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in g and isinstance(g[key], (int, float)):
                    g[key] = g[key] * factor
        sched = self.scheduler
        if sched is not None:
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [x * factor for x in sched.base_lrs]
            if hasattr(sched, "_last_lr"):
                sched._last_lr = [x * factor for x in sched._last_lr]
