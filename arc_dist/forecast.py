"""Early warning: a forecast of instability from the agreed gradient norm (off by default).

The rule reads only the global gradient norm of each applied step, a value every rank holds
after the agreement, and keeps two exponential moving averages of its log: a forecast fires
when the short one (half-life 3 steps) rises ``threshold`` above the long one (half-life 50
steps, before the step). Every rank therefore forecasts the same step, with no collective and
no host sync of its own, at O(1) cost per step.

It is off by default because it does not meet the early-warning target: on the organic corpus
(docs/early_warning.md) it warns of no failure 100 steps ahead; what it warns of ten steps
ahead is a divergence already under way. A forecast never skips or rolls back: it pins a
snapshot of the next verified state (so a rollback after it goes back a few steps, not a
whole snapshot interval) and, when ``lr_factor`` is set, lowers the LR for a while.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import EarlyWarning

if TYPE_CHECKING:
    from .lr import LRGuard
    from .observe.recorder import Recorder
    from .policy import Verdict

#: a verdict's healthy status (policy.Status.HEALTHY; policy.py imports torch, this module not)
HEALTHY = "healthy"

#: the Action reason of a forecast
REASON = "instability_forecast"


def _alpha(halflife: float) -> float:
    """The EMA weight of a new value for ``halflife`` steps (pandas' ``ewm(halflife=)``)."""
    return 1.0 - math.exp(-math.log(2.0) / halflife)


class GradGrowth:
    """The score: short EMA of ``log grad_norm`` (this step included) minus the long EMA of the
    steps before it, in natural-log units (1.0: the recent norm is e times its long-run level).

    Log space makes it scale-free, so one threshold carries over between models; the short EMA
    smooths the per-batch noise that a one-step ratio would fire on.
    """

    SHORT, LONG = 3.0, 50.0

    def __init__(self) -> None:
        self._a_short, self._a_long = _alpha(self.SHORT), _alpha(self.LONG)
        self.short = self.long = math.nan
        self.seen = 0  # finite values fed

    def update(self, grad_norm: float) -> float:
        """Feed one step's gradient norm; its score (NaN for the first value, or a value that is
        not finite and positive: it is not fed)."""
        if not (math.isfinite(grad_norm) and grad_norm > 0):
            return math.nan
        x = math.log(grad_norm)
        self.seen += 1
        if self.seen == 1:
            self.short = self.long = x
            return math.nan
        self.short += self._a_short * (x - self.short)
        score = self.short - self.long
        self.long += self._a_long * (x - self.long)
        return score

    def settle(self) -> None:
        """After a rollback: the recent level belongs to the abandoned trajectory."""
        self.short = self.long

    def state_dict(self) -> dict:
        return {"short": self.short, "long": self.long, "seen": self.seen}

    def load_state_dict(self, sd: dict) -> None:
        self.short, self.long, self.seen = float(sd["short"]), float(sd["long"]), int(sd["seen"])


class Forecaster:
    """Arc's side of the rule: when to forecast, when to pin, and the cooldown.

    Fed with every applied step's verdict (identical on every rank), so its state, and with it
    every forecast, is the same on every rank. A forecast fires on a healthy step once the
    score passes the threshold, at least ``min_steps`` fed steps in and ``cooldown`` steps after
    the previous one. The pin is due on the next step, which Arc then treats as a snapshot step
    (deep and divergence checks run), and is taken only if that step is judged healthy.
    """

    def __init__(self, config: EarlyWarning) -> None:
        self.config = config
        self.rule = GradGrowth()
        self.pin_due = False
        self._quiet_until = 0  # no forecast before this step (cooldown)

    def observe(self, step: int, verdict: Verdict, lr: LRGuard, rec: Recorder) -> bool:
        """After an applied update at ``step``: is it a forecast? If so, lower the LR when
        configured and record it. Does nothing when early warning is off."""
        c = self.config
        if not c.enabled:
            return False
        score = self.rule.update(verdict.grad_norm)
        if (
            verdict.status != HEALTHY
            or not score > c.threshold
            or self.rule.seen <= c.min_steps
            or step < self._quiet_until
        ):
            return False
        self._quiet_until = step + c.cooldown
        self.pin_due = True
        factor = 1.0 if c.lr_factor is None else c.lr_factor
        lr.lower(factor, step + 1)
        rec.forecast(step, {"score": score, "threshold": c.threshold, "grad_norm":
                            verdict.grad_norm, "lr_factor": factor, "lr_scale": lr.scale})  # fmt: skip
        return True

    def pinned(self, verdict: Verdict) -> bool:
        """On the step after a forecast (an applied update): pin now? Only a healthy state is
        pinned; either way the pin is no longer due."""
        due, self.pin_due = self.pin_due, False
        return due and verdict.status == HEALTHY

    def on_rollback(self) -> None:
        self.rule.settle()
        self.pin_due = False

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict(), "quiet_until": self._quiet_until}

    def load_state_dict(self, sd: dict | None) -> None:
        """``None``: a checkpoint from before early warning existed; start afresh."""
        self.rule = GradGrowth()
        self._quiet_until = 0
        self.pin_due = False
        if sd:
            self.rule.load_state_dict(sd["rule"])
            self._quiet_until = int(sd["quiet_until"])
