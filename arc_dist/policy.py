"""Decisions: pure functions of the agreed signal matrix and of history every rank shares.

Every rank feeds the same ``[world_size, NUM_COLS]`` matrix (the result of one SUM all-reduce)
into the same :class:`HealthPolicy`, whose history only ever changes as a function of those
matrices, so every rank computes the same :class:`Verdict` bit for bit: no rank-local decision
can desynchronise the replicas. Nothing here touches torch or the process group, so the logic
is tested without processes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .config import ArcConfig, Thresholds
from .signals import Col, StateFlag
from .silent import divergent_ranks

HEALTHY, WARNING, FAILURE = "healthy", "warning", "failure"

#: MAD -> standard deviation for normally distributed data
_MAD_SCALE = 1.4826


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str
    reason: str | None = None
    bad_ranks: tuple[int, ...] = ()
    #: mean loss over ranks (NaN when a rank's loss was not finite)
    loss: float = math.nan
    #: global gradient norm (see signals.py for how ranks combine)
    grad_norm: float = math.nan
    #: values behind the verdict, for logs and events
    details: dict = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY


class RobustWindow:
    """Median and MAD over the last ``size`` healthy values, and the largest of the most recent.

    Statistics are cached between additions: ``judge`` runs every step and must stay cheap.
    """

    #: healthy values that form the "recent" reference of the ratio test
    RECENT = 5
    #: additions between recomputations of the median and MAD once the window is full
    REFRESH = 8

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)
        self._robust: tuple[float, float] | None = None
        self._recent: float | None = None
        self._since = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, x: float) -> None:
        self.values.append(float(x))
        self._recent = None
        self._since += 1
        # a median over ~100 values moves slowly: refreshing it every few steps is enough
        if len(self.values) < self.values.maxlen or self._since >= self.REFRESH:
            self._robust = None

    def clear(self) -> None:
        self.values.clear()
        self._robust = self._recent = None

    def stats(self) -> tuple[float, float, float]:
        """(median, MAD scaled to a standard deviation, max of the last RECENT values)."""
        if self._robust is None:
            a = np.fromiter(self.values, dtype=np.float64, count=len(self.values))
            med = float(np.median(a))
            self._robust = (med, _MAD_SCALE * float(np.median(np.abs(a - med))))
            self._since = 0
        if self._recent is None:
            n = len(self.values)
            self._recent = max(self.values[i] for i in range(max(0, n - self.RECENT), n))
        return (*self._robust, self._recent)


def _spike(x: float, window: RobustWindow, z_thr: float, ratio: float) -> tuple[bool, float]:
    """(x spikes, its robust z-score against the window).

    A spike needs both a z-score above ``z_thr`` and ``x - ref > (ratio - 1) |ref|`` where the
    reference is the larger of the window's median and the most recent healthy values: the
    z-score alone fires on low-noise runs, and a ratio to the median alone on values that trend
    upwards (gradient norms often grow for a while); a real spike jumps above both. The MAD gets
    a floor of 1e-3 |median| so a near-constant series does not make every wiggle significant.
    """
    med, mad, recent = window.stats()
    scale = max(mad, 1e-3 * abs(med), 1e-12)
    z = (x - med) / scale
    ref = max(med, recent)
    return (z > z_thr and x - ref > (ratio - 1.0) * abs(ref)), z


def _blame(values, refs, ratio: float) -> tuple[int, ...]:
    """Ranks whose own value passes the ratio test against their reference; the standouts when
    none does on its own (the spike only shows in the combined value)."""
    bad = tuple(r for r, (v, ref) in enumerate(zip(values, refs)) if v - ref > (ratio - 1.0) * abs(ref))
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


class HealthPolicy:
    """Turns an agreed signal matrix into a verdict; owns the run's robust statistics.

    ``judge`` is pure; ``observe`` updates the history and must be called with the verdict that
    ``judge`` returned, on every rank, for every step (``commit=False`` for steps whose update
    is not applied).
    """

    def __init__(self, thresholds: Thresholds, layout: str, world_size: int):
        self.t = thresholds
        self.layout = layout
        self.world_size = world_size
        self.loss = RobustWindow(thresholds.window)
        self.grad = RobustWindow(thresholds.window)
        self.healthy_seen = 0
        # each rank's own gradient squared norms on recent healthy steps (who is to blame)
        self.own: deque[list[float]] = deque(maxlen=thresholds.window)
        # last deep-check values along the current trajectory (cleared on rollback)
        self.last_weight: np.ndarray | None = None  # per-rank squared norms
        self.last_state: np.ndarray | None = None
        self.last_state_step: float | None = None

    # -- pure ---------------------------------------------------------------------------
    def combine_grad_sq(self, g) -> float:
        """Squared norms of the ranks' rows -> the global squared norm (see signals.py)."""
        if self.layout == "sharded":
            return float(sum(g))
        if self.layout == "independent":
            return float(max(g))
        return float(sum(g)) / len(g)

    def judge(self, m: np.ndarray, *, amp: bool = False) -> Verdict:
        # every step runs this on a [world, NUM_COLS] matrix: plain Python over its columns is
        # several times cheaper than numpy calls on arrays this small
        t = self.t
        cols = m.T.tolist()
        losses = [x if v > 0 else 0.0 for x, v in zip(cols[Col.LOSS], cols[Col.LOSS_VALID])]
        gsq, own = cols[Col.GRAD_SQ], cols[Col.LOCAL_GRAD_SQ]
        finite_grads = all(map(math.isfinite, gsq)) and all(map(math.isfinite, own))
        grad_norm = math.sqrt(self.combine_grad_sq(gsq)) if finite_grads else math.nan
        has_loss = all(v > 0 for v in cols[Col.LOSS_VALID])
        loss = sum(losses) / len(losses) if has_loss else math.nan
        base = dict(loss=loss, grad_norm=grad_norm)

        def fail(reason: str, ranks, status: str = FAILURE, **details) -> Verdict:
            return Verdict(status, reason, tuple(int(r) for r in ranks), details=details, **base)

        bad = [r for r, x in enumerate(losses) if not math.isfinite(x)]
        if bad:
            return fail("nonfinite_loss", bad, losses=losses)
        if not finite_grads:
            if amp:  # the GradScaler skips this update and lowers its scale: not a fault
                return fail("amp_overflow", (), status=WARNING)
            bad = [r for r, x in enumerate(own) if not math.isfinite(x)]
            return fail("nonfinite_grad", bad or range(len(gsq)))
        lr = cols[Col.LR_RATIO]
        bad = [r for r, x in enumerate(lr) if not x <= t.lr_ratio_fail]
        if bad:
            return fail("lr_spike", bad, lr_ratio=lr)

        if m[0, Col.DEEP]:  # the more specific diagnosis first (a NaN weight also diverges)
            v = self._judge_deep(m, base)
            if v is not None:
                return v

        if m[0, Col.FP_CHECK]:
            bad = divergent_ranks(m[:, Col.FINGERPRINT])
            if bad:
                return fail("replica_divergence", bad, fingerprints=m[:, Col.FINGERPRINT].tolist())

        def blame_loss() -> tuple[int, ...]:
            med, _, recent = self.loss.stats()
            return _blame(losses, [max(med, recent)] * len(losses), t.loss_ratio_warn)

        def blame_grad() -> tuple[int, ...]:
            if not self.own:
                return _standouts(own)
            refs = np.median(np.asarray(self.own, dtype=np.float64), axis=0).tolist()
            return _blame(own, refs, t.grad_ratio_warn**2)

        warm = self.healthy_seen >= t.warmup_steps
        if warm:
            if has_loss:
                is_fail, z = _spike(loss, self.loss, t.zscore_fail, t.loss_ratio_fail)
                if is_fail:
                    return fail("loss_spike", blame_loss(), zscore=z, median=self.loss.stats()[0])
            is_fail, gz = _spike(grad_norm, self.grad, t.zscore_fail, t.grad_ratio_fail)
            if is_fail:
                return fail("grad_explosion", blame_grad(), zscore=gz, median=self.grad.stats()[0])
            if has_loss:
                is_warn, z = _spike(loss, self.loss, t.zscore_warn, t.loss_ratio_warn)
                if is_warn:
                    return fail("loss_spike", blame_loss(), status=WARNING, zscore=z)
            is_warn, gz = _spike(grad_norm, self.grad, t.zscore_warn, t.grad_ratio_warn)
            if is_warn:
                return fail("grad_explosion", blame_grad(), status=WARNING, zscore=gz)
        elif len(self.grad) >= 3:
            med = self.grad.stats()[0]
            if med > 0 and grad_norm > t.grad_ratio_warmup * med:
                return fail("grad_explosion", blame_grad(), median=med)
        return Verdict(HEALTHY, **base)

    def _judge_deep(self, m: np.ndarray, base: dict) -> Verdict | None:
        t = self.t
        wsq, ssq = m[:, Col.WEIGHT_SQ], m[:, Col.STATE_SQ]
        flags, steps = m[:, Col.STATE_FLAGS], m[:, Col.STATE_STEP]

        def fail(reason, ranks, **details) -> Verdict:
            return Verdict(FAILURE, reason, tuple(int(r) for r in ranks), details=details, **base)

        bad = np.nonzero(~np.isfinite(wsq))[0]
        if bad.size:
            return fail("nonfinite_weights", bad)
        bad = np.nonzero(~np.isfinite(ssq) | (flags != 0))[0]
        if bad.size:
            names = [f.name for f in StateFlag if int(flags[bad[0]]) & f]
            return fail("optimizer_state", bad, flags=names or ["nonfinite"])
        # the total decides; ranks are blamed by how their own share moved since the last check
        warm = self.healthy_seen >= t.warmup_steps
        for reason, col, prev, limit in (
            ("weight_corruption", wsq, self.last_weight, t.weight_ratio_fail),
            ("optimizer_state", ssq, self.last_state, t.state_ratio_fail),
        ):
            if not warm or prev is None or self.combine_grad_sq(prev) <= 0:
                continue
            ratio = math.sqrt(self.combine_grad_sq(col) / self.combine_grad_sq(prev))
            if not (1 / limit <= ratio <= limit):
                with np.errstate(divide="ignore", invalid="ignore"):
                    own = np.sqrt(col / prev)
                odd = np.nonzero(~((own >= 1 / limit) & (own <= limit)))[0]
                return fail(reason, odd if odd.size else range(len(col)), ratio=ratio)
        step = float(steps.max())
        if self.last_state_step is not None and 0 <= step < self.last_state_step:
            return fail("optimizer_state", np.nonzero(steps < self.last_state_step)[0], reset=True)
        return None

    # -- history ------------------------------------------------------------------------
    def observe(self, m: np.ndarray, verdict: Verdict, *, add_loss: bool = True) -> None:
        """Learn from a step whose update is applied (healthy or warning). ``add_loss=False``
        when the verdict's loss was already learnt (the DDP ride repeats the previous loss)."""
        if verdict.status == HEALTHY:
            if add_loss and math.isfinite(verdict.loss):
                self.loss.add(verdict.loss)
            self.grad.add(verdict.grad_norm)
            self.own.append(m[:, Col.LOCAL_GRAD_SQ].tolist())
            self.healthy_seen += 1
        if m[0, Col.DEEP]:
            self.last_weight = m[:, Col.WEIGHT_SQ].copy()
            self.last_state = m[:, Col.STATE_SQ].copy()
            step = float(m[:, Col.STATE_STEP].max())
            self.last_state_step = step if step >= 0 else None

    def on_rollback(self) -> None:
        """The trajectory changed: deep-check baselines no longer apply."""
        self.last_weight = self.last_state = self.last_state_step = None

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


@dataclass(frozen=True, slots=True)
class Decision:
    """What the controller does about a verdict."""

    kind: str  # "continue" | "skip" | "rollback" | "raise"
    #: for rollback: how many newest snapshots to discard first (0 = restore the newest)
    drop: int = 0


class RecoveryPolicy:
    """Escalation as a small state machine, shared by all ranks.

    Recovered means training got ``recovery_steps`` healthy steps past the step where it last
    failed. Until then, after ``max_rollbacks`` rollbacks the policy escalates: it discards
    snapshots and restores one strictly older than any earlier escalation restored (the newer
    ones may sit on a doomed trajectory). With nothing older left, the run is unrecoverable.
    """

    def __init__(self, config: ArcConfig):
        self.max_rollbacks = config.max_rollbacks
        self.recovery_steps = config.recovery_steps
        self.consecutive = 0
        self.failed_at: int | None = None
        self.floor = math.inf  # escalations must restore a snapshot older than this step

    def decide(self, verdict: Verdict, snapshot_steps: list[int]) -> Decision:
        """``snapshot_steps``: steps of the snapshots held, oldest first."""
        if verdict.status == HEALTHY:
            return Decision("continue")
        if verdict.status == WARNING:
            return Decision("skip" if verdict.reason == "amp_overflow" else "continue")
        if not snapshot_steps:
            return Decision("raise")
        if self.consecutive < self.max_rollbacks:
            return Decision("rollback")
        limit = min(self.floor, snapshot_steps[-1])
        older = [i for i, s in enumerate(snapshot_steps) if s < limit]
        if not older:
            return Decision("raise")
        return Decision("rollback", drop=len(snapshot_steps) - 1 - older[-1])

    def record(self, decision: Decision, step: int, restored_step: int | None = None) -> None:
        """Update after acting; ``step`` is the global step the verdict was about."""
        if decision.kind == "rollback":
            self.failed_at = step if self.failed_at is None else max(self.failed_at, step)
            if decision.drop:
                self.consecutive = 1
                if restored_step is not None:
                    self.floor = restored_step
            else:
                self.consecutive += 1
        elif decision.kind == "continue" and self.failed_at is not None:
            if step + 1 >= self.failed_at + self.recovery_steps:
                self.consecutive, self.failed_at, self.floor = 0, None, math.inf

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "failed_at": self.failed_at}

    def load_state_dict(self, sd: dict) -> None:
        self.consecutive = int(sd["consecutive"])
        self.failed_at = sd.get("failed_at")
        self.floor = math.inf
