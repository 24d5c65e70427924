"""The learning rate's part in recovery: spotting a spike, backing off, restoring.

A spike is an LR that nothing explains: not the attached scheduler's last value, nor (without a
scheduler) the LR of the previous step. After a rollback every group's LR is multiplied by the
backoff factor, and so are the scheduler's bases, so its next step does not undo it; once
training is ``recovery_steps`` past the failure, the factor is undone step by step.
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
        self._expected: list[float] | None = None

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def remember(self) -> None:
        """The current LRs are explained (Arc or the scheduler set them)."""
        self._expected = self.lrs()

    def ratio(self) -> float:
        """How far the current LR exceeds what explains it (max over param groups)."""
        lrs = self.lrs()
        expected = self._expected
        if self.scheduler is not None and hasattr(self.scheduler, "get_last_lr"):
            try:
                expected = [float(x) for x in self.scheduler.get_last_lr()]
            except (AttributeError, RuntimeError):
                pass
        if not expected or len(expected) != len(lrs):
            return 1.0
        ratios = [lr / e if e > 0 else (1.0 if lr <= 0 else math.inf) for lr, e in zip(lrs, expected)]
        finite = all(math.isfinite(r) for r in ratios) and all(math.isfinite(x) for x in lrs)
        return max(ratios) if finite else math.inf

    def back_off(self, snapshot_scale: float, failed_at: int) -> None:
        """After restoring a snapshot taken under ``snapshot_scale``: one more backoff."""
        self.scale *= self.backoff
        self._apply(self.scale / snapshot_scale)
        self.remember()
        self._restore_at = failed_at + self.recovery_steps

    def maybe_restore(self, step: int, rank: int) -> None:
        """Undo one backoff factor once ``recovery_steps`` healthy steps passed."""
        if not self.restore or self.scale >= 1.0 or step < self._restore_at:
            return
        factor = min(1.0 / self.backoff, 1.0 / self.scale)
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
