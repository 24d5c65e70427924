"""Pure tests of the decision logic, the config validation and the chaos grammar, and of the
measurements behind the decisions on a real optimizer (no processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from arc_dist import ArcConfig, Thresholds
from arc_dist.chaos import parse
from arc_dist.lr import LRGuard
from arc_dist.policy import FAILURE, HEALTHY, WARNING, HealthPolicy, Verdict
from arc_dist.recovery import Decision, RecoveryPolicy
from arc_dist.signals import NUM_COLS, Col, SignalCollector, StateFlag

#: row() keywords -> columns, and the values a healthy row has
_NAMES = {
    "loss": Col.LOSS, "grad_sq": Col.GRAD_SQ, "lr_ratio": Col.LR_RATIO, "lr": Col.LR,
    "deep": Col.DEEP, "weight_sq": Col.WEIGHT_SQ, "state_sq": Col.STATE_SQ,
    "common_sq": Col.STATE_COMMON_SQ, "base_sq": Col.STATE_BASE_SQ, "flags": Col.STATE_FLAGS,
}  # fmt: skip
_HEALTHY = {"loss": 1.0, "grad_sq": 1.0, "lr_ratio": 1.0, "lr": 1e-3}


def row(late=None, **values):
    """One rank's signal row; ``late``: the previous step's loss riding along unjudged."""
    r = np.zeros(NUM_COLS)
    for name, v in {**_HEALTHY, **values}.items():
        r[_NAMES[name]] = float(v)
    r[Col.LOCAL_GRAD_SQ], r[Col.LOSS_VALID] = r[Col.GRAD_SQ], 1.0
    if late is not None:
        r[Col.LATE_LOSS], r[Col.LATE_VALID] = late, 1.0
    return r


def warmed(world=2, layout="replicated", n=40, seed=0, **kw) -> HealthPolicy:
    pol = HealthPolicy(Thresholds(), layout, world, **kw)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        m = np.stack(
            [
                row(loss=2.0 + 0.05 * rng.standard_normal(), grad_sq=1.0 + 0.1 * rng.random())
                for _ in range(world)
            ]
        )
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
    # a loss its own step judged already rides along to be reported, not judged or learnt again
    judged = np.stack([row(loss=40.0), row(loss=40.0)])
    judged[:, Col.LOSS_JUDGED] = 1.0
    v = pol.judge(judged)
    assert v.healthy and v.loss == 40.0
    pol.observe(judged, v)
    assert 40.0 not in pol.loss.values
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
    assert (
        HealthPolicy(Thresholds(), "independent", 2)
        .judge(np.stack([row(lr=1e-3), row(lr=0.1)]))
        .healthy
    )


def test_deep_checks():
    pol = warmed()
    base = np.stack([row(deep=True, weight_sq=4.0, state_sq=1.0) for _ in range(2)])
    pol.observe(base, pol.judge(base))
    v = pol.judge(np.stack([row(deep=True, weight_sq=4.0), row(deep=True, weight_sq=math.nan)]))
    assert (v.reason, v.bad_ranks) == ("nonfinite_weights", (1,))
    v = pol.judge(
        np.stack([row(deep=True, weight_sq=4.0), row(deep=True, weight_sq=4.0, state_sq=math.nan)])
    )
    assert (v.reason, v.bad_ranks) == ("optimizer_state", (1,))
    # the state norm is compared over the parameters present at both checks
    v = pol.judge(
        np.stack(
            [
                row(deep=True, weight_sq=4.0, common_sq=1e10, base_sq=1.0),
                row(deep=True, weight_sq=4.0, common_sq=1.0, base_sq=1.0),
            ]
        )
    )
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


# -- measurements behind the verdicts (in process: a real optimizer, no process group) -------


def _deep(collector, pol) -> Verdict:
    r = collector.row(torch.tensor(1.0), deep=True, grad_sq=torch.tensor(1.0, dtype=torch.float64))
    m = r.numpy()[None]
    v = pol.judge(m)
    pol.observe(m, v)
    return v


def _two_heads():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
    model = nn.ModuleDict({"trunk": trunk, "heads": heads})
    return model, trunk, heads


def test_parameters_without_gradients_on_some_steps_are_not_damage():
    """Alternating heads with AdamW: the per-parameter step counters differ, and the head that
    joins late gains state; neither is flagged. Clearing the state, or corrupting it, still is."""
    model, trunk, heads = _two_heads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    col = SignalCollector(model, opt, torch.device("cpu"))
    pol = HealthPolicy(Thresholds(warmup_steps=3), "replicated", 1)
    x = torch.randn(16, 4)
    for step in range(40):
        head = heads[0] if step < 10 or step % 3 else heads[1]  # head 1 joins at step 12
        head(torch.tanh(trunk(x))).pow(2).mean().backward()
        if step % 5 == 4:
            counters = {float(st["step"]) for st in opt.state.values()}
            v = _deep(col, pol)
            assert v.healthy, (step, v, counters)
        pol.healthy_seen += 1
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len({float(st["step"]) for st in opt.state.values()}) > 1
    for p in heads[1].parameters():  # a parameter losing its state is not damage either
        opt.state.pop(p)
    assert _deep(col, pol).healthy
    next(iter(opt.state.values()))["exp_avg_sq"].mul_(1e8)
    assert _deep(col, pol).reason == "optimizer_state"
    col.reset_expectations()
    _deep(col, pol)
    opt.state.clear()
    v = _deep(col, pol)
    assert (v.reason, v.details["flags"]) == ("optimizer_state", ["LOST"])


def test_a_step_counter_going_back_is_flagged():
    model, trunk, heads = _two_heads()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    col = SignalCollector(model, opt, torch.device("cpu"))
    pol = HealthPolicy(Thresholds(warmup_steps=3), "replicated", 1)
    for _ in range(3):
        heads[0](trunk(torch.randn(4, 4))).mean().backward()
        opt.step()
        opt.zero_grad()
    assert _deep(col, pol).healthy
    opt.state[trunk.weight]["step"].fill_(1.0)
    v = _deep(col, pol)
    assert (v.reason, v.details["flags"]) == ("optimizer_state", ["STEP_BACK"])


def _guard(opt, sched=None, recovery_steps=5):
    return LRGuard(opt, sched, backoff=0.5, restore=True, recovery_steps=recovery_steps)


def test_the_backoff_is_a_multiplier_on_the_lr_the_loop_sets():
    """A loop that sets the LR itself every step (warm-up from 0, then a manual decay), with a
    recurring failure in between: Arc's backoff stays on top of the loop's LR, the LR is never
    a spike, and the backoff is undone once training recovered."""
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    guard = _guard(opt)
    pol = warmed(world=1)

    def schedule(s):
        return 1e-2 * min(1.0, s / 10) * (0.5 if s >= 30 else 1.0)

    seen = []
    for s in range(60):
        opt.param_groups[0]["lr"] = schedule(s)  # the loop, before arc.step
        guard.follow_loop()
        assert guard.ratio() == 1.0
        m = np.stack([row(lr=max(guard.lrs()))])
        assert pol.judge(m).healthy
        if s in (20, 21):  # two rollbacks without recovery: the second backs off
            guard.after_restore(guard.scale, failed_at=s, back_off=s == 21)
        else:
            guard.maybe_restore(s + 1, rank=0)
            guard.remember()
        seen.append((s, guard.scale, opt.param_groups[0]["lr"]))
    by_step = {s: (scale, lr) for s, scale, lr in seen}
    assert by_step[20] == (1.0, pytest.approx(schedule(20)))
    assert by_step[23] == (0.5, pytest.approx(0.5 * schedule(23)))  # the loop cannot undo it
    assert by_step[24][0] == 0.5 and by_step[27][0] == 1.0  # restored recovery_steps later
    assert by_step[40] == (1.0, pytest.approx(schedule(40)))


def test_the_backoff_scales_an_attached_scheduler():
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    guard = _guard(opt, sched)
    guard.remember()
    guard.after_restore(1.0, failed_at=0, back_off=True)
    for _ in range(3):
        opt.step()
        sched.step()
        guard.follow_loop()
        assert guard.ratio() == pytest.approx(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1 * 4 / 10)
    opt.param_groups[0]["lr"] *= 100  # nothing explains it: a spike
    assert guard.ratio() == pytest.approx(100.0)


def test_states_are_str_enums_that_read_as_their_values():
    """Event logs, stats and checkpoint metadata hold the plain strings."""
    import json

    from arc_dist.layout import Layout
    from arc_dist.policy import Status
    from arc_dist.recovery import DecisionKind

    for member, value in [
        (Status.HEALTHY, "healthy"),
        (Status.WARNING, "warning"),
        (Status.FAILURE, "failure"),
        (DecisionKind.CONTINUE, "continue"),
        (DecisionKind.SKIP, "skip"),
        (DecisionKind.ROLLBACK, "rollback"),
        (DecisionKind.RAISE, "raise"),
        (Layout.REPLICATED, "replicated"),
        (Layout.SHARDED, "sharded"),
        (Layout.INDEPENDENT, "independent"),
    ]:
        assert member == value and isinstance(member, str)
        assert f"{member}" == str(member) == "%s" % member == value  # noqa: UP031 - as logging
        assert json.loads(json.dumps({"v": member})) == {"v": value}
    assert (HEALTHY, WARNING, FAILURE) == tuple(Status)
    v = HealthPolicy(Thresholds(), "replicated", 1).judge(np.zeros((1, NUM_COLS)))
    assert v.status is Status.HEALTHY
