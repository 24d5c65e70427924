"""Early warning (arc_dist/forecast.py): the rule, and Arc acting on a forecast in one process
and on 2 gloo ranks: the same Action everywhere, a pinned snapshot a later fault rolls back to,
the LR lowered and restored when configured, counted in stats, the event log and the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig, EarlyWarning
from arc_dist.chaos import inject
from arc_dist.forecast import REASON, Forecaster, GradGrowth
from arc_dist.observe.events import read_events
from arc_dist.observe.report import format_summary, summarize
from arc_dist.policy import HEALTHY, WARNING, Verdict

from ._dist import run_ranks
from ._workload import Data, make_model, params_digest


def _forecasts(norms, **cfg) -> list[int]:
    """Steps at which a Forecaster fed these grad norms (healthy verdicts) forecasts."""
    f = Forecaster(EarlyWarning(enabled=True, **cfg))
    return [
        t for t, g in enumerate(norms) if f.observe(t, Verdict(HEALTHY, grad_norm=g)) is not None
    ]


def _noisy(n: int, seed: int, sigma: float) -> np.ndarray:
    """A flat gradient norm with log-normal per-batch noise and rare 5x outliers."""
    rng = np.random.default_rng(seed)
    g = np.exp(sigma * rng.standard_normal(n))
    g[rng.random(n) < 0.01] *= 5.0
    return g


def test_rule_fires_on_a_growing_gradient_norm():
    g = _noisy(400, 0, 0.3)
    g[200:] *= 1.1 ** np.arange(200)  # grows 10% a step from step 200
    fired = _forecasts(g, cooldown=1000)
    assert len(fired) == 1 and 200 < fired[0] <= 215
    # the score is e-fold growth of the short-term level over the long-term one
    assert _forecasts(np.full(300, 2.0)) == []


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
def test_rule_is_quiet_on_noisy_flat_norms(sigma):
    for seed in range(5):
        assert _forecasts(_noisy(5000, seed, sigma)) == []


def test_rule_matches_its_definition():
    """Short EMA (half-life 3) of log g minus the long EMA (half-life 50) of the steps before:
    the definition the benchmark's pandas rows use."""
    pd = pytest.importorskip("pandas")
    g = _noisy(300, 1, 0.4) * np.linspace(1, 20, 300)
    rule = GradGrowth()
    got = np.array([rule.update(x) for x in g])
    lg = pd.Series(np.log(g))
    want = lg.ewm(halflife=3, adjust=False).mean() - lg.ewm(halflife=50, adjust=False).mean().shift(
        1
    )
    assert math.isnan(got[0])
    np.testing.assert_allclose(got[1:], want.to_numpy()[1:], rtol=1e-9, atol=1e-12)


def test_min_steps_cooldown_and_pins():
    g = np.ones(300)
    g[3:] = 1e3  # a level shift right at the start, then flat: one forecast, not one per cooldown
    g[200:] = 1e7  # another, once the score has come back under the threshold
    assert _forecasts(g, min_steps=1, cooldown=50) == [3, 200]
    assert _forecasts(g, min_steps=10, cooldown=50) == [200]  # the first shift came too early
    assert _forecasts(g, min_steps=1, cooldown=250) == [3]  # the second is in the cooldown
    f = Forecaster(EarlyWarning(enabled=True, min_steps=1))
    for t in range(4):
        f.observe(t, Verdict(HEALTHY, grad_norm=float(g[t])))
    assert f.pin_due
    assert not f.pinned(Verdict(WARNING, "loss_spike"))  # only a healthy state is pinned
    assert not f.pin_due
    # a non-healthy step is never a forecast, and off means off
    assert Forecaster(EarlyWarning(min_steps=1)).observe(5, Verdict(HEALTHY, grad_norm=1e9)) is None
    f = Forecaster(EarlyWarning(enabled=True, min_steps=1))
    f.observe(0, Verdict(HEALTHY, grad_norm=1.0))
    assert f.observe(1, Verdict(WARNING, "grad_explosion", grad_norm=1e9)) is None


# -- Arc acting on a forecast ----------------------------------------------------------------
STEPS, GROW_FROM, GROW_STEPS, LR = 90, 25, 15, 3e-3


def _grow_run(rank: int, world: int, logdir: str | None, early: dict | None, fault: bool) -> dict:
    """Train 90 steps whose gradient grows 25% a step over steps 25-40 (the loss is scaled up:
    a real, growing gradient), then stays there; with ``fault``, a NaN loss (rank 1 under DDP)
    three steps after the forecast."""
    torch.manual_seed(0)
    model = make_model("mlp")
    if world > 1:
        model = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ew = EarlyWarning(**early) if early else EarlyWarning()
    config = ArcConfig(snapshot_every=50, max_skips=0, recovery_steps=20, early_warning=ew)
    arc = Arc(model, opt, config=config, log_dir=logdir, chaos="")
    data = Data("mlp", rank)
    actions, lrs, pins, forecast_at = [], {}, {}, None
    for _ in range(3 * STEPS):
        if arc.global_step >= STEPS:
            break
        t = arc.global_step
        scale = 1.25 ** min(max(0, t - GROW_FROM), GROW_STEPS)
        loss = data.loss(model, data.next()) * scale
        loss.backward()
        a = arc.step(loss)
        actions.append((t, a.step, a.status, a.reason, a.should_skip, a.rolled_back,
                        a.restored_step))  # fmt: skip
        lrs[t] = opt.param_groups[0]["lr"]  # the LR this step's update uses
        pins[t] = arc._snapshots.steps()
        if a.reason == REASON and forecast_at is None:
            forecast_at = t
            if fault:
                inject(arc, "nan_loss", step=t + 3, ranks=[world - 1])
        if not a.should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    arc.close()
    return dict(actions=actions, lrs=lrs, pins=pins, forecast_at=forecast_at, stats=arc.stats(),
                digest=params_digest(model), step=arc.global_step)  # fmt: skip


def _check_forecast_run(r: dict, lr_factor: float | None, fault: bool) -> int:
    f = r["forecast_at"]
    assert f is not None and GROW_FROM < f <= GROW_FROM + GROW_STEPS
    forecasts = [a for a in r["actions"] if a[3] == REASON]
    assert forecasts == [(f, f + 1, WARNING, REASON, False, False, None)]
    assert r["stats"]["forecasts"] == 1 and r["step"] == STEPS
    # the next state (verified: deep checks ran) is pinned on top of the regular snapshots
    assert r["pins"][f + 1] == [0, f + 1]
    assert r["pins"][50] == [0, 50]  # the next regular snapshot replaces the pin
    factor = lr_factor or 1.0
    assert r["lrs"][f - 1] == LR and r["lrs"][f] == pytest.approx(LR * factor)
    assert r["lrs"][f + 19] == pytest.approx(LR * factor)
    assert r["lrs"][f + 21] == LR and r["stats"]["lr_scale"] == 1.0  # restored after the window
    rollbacks = [a for a in r["actions"] if a[5]]
    if fault:  # the fault after the forecast goes back to the pinned state, not to step 0
        assert [(a[0], a[6]) for a in rollbacks] == [(f + 3, f + 1)]
    else:
        assert rollbacks == [] and r["stats"]["skips"] == 0
    return f


def test_forecast_in_one_process(tmp_path):
    r = _grow_run(0, 1, str(tmp_path), dict(enabled=True, lr_factor=0.5), fault=True)
    f = _check_forecast_run(r, 0.5, fault=True)
    events = read_events(str(tmp_path))
    recs = [e for e in events if e["kind"] == "forecast"]
    assert [e["step"] for e in recs] == [f] and recs[0]["reason"] == REASON
    assert recs[0]["values"]["score"] > recs[0]["values"]["threshold"] == 1.0
    assert recs[0]["values"]["lr_scale"] == 0.5
    s = summarize(events)
    assert s["forecasts"] == 1 and s["rollbacks"] == 1
    assert "instability forecasts                  1" in format_summary(s)


def test_forecast_without_lr_factor_leaves_the_lr(tmp_path):
    r = _grow_run(0, 1, None, dict(enabled=True), fault=False)
    _check_forecast_run(r, None, fault=False)
    assert set(r["lrs"].values()) == {LR}


def test_off_by_default_the_same_run_is_untouched():
    r = _grow_run(0, 1, None, None, fault=False)
    assert r["forecast_at"] is None and r["stats"]["forecasts"] == 0
    assert all(a[3] != REASON and not a[4] and not a[5] for a in r["actions"])
    assert set(r["lrs"].values()) == {LR}
    assert r["pins"][STEPS - 1] == [0, 50]
    on = _grow_run(0, 1, None, dict(enabled=True), fault=False)
    assert on["digest"] == r["digest"]  # a forecast alone changes nothing in the training


def _ddp(rank, world, logdir):
    return _grow_run(rank, world, logdir if rank == 0 else None,
                     dict(enabled=True, lr_factor=0.5), fault=True)  # fmt: skip


def test_forecast_on_two_ddp_ranks(tmp_path):
    r0, r1 = run_ranks(_ddp, 2, str(tmp_path), timeout=180)
    assert r0["actions"] == r1["actions"] and r0["pins"] == r1["pins"]
    assert r0["digest"] == r1["digest"]  # replicas identical after the rollback
    for r in (r0, r1):
        _check_forecast_run(r, 0.5, fault=True)
    s = summarize(read_events(str(tmp_path)))
    assert s["forecasts"] == 1 and s["rollbacks"] == 1


def test_forecast_state_is_checkpointed():
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    arc = Arc(model, opt, config=ArcConfig(early_warning=EarlyWarning(enabled=True)), chaos="")
    data = Data("mlp", 0)
    for _ in range(5):
        loss = data.loss(model, data.next())
        loss.backward()
        arc.step(loss)
        opt.step()
        opt.zero_grad()
    sd = arc.state_dict()
    arc.close()
    assert sd["forecast"]["rule"]["seen"] == 5
    arc2 = Arc(model, opt, config=ArcConfig(early_warning=EarlyWarning(enabled=True)), chaos="")
    arc2.load_state_dict(sd)
    assert arc2._forecast.state_dict() == sd["forecast"]
    legacy = {k: v for k, v in sd.items() if k != "forecast"}  # saved before early warning
    arc2.load_state_dict(legacy)
    assert arc2._forecast.rule.seen == 0
    arc2.close()


# -- the healthy loops of the usage matrix -----------------------------------------------------
def _matrix_run(pattern, workdir: str, early: EarlyWarning) -> dict:
    from ._matrix import SNAPSHOT_EVERY, Ctx, _train

    s = pattern.build(Ctx("single", 0, 1, workdir))
    config = ArcConfig(snapshot_every=SNAPSHOT_EVERY, early_warning=early, **s.config)
    arc = Arc(s.model, s.optimizer, s.scheduler, scaler=s.scaler, config=config, chaos="",
              **s.arc_kwargs)  # fmt: skip
    try:
        if s.attach is not None:
            s.attach(arc)
        events = _train(s, arc)
        return dict(events=events, stats=arc.stats(), digest=params_digest(s.model))
    finally:
        arc.close()


#: loops whose gradient norm jumps (layers unfrozen), or is noisy (GradScaler skips, SGD
#: momentum, small batches); all 19 single-process loops had no forecast at the default threshold
HEALTHY_LOOPS = ("unfreeze_in_optimizer", "fp16_grad_scaler", "sgd_momentum", "noisy_small_batches")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", HEALTHY_LOOPS)
def test_healthy_loops_with_early_warning_on(tmp_path, name):
    """Healthy loops of tests/_matrix.py (one process), forecasts on and without ``lr_factor``:
    the training is bit for bit the run without them, with no rollback, skip or LR change; at
    the default threshold there is no forecast, and at one 20 times lower (forecasts on noise)
    the training is still untouched."""
    from ._matrix import BY_NAME

    runs = {
        label: _matrix_run(BY_NAME[name], str(tmp_path / label), early)
        for label, early in (
            ("off", EarlyWarning()),
            ("on", EarlyWarning(enabled=True)),
            ("low", EarlyWarning(enabled=True, threshold=0.05, cooldown=5)),
        )
    }
    off = runs["off"]
    assert off["stats"]["rollbacks"] == 0 and off["stats"]["lr_scale"] == 1.0
    assert runs["on"]["stats"]["forecasts"] == 0
    assert runs["low"]["stats"]["forecasts"] > 0
    for label in ("on", "low"):
        r = runs[label]
        assert r["digest"] == off["digest"], label
        assert [e for e in r["events"] if e[2] != REASON] == off["events"], label
        for key in ("rollbacks", "skips", "failures", "lr_scale"):
            assert r["stats"][key] == off["stats"][key], (label, key)
