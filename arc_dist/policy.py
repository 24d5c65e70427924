"""Decisions: pure functions of the agreed signal matrix and of history every rank shares.

Every rank feeds the same ``[world_size, NUM_COLS]`` matrix (the result of one SUM all-reduce)
into the same :class:`HealthPolicy`, whose history only ever changes as a function of those
matrices, so every rank computes the same :class:`Verdict` bit for bit: no rank-local decision
can desynchronise the replicas. Nothing here touches torch or the process group, so the logic
is tested without processes.

The policy tells damage from change (docs/policy.md). A signal of one step (the loss, the
gradient norm) can be withheld with the update: a non-finite value or an extreme outlier is a
*skip*, which leaves the model and optimizer as they were. Only evidence that the state itself
is damaged (non-finite or jumping weights or optimizer state, replicas that differ, an LR that
contradicts the scheduler or the other ranks), or trouble that persists over ``max_skips + 1``
consecutive steps, is a *failure* that rolls back. Parameters gaining or losing optimizer
state, schedules the loop sets and heavy-tailed per-batch losses are change, not damage.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .config import Thresholds
from .layout import Layout
from .signals import Col, StateFlag
from .silent import divergent_ranks


class Status(enum.StrEnum):
    """A verdict's status (the values appear in events, stats and checkpoint metadata)."""

    HEALTHY = "healthy"
    #: an anomaly of this step: the update is skipped (``Verdict.skip``) or only reported
    WARNING = "warning"
    #: evidence of damaged state, or trouble that persists: roll back
    FAILURE = "failure"


HEALTHY, WARNING, FAILURE = Status.HEALTHY, Status.WARNING, Status.FAILURE

#: MAD -> standard deviation for normally distributed data
_MAD_SCALE = 1.4826
#: (90th percentile - median) -> standard deviation for normally distributed data
_Q90_SCALE = 1.2816


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Status
    reason: str | None = None
    bad_ranks: tuple[int, ...] = ()
    #: mean loss over ranks (NaN when a rank's loss was not finite)
    loss: float = math.nan
    #: global gradient norm (see layout.py for how ranks combine)
    grad_norm: float = math.nan
    #: values behind the verdict, for logs and events
    details: dict = field(default_factory=dict)
    #: withhold this step's update (a warning whose state is intact without it)
    skip: bool = False

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY


@dataclass(frozen=True, slots=True)
class WindowStats:
    #: median of the window, in the signal's own units
    median: float
    #: largest of the most recent values, in the signal's own units
    recent: float
    #: the window's upper spread as a standard deviation, in log units when ``log``
    spread: float
    #: the statistics are of log(values) (every value was > 0)
    log: bool
    #: the median in the units of ``spread``
    center: float


class RobustWindow:
    """Robust statistics of the last ``size`` values of a signal whose updates were applied.

    Positive series (losses, gradient norms) are judged in log space: per-batch losses of small
    batches are heavy-tailed, and a multiplicative jump is what a spike is. The spread is that of
    the window's *upper* tail, ``(q90 - median) / 1.28`` (never below the MAD's), so a stream
    whose upper tail is long needs a proportionally larger jump to count. Statistics are cached
    between additions: ``judge`` runs every step and must stay cheap.
    """

    #: values that form the "recent" reference of the ratio test
    RECENT = 5
    #: additions between recomputations of the quantiles once the window is full
    REFRESH = 8

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self._robust: tuple[float, float, float, bool] | None = None
        self._stats: WindowStats | None = None
        self._since = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        self.values.append(float(x))
        self._stats = None
        self._since += 1
        # quantiles over ~100 values move slowly: refreshing them every few steps is enough
        if len(self.values) < self.values.maxlen or self._since >= self.REFRESH:
            self._robust = None

    def clear(self) -> None:
        self.values.clear()
        self._robust = self._stats = None

    def stats(self) -> WindowStats:
        if self._stats is not None:
            return self._stats
        if self._robust is None:
            # one sort of ~100 values gives every quantile (numpy's own definitions, without
            # np.median/np.quantile's per-call overhead)
            a = np.sort(np.fromiter(self.values, dtype=np.float64, count=len(self.values)))
            log = bool(a[0] > 0)
            y = np.log(a) if log else a  # log is monotonic: y stays sorted
            med = _quantile(y, 0.5)
            upper = (_quantile(y, 0.9) - med) / _Q90_SCALE
            mad = _MAD_SCALE * _quantile(np.sort(np.abs(y - med)), 0.5)
            # a floor so that a near-constant series does not make every wiggle significant
            floor = 1e-3 if log else max(1e-3 * abs(med), 1e-12)
            self._robust = (_quantile(a, 0.5), max(upper, mad, floor), med, log)
            self._since = 0
        n = len(self.values)
        recent = max(self.values[i] for i in range(max(0, n - self.RECENT), n))
        med_raw, spread, center, log = self._robust
        self._stats = WindowStats(med_raw, recent, spread, log, center)
        return self._stats


def _quantile(s: np.ndarray, q: float) -> float:
    """The ``q`` quantile of the sorted ``s`` as ``np.quantile`` computes it (linear)."""
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    a, b, t = float(s[lo]), float(s[min(lo + 1, len(s) - 1)]), pos - lo
    if q == 0.5 and len(s) % 2 == 0:
        return (a + b) / 2  # np.median: the mean of the middle two
    # numpy's _lerp, exact at both ends
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _spike(x: float, window: RobustWindow, z_thr: float, ratio: float) -> tuple[bool, float]:
    """(x spikes, its robust z-score against the window's upper tail).

    A spike needs both a z-score above ``z_thr`` and ``x - ref > (ratio - 1) |ref|``, the
    reference being the larger of the window's median and its most recent values: the z-score
    alone fires on low-noise runs, a ratio alone on noisy or trending ones (gradient norms often
    grow for a while); a real spike jumps above both.
    """
    if len(window) < 3:
        return False, 0.0
    s = window.stats()
    if s.log:
        if not x > 0:
            return False, -math.inf  # a drop to zero or below is not a spike
        z = (math.log(x) - s.center) / s.spread
    else:
        z = (x - s.center) / s.spread
    ref = max(s.median, s.recent)
    return (z > z_thr and x - ref > (ratio - 1.0) * abs(ref)), z


def _blame(values, refs, ratio: float) -> tuple[int, ...]:
    """Ranks whose own value passes the ratio test against their reference; the standouts when
    none does on its own (the spike only shows in the combined value)."""
    bad = tuple(
        r for r, (v, ref) in enumerate(zip(values, refs)) if v - ref > (ratio - 1.0) * abs(ref)
    )
    return bad or _standouts(values)


def _standouts(values) -> tuple[int, ...]:
    """Ranks whose value is at least half way from the median to the maximum (one culprit in a
    crowd is named alone; when all ranks agree, all are named)."""
    values = np.asarray(values, dtype=np.float64)
    med = float(np.median(values))
    top = float(values.max())
    if not math.isfinite(top) or top <= med:
        return tuple(range(len(values)))
    return tuple(int(r) for r in np.nonzero(values >= med + 0.5 * (top - med))[0])


#: the columns :meth:`HealthPolicy.judge` reads as lists (the deep checks read the matrix)
_JUDGED_COLS = (Col.GRAD_SQ, Col.LOCAL_GRAD_SQ, Col.LOSS, Col.LOSS_VALID, Col.LR_RATIO, Col.LR,
                Col.LATE_LOSS, Col.LATE_VALID, Col.LOSS_JUDGED)  # fmt: skip
_JUDGED_IDX = np.array(_JUDGED_COLS)  # the index, built once
#: ``x > 0`` as a C-level callable, for ``map`` over a column (NaN: False)
_positive = (0.0).__lt__


def _odd_lrs(lrs, limit: float) -> tuple[int, ...]:
    """Ranks whose LR is more than ``limit`` times off the (lower) median rank's: ranks that run
    one model set the same LR, whatever schedule the loop follows."""
    first = lrs[0]
    if lrs.count(first) == len(lrs):  # the usual case, one LR: the test below for that value
        return tuple(range(len(lrs))) if first > limit * first else ()
    ref = sorted(lrs)[(len(lrs) - 1) // 2]
    return tuple(r for r, x in enumerate(lrs) if x > limit * ref or ref > limit * x)


class HealthPolicy:
    """Turns an agreed signal matrix into a verdict; owns the run's robust statistics.

    ``judge`` is pure; ``observe`` updates the history and must be called with the verdict that
    ``judge`` returned, on every rank, for every judged step (``applied=False`` when the update
    was not applied). ``streak`` counts consecutive skipped steps: the ``max_skips + 1``-th
    anomaly in a row is persistent trouble and a failure.
    """

    def __init__(self, thresholds: Thresholds, layout: Layout, world_size: int, max_skips: int = 2):
        self.t = thresholds
        self.layout = layout
        self.world_size = world_size
        self.max_skips = max_skips
        self.loss = RobustWindow(thresholds.window)
        self.grad = RobustWindow(thresholds.window)
        self.healthy_seen = 0  # applied steps learnt from
        self.streak = 0
        # each rank's own gradient squared norms on recent applied steps (who is to blame)
        self.own: deque[list[float]] = deque(maxlen=thresholds.window)
        # per-rank weight squared norms at the last deep check on this trajectory
        self.last_weight: np.ndarray | None = None

    # -- pure ---------------------------------------------------------------------------
    def combine_grad_sq(self, g) -> float:
        """Squared norms of the ranks' rows -> the global squared norm (see layout.py)."""
        if self.layout == Layout.SHARDED:
            return float(sum(g))
        if self.layout == Layout.INDEPENDENT:
            return float(max(g))
        return float(sum(g)) / len(g)

    @property
    def warm(self) -> bool:
        return self.healthy_seen >= self.t.warmup_steps

    def judge(self, m: np.ndarray, *, amp: bool = False) -> Verdict:
        # every step runs this on a [world, NUM_COLS] matrix: plain Python over its columns is
        # several times cheaper than numpy calls on arrays this small; only the columns read
        # here become lists (their cost grows with the world size)
        t = self.t
        cols = dict(zip(_JUDGED_COLS, m[:, _JUDGED_IDX].T.tolist()))
        gsq, own = cols[Col.GRAD_SQ], cols[Col.LOCAL_GRAD_SQ]
        finite_grads = all(map(math.isfinite, gsq)) and all(map(math.isfinite, own))
        grad_norm = math.sqrt(self.combine_grad_sq(gsq)) if finite_grads else math.nan
        losses, loss = self._losses(cols)
        base = dict(loss=loss, grad_norm=grad_norm)

        def fail(reason: str, ranks, **details) -> Verdict:
            return Verdict(FAILURE, reason, tuple(int(r) for r in ranks), details=details, **base)

        # 1. evidence of damaged state: roll back
        if m[0, Col.DEEP]:
            v = self._judge_deep(m, base)
            if v is not None:
                return v
        if m[0, Col.FP_CHECK]:
            bad = divergent_ranks(m[:, Col.FINGERPRINT])
            if bad:
                return fail("replica_divergence", bad, fingerprints=m[:, Col.FINGERPRINT].tolist())
        ratio = cols[Col.LR_RATIO]
        limit, bad = float(t.lr_ratio_fail), []
        if not all(map(limit.__ge__, ratio)):
            bad = [r for r, x in enumerate(ratio) if not x <= limit]  # NaN included
        if not bad and self.layout != Layout.INDEPENDENT and len(ratio) > 1:
            bad = _odd_lrs(cols[Col.LR], t.lr_ratio_fail)
        if bad:
            return fail("lr_spike", bad, lr_ratio=ratio, lr=cols[Col.LR])

        # 2. this step's own signals: skip the update, or warn. The previous step's loss, when
        # it rode on DDP's all-reduce unjudged, is judged too: its update is applied already, but
        # a skip-level anomaly there counts towards the streak and a lesser one is reported.
        late = self._judge_late(cols)
        streak = self.streak + (late is not None and late.skip)
        judged = any(map(_positive, cols[Col.LOSS_JUDGED]))  # reported only
        v = None if judged else self._judge_loss(losses, loss)
        if v is not None and v.skip:
            return self._escalate(v, base, streak)
        if not finite_grads:
            if amp:  # the GradScaler skips this update and lowers its scale: not a fault
                return Verdict(WARNING, "amp_overflow", (), skip=True, **base)
            bad = tuple(r for r, x in enumerate(own) if not math.isfinite(x))
            v = Verdict(WARNING, "nonfinite_grad", bad or tuple(range(len(gsq))), skip=True)
            return self._escalate(v, base, streak)
        g = self._judge_grad(grad_norm, own)
        if g is not None and g.skip:
            return self._escalate(g, base, streak)
        if v is None and g is None and late is not None:
            details = {**late.details, "late": True, "late_loss": late.loss}
            return dataclasses.replace(late, skip=False, details=details, **base)
        found = v or g
        return (
            self._escalate(found, base, streak) if found is not None else Verdict(HEALTHY, **base)
        )

    def _losses(
        self, cols, col: int = Col.LOSS, valid: int = Col.LOSS_VALID
    ) -> tuple[list[float], float]:
        """Every rank's loss in ``col`` and their mean, or ``([], nan)`` unless every rank's
        ``valid`` flag is set."""
        if not all(map(_positive, cols[valid])):
            return [], math.nan
        losses = cols[col]
        return losses, sum(losses) / len(losses)

    def _judge_late(self, cols) -> Verdict | None:
        losses, loss = self._losses(cols, Col.LATE_LOSS, Col.LATE_VALID)
        v = self._judge_loss(losses, loss)
        return dataclasses.replace(v, loss=loss) if v is not None else None

    def _judge_loss(self, losses: list[float], loss: float) -> Verdict | None:
        if not losses:
            return None
        if not all(map(math.isfinite, losses)):
            bad = [r for r, x in enumerate(losses) if not math.isfinite(x)]
            return Verdict(
                WARNING, "nonfinite_loss", tuple(bad), skip=True, details={"losses": losses}
            )
        if not self.warm:
            return None
        t = self.t
        for thr, ratio, skip in (
            (t.zscore_fail, t.loss_ratio_fail, True),
            (t.zscore_warn, t.loss_ratio_warn, False),
        ):
            hit, z = _spike(loss, self.loss, thr, ratio)
            if hit:
                s = self.loss.stats()
                ranks = _blame(losses, [max(s.median, s.recent)] * len(losses), t.loss_ratio_warn)
                return Verdict(
                    WARNING,
                    "loss_spike",
                    ranks,
                    skip=skip,
                    details={"zscore": z, "median": s.median},
                )
        return None

    def _judge_grad(self, grad_norm: float, own: list[float]) -> Verdict | None:
        t = self.t

        def blame() -> tuple[int, ...]:
            if not self.own:
                return _standouts(own)
            refs = np.median(np.asarray(self.own, dtype=np.float64), axis=0).tolist()
            return _blame(own, refs, t.grad_ratio_warn**2)

        if not self.warm:
            med = self.grad.stats().median if len(self.grad) >= 3 else 0.0
            if med > 0 and grad_norm > t.grad_ratio_warmup * med:
                return Verdict(
                    WARNING, "grad_explosion", blame(), skip=True, details={"median": med}
                )
            return None
        for thr, ratio, skip in (
            (t.zscore_fail, t.grad_ratio_fail, True),
            (t.zscore_warn, t.grad_ratio_warn, False),
        ):
            hit, z = _spike(grad_norm, self.grad, thr, ratio)
            if hit:
                details = {"zscore": z, "median": self.grad.stats().median}
                return Verdict(WARNING, "grad_explosion", blame(), skip=skip, details=details)
        return None

    def _escalate(self, v: Verdict, base: dict, streak: int) -> Verdict:
        """A skip-level anomaly right after ``max_skips`` of them is persistent: a failure."""
        if v.skip and streak >= self.max_skips:
            details = {**v.details, "persistent": streak + 1}
            return dataclasses.replace(v, status=FAILURE, skip=False, details=details, **base)
        return dataclasses.replace(v, **base)

    def _judge_deep(self, m: np.ndarray, base: dict) -> Verdict | None:
        t = self.t
        wsq, ssq, flags = m[:, Col.WEIGHT_SQ], m[:, Col.STATE_SQ], m[:, Col.STATE_FLAGS]

        def fail(reason, ranks, **details) -> Verdict:
            return Verdict(FAILURE, reason, tuple(int(r) for r in ranks), details=details, **base)

        bad = np.nonzero(~np.isfinite(wsq))[0]
        if bad.size:
            return fail("nonfinite_weights", bad)
        bad = np.nonzero(~np.isfinite(ssq) | (flags != 0))[0]
        if bad.size:
            names = [f.name for f in StateFlag if int(flags[bad[0]]) & f]
            return fail("optimizer_state", bad, flags=names or ["nonfinite"])
        if not self.warm:
            return None
        # the total decides; ranks are blamed by how their own share moved since the last check.
        # The optimizer state is compared over the parameters that had state at both checks
        # (signals.py), so parameters joining or leaving the updates do not count.
        common, state_base = m[:, Col.STATE_COMMON_SQ], m[:, Col.STATE_BASE_SQ]
        for reason, now, prev, limit in (
            ("weight_corruption", wsq, self.last_weight, t.weight_ratio_fail),
            ("optimizer_state", common, state_base, t.state_ratio_fail),
        ):
            if prev is None or self.combine_grad_sq(prev) <= 0:
                continue
            ratio = math.sqrt(self.combine_grad_sq(now) / self.combine_grad_sq(prev))
            if not (1 / limit <= ratio <= limit):
                with np.errstate(divide="ignore", invalid="ignore"):
                    own = np.sqrt(now / prev)
                odd = np.nonzero(~((own >= 1 / limit) & (own <= limit)))[0]
                return fail(reason, odd if odd.size else range(len(now)), ratio=ratio)
        return None

    # -- history ------------------------------------------------------------------------
    def observe(self, m: np.ndarray, verdict: Verdict, *, applied: bool = True) -> None:
        """Learn from a judged step. Only applied updates teach the windows what is normal
        (a warning's values included: the upper tail is part of the distribution, so is a late
        loss short of a skip); a skip extends the streak (by two after a skip-level late loss)."""
        # the columns it reads, not the whole matrix (its cost grows with the world size)
        cols = {c: m[:, c].tolist() for c in (Col.LATE_LOSS, Col.LATE_VALID)}
        late = self._judge_late(cols)
        late_skip = late is not None and late.skip
        if not late_skip and m[0, Col.LATE_VALID] > 0:
            late_loss = self._losses(cols, Col.LATE_LOSS, Col.LATE_VALID)[1]
            if math.isfinite(late_loss):
                self.loss.add(late_loss)
        if verdict.skip and verdict.reason != "amp_overflow":
            self.streak += 1 + late_skip
        elif applied:
            self.streak = 0
            if math.isfinite(verdict.loss) and not m[0, Col.LOSS_JUDGED] > 0:
                self.loss.add(verdict.loss)
            if math.isfinite(verdict.grad_norm):
                self.grad.add(verdict.grad_norm)
                self.own.append(m[:, Col.LOCAL_GRAD_SQ].tolist())
            self.healthy_seen += 1
        if m[0, Col.DEEP] and verdict.status != FAILURE:
            self.last_weight = m[:, Col.WEIGHT_SQ].copy()

    def on_rollback(self) -> None:
        """The trajectory changed: deep-check baselines and the streak no longer apply."""
        self.last_weight = None
        self.streak = 0

    def state_dict(self) -> dict:
        return {
            "loss": list(self.loss.values),
            "grad": list(self.grad.values),
            "healthy_seen": self.healthy_seen,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.loss.clear()
        for x in sd["loss"]:
            self.loss.add(x)
        self.grad.clear()
        for x in sd["grad"]:
            self.grad.add(x)
        self.healthy_seen = int(sd["healthy_seen"])
        self.on_rollback()
