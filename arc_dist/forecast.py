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
    every forecast, is the same on every rank. A forecast fires on a healthy step whose score
    passes the threshold, at least ``min_steps`` fed steps in, ``cooldown`` steps after the
    previous one, and only once per excursion: the score must fall back to the threshold first
    (a level shift that stays, such as layers unfrozen, is one forecast, not one per cooldown;
    one that starts within ``min_steps`` or the cooldown is none). The pin is due on the next
    step, which Arc then treats as a snapshot step (deep and divergence checks run), and is
    taken only if that step is judged healthy.
    """

    def __init__(self, config: EarlyWarning) -> None:
        self.config = config
        self.rule = GradGrowth()
        self.pin_due = False
        self._quiet_until = 0  # no forecast before this step (cooldown)
        self._armed = True  # the score was at or below the threshold since the last forecast

    def observe(self, step: int, verdict: Verdict) -> float | None:
        """After an applied update at ``step``: its score when it is a forecast, else None.
        Does nothing when early warning is off."""
        c = self.config
        if not c.enabled:
            return None
        score = self.rule.update(verdict.grad_norm)
        if not score > c.threshold:
            self._armed = True  # NaN included: a missing value ends an excursion too
            return None
        if not self._armed or verdict.status != HEALTHY:
            return None
        self._armed = False  # an excursion that starts too early or in the cooldown is not one
        if self.rule.seen <= c.min_steps or step < self._quiet_until:
            return None
        self._quiet_until = step + c.cooldown
        self.pin_due = True
        return score

    def act(self, step: int, score: float, grad_norm: float, lr: LRGuard, rec: Recorder) -> None:
        """What Arc does about a forecast besides the pin: lower the LR when configured (from
        the next update on: ``step + 1``), and record it."""
        factor = 1.0 if self.config.lr_factor is None else self.config.lr_factor
        lr.lower(factor, step + 1)
        values = dict(score=score, threshold=self.config.threshold, grad_norm=grad_norm)
        rec.forecast(step, {**values, "lr_factor": factor, "lr_scale": lr.scale})

    def pinned(self, verdict: Verdict) -> bool:
        """On the step after a forecast (an applied update): pin now? Only a healthy state is
        pinned; either way the pin is no longer due."""
        due, self.pin_due = self.pin_due, False
        return due and verdict.status == HEALTHY

    def on_rollback(self) -> None:
        self.rule.settle()
        self.pin_due = False

    def state_dict(self) -> dict:
        return {"rule": self.rule.state_dict(), "quiet_until": self._quiet_until,
                "armed": self._armed}  # fmt: skip

    def load_state_dict(self, sd: dict | None) -> None:
        """``None``: a checkpoint from before early warning existed; start afresh."""
        self.rule = GradGrowth()
        self._quiet_until, self._armed, self.pin_due = 0, True, False
        if sd:
            self.rule.load_state_dict(sd["rule"])
            self._quiet_until, self._armed = int(sd["quiet_until"]), bool(sd["armed"])
