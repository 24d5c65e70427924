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
from arc_dist.signals import NUM_COLS, Col


def row(loss=1.0, grad_sq=1.0, lr_ratio=1.0, deep=False, weight_sq=0.0, state_sq=0.0, step=-1.0, flags=0.0):
    r = np.zeros(NUM_COLS)
    r[Col.LOSS], r[Col.GRAD_SQ], r[Col.LR_RATIO], r[Col.DEEP] = loss, grad_sq, lr_ratio, float(deep)
    r[Col.WEIGHT_SQ], r[Col.STATE_SQ], r[Col.STATE_STEP], r[Col.STATE_FLAGS] = weight_sq, state_sq, step, flags
    r[Col.LOCAL_GRAD_SQ], r[Col.LOSS_VALID] = grad_sq, 1.0
    return r


def warmed(world=2, layout="replicated", n=40, seed=0) -> HealthPolicy:
    pol = HealthPolicy(Thresholds(), layout, world)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        m = np.stack([row(loss=2.0 + 0.05 * rng.standard_normal(), grad_sq=1.0 + 0.1 * rng.random()) for _ in range(world)])
        v = pol.judge(m)
        assert v.status == HEALTHY
        pol.observe(m, v)
    return pol


def test_nonfinite_loss_names_the_rank():
    pol = warmed()
    m = np.stack([row(), row(loss=math.nan)])
    v = pol.judge(m)
    assert (v.status, v.reason, v.bad_ranks) == (FAILURE, "nonfinite_loss", (1,))


def test_judge_is_pure_and_deterministic():
    pol = warmed()
    m = np.stack([row(loss=9.0), row(loss=2.0)])
    assert pol.judge(m) == pol.judge(m)
    assert pol.loss.values == warmed().loss.values


def test_loss_spike_blames_the_spiking_rank_and_small_bumps_only_warn():
    pol = warmed()
    v = pol.judge(np.stack([row(loss=2.0), row(loss=20.0)]))
    assert (v.status, v.reason, v.bad_ranks) == (FAILURE, "loss_spike", (1,))
    v = pol.judge(np.stack([row(loss=3.4), row(loss=3.4)]))
    assert (v.status, v.reason) == (WARNING, "loss_spike")


def test_trends_are_not_spikes():
    """Gradient norms that grow 5% a step for 100 steps, and a loss that creeps up, stay healthy."""
    pol = HealthPolicy(Thresholds(), "replicated", 1)
    for i in range(150):
        m = np.stack([row(loss=1.0 + 0.01 * i, grad_sq=(0.01 * 1.05**i) ** 2)])
        v = pol.judge(m)
        assert v.status == HEALTHY, (i, v)
        pol.observe(m, v)


def test_grad_explosion_needs_ratio_and_zscore():
    pol = warmed()
    assert pol.judge(np.stack([row(grad_sq=1e6), row(grad_sq=1.0)])).reason == "grad_explosion"
    # 3x the median is ordinary for gradient norms
    assert pol.judge(np.stack([row(grad_sq=9.0), row(grad_sq=9.0)])).status == HEALTHY


def test_warmup_only_catches_gross_explosions():
    pol = HealthPolicy(Thresholds(), "replicated", 1)
    for g in (1.0, 2.0, 0.5):
        m = np.stack([row(grad_sq=g)])
        pol.observe(m, pol.judge(m))
    assert pol.judge(np.stack([row(grad_sq=100.0)])).status == HEALTHY
    assert pol.judge(np.stack([row(grad_sq=1e8)])).reason == "grad_explosion"


def test_sharded_layout_adds_squared_norms():
    pol = HealthPolicy(Thresholds(), "sharded", 2)
    v = pol.judge(np.stack([row(grad_sq=9.0), row(grad_sq=16.0)]))
    assert v.grad_norm == pytest.approx(5.0)


def test_lr_spike_and_deep_checks():
    pol = warmed()
    v = pol.judge(np.stack([row(), row(lr_ratio=100.0)]))
    assert (v.reason, v.bad_ranks) == ("lr_spike", (1,))
    base = np.stack([row(deep=True, weight_sq=4.0, state_sq=1.0, step=10) for _ in range(2)])
    pol.observe(base, pol.judge(base))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0, state_sq=1.0, step=11), row(deep=True, weight_sq=math.nan, state_sq=1.0, step=11)]))
    assert (v.reason, v.bad_ranks) == ("nonfinite_weights", (1,))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0, state_sq=1e10, step=11), row(deep=True, weight_sq=4.0, state_sq=1.0, step=11)]))
    assert (v.reason, v.bad_ranks) == ("optimizer_state", (0,))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0, state_sq=1.0, step=0)] * 2))
    assert v.reason == "optimizer_state" and v.details["reset"]
    v = pol.judge(np.stack([row(deep=True, weight_sq=400.0, state_sq=1.0, step=11)] * 2))
    assert v.reason == "weight_corruption"


def test_amp_overflow_is_a_skip():
    pol = warmed()
    v = pol.judge(np.stack([row(grad_sq=math.inf), row(grad_sq=math.inf)]), amp=True)
    assert (v.status, v.reason) == (WARNING, "amp_overflow")
    assert RecoveryPolicy(ArcConfig()).decide(v, [0]).kind == "skip"


def test_escalation_goes_strictly_older_then_raises():
    rec = RecoveryPolicy(ArcConfig(max_rollbacks=2, recovery_steps=10))
    fail = Verdict(FAILURE, "nonfinite_loss", (1,))
    snaps = [20, 30]
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback")
    rec.record(d, 40, 30)
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback")
    rec.record(d, 40, 30)
    d = rec.decide(fail, snaps)
    assert d == Decision("rollback", drop=1)  # escalate to step 20
    rec.record(d, 40, 20)
    # training reached step 30 again and re-took a snapshot there; the fault is still at 40
    d = rec.decide(fail, [20, 30])
    assert d == Decision("rollback")
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
