"""Pure tests of the decision logic, the config validation and the chaos grammar (no processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arc_dist import ArcConfig, Thresholds
from arc_dist.chaos import parse
from arc_dist.policy import (
    FAILURE,
    HEALTHY,
    WARNING,
    Decision,
    HealthPolicy,
    RecoveryPolicy,
    Verdict,
)
from arc_dist.signals import NUM_COLS, Col, StateFlag


def row(loss=1.0, grad_sq=1.0, lr_ratio=1.0, lr=1e-3, deep=False, weight_sq=0.0, state_sq=0.0,
        common_sq=0.0, base_sq=0.0, flags=0.0, late=None):
    r = np.zeros(NUM_COLS)
    r[Col.LOSS], r[Col.GRAD_SQ], r[Col.LR_RATIO], r[Col.LR], r[Col.DEEP] = loss, grad_sq, lr_ratio, lr, float(deep)
    r[Col.WEIGHT_SQ], r[Col.STATE_SQ], r[Col.STATE_FLAGS] = weight_sq, state_sq, flags
    r[Col.STATE_COMMON_SQ], r[Col.STATE_BASE_SQ] = common_sq, base_sq
    r[Col.LOCAL_GRAD_SQ], r[Col.LOSS_VALID] = grad_sq, 1.0
    if late is not None:
        r[Col.LATE_LOSS], r[Col.LATE_VALID] = late, 1.0
    return r


def warmed(world=2, layout="replicated", n=40, seed=0, **kw) -> HealthPolicy:
    pol = HealthPolicy(Thresholds(), layout, world, **kw)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        m = np.stack([row(loss=2.0 + 0.05 * rng.standard_normal(), grad_sq=1.0 + 0.1 * rng.random()) for _ in range(world)])
        v = pol.judge(m)
        assert v.status == HEALTHY
        pol.observe(m, v)
    return pol


def test_nonfinite_loss_skips_the_update_and_names_the_rank():
    pol = warmed()
    m = np.stack([row(), row(loss=math.nan)])
    v = pol.judge(m)
    assert (v.status, v.reason, v.bad_ranks, v.skip) == (WARNING, "nonfinite_loss", (1,), True)
    assert RecoveryPolicy(ArcConfig()).decide(v, [0]) == Decision("skip")


def test_trouble_that_persists_rolls_back():
    """``max_skips`` skips in a row, then a failure; an applied step in between resets it."""
    pol = warmed(max_skips=2)
    bad = np.stack([row(), row(loss=math.nan)])
    for _ in range(2):
        v = pol.judge(bad)
        assert v.skip and v.status == WARNING
        pol.observe(bad, v, applied=False)
    v = pol.judge(bad)
    assert (v.status, v.reason, v.details["persistent"]) == (FAILURE, "nonfinite_loss", 3)
    assert RecoveryPolicy(ArcConfig()).decide(v, [0]) == Decision("rollback")
    good = np.stack([row(), row()])
    pol.observe(good, pol.judge(good))
    assert pol.streak == 0 and pol.judge(bad).skip
    assert HealthPolicy(Thresholds(), "replicated", 2, max_skips=0).judge(bad).status == FAILURE


def test_judge_is_pure_and_deterministic():
    pol = warmed()
    m = np.stack([row(loss=9.0), row(loss=2.0)])
    assert pol.judge(m) == pol.judge(m)
    assert pol.loss.values == warmed().loss.values


def test_loss_spike_blames_the_spiking_rank_and_small_bumps_only_warn():
    pol = warmed()
    v = pol.judge(np.stack([row(loss=2.0), row(loss=20.0)]))
    assert (v.status, v.reason, v.bad_ranks, v.skip) == (WARNING, "loss_spike", (1,), True)
    v = pol.judge(np.stack([row(loss=3.4), row(loss=3.4)]))
    assert (v.status, v.reason, v.skip) == (WARNING, "loss_spike", False)


def test_trends_are_not_spikes():
    """Gradient norms that grow 5% a step for 100 steps, and a loss that creeps up, stay healthy."""
    pol = HealthPolicy(Thresholds(), "replicated", 1)
    for i in range(150):
        m = np.stack([row(loss=1.0 + 0.01 * i, grad_sq=(0.01 * 1.05**i) ** 2)])
        v = pol.judge(m)
        assert v.status == HEALTHY, (i, v)
        pol.observe(m, v)


def test_heavy_tailed_losses_are_change_not_damage():
    """Per-batch losses of tiny batches with noisy labels: most near zero, a few an order of
    magnitude above the median. 20,000 steps: no failure, no more than a handful of skips."""
    pol = HealthPolicy(Thresholds(), "replicated", 1)
    rng = np.random.default_rng(0)
    counts = {HEALTHY: 0, WARNING: 0, "skip": 0}
    for i in range(20_000):
        level = 2.0 * 0.9997**i + 0.1  # training: the loss comes down
        loss = level * rng.lognormal(0.0, 1.0) + (5.0 * rng.random() if rng.random() < 0.2 else 0.0)
        grad = level * rng.lognormal(0.0, 0.7)
        m = np.stack([row(loss=loss, grad_sq=grad**2)])
        v = pol.judge(m)
        assert v.status != FAILURE, (i, v)
        counts["skip" if v.skip else v.status] += 1
        pol.observe(m, v, applied=not v.skip)
    assert counts["skip"] <= 10 and counts[WARNING] <= 40, counts


def test_a_loss_spike_seen_late_on_the_ride_is_not_dropped():
    """Under DDP the loss of step t rides with step t+1. When that step takes the collective path
    its row carries the late loss: an outlier there is reported, counts towards the streak (its
    update is applied already, so it is not skipped) and is not learnt as normal."""
    pol = warmed(max_skips=1)
    m = np.stack([row(late=2.0), row(late=40.0)])
    v = pol.judge(m)
    assert (v.status, v.reason, v.bad_ranks, v.skip) == (WARNING, "loss_spike", (1,), False)
    assert v.details["late"] and v.details["late_loss"] == pytest.approx(21.0)
    before = list(pol.loss.values)
    pol.observe(m, v)
    assert 21.0 not in pol.loss.values and pol.loss.values[-1] == pytest.approx(1.0)
    assert len(pol.loss.values) == len(before) + 1 and pol.streak == 0
    # late trouble followed by trouble now: two anomalies in a row, over max_skips=1
    v = pol.judge(np.stack([row(late=math.nan), row(loss=math.nan, late=2.0)]))
    assert (v.status, v.reason, v.details["persistent"]) == (FAILURE, "nonfinite_loss", 2)
    pol = warmed(max_skips=3)
    m = np.stack([row(loss=2.0, late=math.nan), row(loss=math.nan, late=2.0)])
    v = pol.judge(m)
    assert (v.reason, v.skip) == ("nonfinite_loss", True)
    pol.observe(m, v, applied=False)
    assert pol.streak == 2


def test_grad_explosion_needs_ratio_and_zscore():
    pol = warmed()
    v = pol.judge(np.stack([row(grad_sq=1e6), row(grad_sq=1.0)]))
    assert (v.reason, v.skip) == ("grad_explosion", True)
    # 3x the median is ordinary for gradient norms
    assert pol.judge(np.stack([row(grad_sq=9.0), row(grad_sq=9.0)])).status == HEALTHY


def test_warmup_only_catches_gross_explosions():
    pol = HealthPolicy(Thresholds(), "replicated", 1)
    for g in (1.0, 2.0, 0.5):
        m = np.stack([row(grad_sq=g)])
        pol.observe(m, pol.judge(m))
    assert pol.judge(np.stack([row(grad_sq=100.0)])).status == HEALTHY
    v = pol.judge(np.stack([row(grad_sq=1e8)]))
    assert (v.reason, v.skip) == ("grad_explosion", True)


def test_sharded_layout_adds_squared_norms():
    pol = HealthPolicy(Thresholds(), "sharded", 2)
    v = pol.judge(np.stack([row(grad_sq=9.0), row(grad_sq=16.0)]))
    assert v.grad_norm == pytest.approx(5.0)


def test_lr_evidence_is_the_scheduler_or_the_other_ranks():
    pol = warmed()
    v = pol.judge(np.stack([row(), row(lr_ratio=100.0)]))
    assert (v.status, v.reason, v.bad_ranks) == (FAILURE, "lr_spike", (1,))
    v = pol.judge(np.stack([row(lr=1e-3), row(lr=0.1)]))  # no scheduler: ranks disagree
    assert (v.status, v.reason, v.bad_ranks) == (FAILURE, "lr_spike", (1,))
    four = warmed(world=4)
    v = four.judge(np.stack([row(lr=1e-3), row(lr=0.1), row(lr=1e-3), row(lr=0.1)]))
    assert (v.reason, v.bad_ranks) == ("lr_spike", (1, 3))
    # the loop's own schedule: any LR, from 0, the same on every rank
    for lr in (0.0, 1e-5, 0.1, 1e-3):
        assert pol.judge(np.stack([row(lr=lr), row(lr=lr)])).status == HEALTHY
    assert pol.judge(np.stack([row(lr_ratio=math.inf), row()])).reason == "lr_spike"
    assert HealthPolicy(Thresholds(), "independent", 2).judge(np.stack([row(lr=1e-3), row(lr=0.1)])).healthy


def test_deep_checks():
    pol = warmed()
    base = np.stack([row(deep=True, weight_sq=4.0, state_sq=1.0) for _ in range(2)])
    pol.observe(base, pol.judge(base))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0), row(deep=True, weight_sq=math.nan)]))
    assert (v.reason, v.bad_ranks) == ("nonfinite_weights", (1,))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0), row(deep=True, weight_sq=4.0, state_sq=math.nan)]))
    assert (v.reason, v.bad_ranks) == ("optimizer_state", (1,))
    # the state norm is compared over the parameters present at both checks
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0, common_sq=1e10, base_sq=1.0),
                            row(deep=True, weight_sq=4.0, common_sq=1.0, base_sq=1.0)]))
    assert (v.reason, v.bad_ranks) == ("optimizer_state", (0,))
    grown = row(deep=True, weight_sq=4.0, state_sq=1e10, common_sq=1.1, base_sq=1.0)
    assert pol.judge(np.stack([grown, grown])).healthy  # new parameters gained state
    for flag in (StateFlag.LOST, StateFlag.STEP_BACK):
        v = pol.judge(np.stack([row(deep=True, weight_sq=4.0, flags=float(flag))] * 2))
        assert v.reason == "optimizer_state" and v.details["flags"] == [flag.name]
    v = pol.judge(np.stack([row(deep=True, weight_sq=400.0)] * 2))
    assert v.reason == "weight_corruption"
    # damage evidence comes before a one-step anomaly: a NaN loss from NaN weights rolls back
    v = pol.judge(np.stack([row(deep=True, weight_sq=math.nan, loss=math.nan)] * 2))
    assert (v.status, v.reason) == (FAILURE, "nonfinite_weights")


def test_amp_overflow_is_a_skip():
    pol = warmed()
    v = pol.judge(np.stack([row(grad_sq=math.inf), row(grad_sq=math.inf)]), amp=True)
    assert (v.status, v.reason, v.skip) == (WARNING, "amp_overflow", True)
    assert RecoveryPolicy(ArcConfig()).decide(v, [0]).kind == "skip"
    pol.observe(np.stack([row(), row()]), v, applied=False)
    assert pol.streak == 0  # the GradScaler's business, not persistent trouble


def test_escalation_backs_off_only_when_failures_recur_then_goes_older_then_raises():
    rec = RecoveryPolicy(ArcConfig(max_rollbacks=2, recovery_steps=10))
    fail = Verdict(FAILURE, "nonfinite_weights", (1,))
    snaps = [20, 30]
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback")  # the first: no backoff
    rec.record(d, 40, 30)
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback", back_off=True)
    rec.record(d, 40, 30)
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback", drop=1, back_off=True)  # escalate to step 20
    rec.record(d, 40, 20)
    # training reached step 30 again and re-took a snapshot there; the fault is still at 40
    d = rec.decide(fail, [20, 30])
    assert d == Decision("rollback", back_off=True)
    rec.record(d, 40, 30)
    assert rec.decide(fail, [20, 30]) == Decision("raise")


def test_recovery_resets_the_count():
    rec = RecoveryPolicy(ArcConfig(max_rollbacks=1, recovery_steps=5))
    fail = Verdict(FAILURE, "loss_spike", (0,))
    rec.record(rec.decide(fail, [10]), 12, 10)
    for s in range(10, 17):
        rec.record(Decision("continue"), s)
    assert rec.consecutive == 0 and rec.decide(fail, [10]) == Decision("rollback")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(snapshot_every=0), "snapshot_every"),
        (dict(lr_backoff=0.0), "lr_backoff"),
        (dict(lr_backoff=1.5), "lr_backoff"),
        (dict(max_rollbacks=0), "max_rollbacks"),
        (dict(max_skips=-1), "max_skips"),
        (dict(keep_checkpoints=0), "keep_checkpoints"),
        (dict(checkpoint_every=-1), "checkpoint_every"),
        (dict(hang_timeout=-3), "hang_timeout"),
    ],
)
def test_config_errors_name_field_value_and_fix(kwargs, field):
    with pytest.raises(ValueError) as e:
        ArcConfig(**kwargs)
    msg = str(e.value)
    assert field in msg and repr(next(iter(kwargs.values()))) in msg and "use" in msg


def test_thresholds_validation():
    with pytest.raises(ValueError, match="zscore_fail"):
        Thresholds(zscore_warn=10, zscore_fail=5)
    with pytest.raises(ValueError, match="window"):
        Thresholds(window=5)


def test_chaos_grammar():
    faults = parse("nan_loss@30/1 lr_spike@90/0+2*10, hang@5*2.5; nan_loss@200!")
    assert [(f.kind, f.step, f.ranks, f.persistent, f.factor) for f in faults] == [
        ("nan_loss", 30, (1,), False, None),
        ("lr_spike", 90, (0, 2), False, 10.0),
        ("hang", 5, None, False, 2.5),
        ("nan_loss", 200, None, True, None),
    ]
    with pytest.raises(ValueError, match="KIND@STEP"):
        parse("nan_loss30")
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse("meteor@3")
