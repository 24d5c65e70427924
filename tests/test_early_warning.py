"""The early-warning harness (benchmarks/early_warning.py): the label rule, the split by run, and
the check that rejects a predictor that reads steps after the one it alarms on."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("sklearn")  # the digits of the corpus, the seed's classifiers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import early_warning as ew  # noqa: E402
import organic  # noqa: E402


def _flat(n: int, seed: int = 0) -> np.ndarray:
    """A healthy loss trace: a slow decline with 1% noise."""
    rng = np.random.default_rng(seed)
    return np.linspace(2.0, 1.5, n) * (1 + 0.01 * rng.standard_normal(n))


def test_label_rule_on_hand_made_traces():
    healthy = _flat(400)
    assert ew.onset(healthy) is None

    nan = healthy.copy()
    nan[10] = np.nan
    assert ew.onset(nan) == 10  # a non-finite loss counts from step 0 on

    two = healthy.copy()
    two[200:202] = 5.0  # two steps above the bar, then back: a spike, not a failure
    assert ew.onset(two) is None

    three = two.copy()
    three[300:303] = 5.0  # three in a row: the onset is the first of them
    assert ew.onset(three) == 300

    early = healthy.copy()
    early[20:30] = 5.0  # before step 50 only a non-finite loss labels
    assert ew.onset(early) is None

    rise = healthy.copy()
    rise[250:253] = 5.0
    rise[253] = np.inf  # the streak's start is the onset, not the Inf after it
    assert ew.onset(rise) == 250


def _runs() -> list[ew.Run]:
    runs = []
    for setting in ("a", "b", "c"):
        for seed in range(4):
            for variant in ("fail", "twin"):
                loss = _flat(300, seed)
                if variant == "fail":
                    loss[200:] = np.inf
                x = np.ones((300, len(organic.COLUMNS)), dtype=np.float32)
                x[:, ew.C["loss"]] = loss
                x[:, ew.C["grad_norm"]] = 1 + 0.01 * np.arange(300)
                spec = organic.Spec(setting, variant, seed)
                runs.append(ew.Run(spec, x, ew.onset(loss)))
    return runs


def test_split_never_puts_one_run_or_its_twin_on_both_sides():
    runs = _runs()
    tested = []
    for train, test in ew.folds(runs, k=5):
        assert not set(train) & set(test)
        assert {runs[i].group for i in train}.isdisjoint({runs[i].group for i in test})
        tested += test
    assert sorted(tested) == list(range(len(runs)))  # every run is tested exactly once
    for train, test in ew.folds(runs, k=3, by="family"):  # the stricter split: whole settings
        assert {runs[i].family for i in train}.isdisjoint({runs[i].family for i in test})


def test_family_strips_only_the_knob_value():
    spec = organic.Spec("warmup_past_edge_0.5", "fail", 0)
    assert ew.Run(spec, np.zeros((1, 1)), None).family == "warmup_past_edge"
    spec = organic.Spec("fp16_adam_no_scaling", "fail", 0)
    assert ew.Run(spec, np.zeros((1, 1)), None).family == "fp16_adam_no_scaling"


class _NormalisedByRun(ew.Thresholded):
    """Peeks: scales each step's loss by the maximum over the whole trace."""

    name = "peeks at the run's maximum"

    def score(self, x):
        loss = np.nan_to_num(x[:, ew.C["loss"]], posinf=1e9)
        return loss / loss.max()


class _LooksAhead(ew.Predictor):
    """Peeks: alarms when the loss five steps later is not finite."""

    name = "looks five steps ahead"

    def alarms(self, x):
        bad = ~np.isfinite(x[:, ew.C["loss"]])
        return np.concatenate([bad[5:], np.zeros(min(5, len(x)), dtype=bool)])


def test_a_predictor_that_peeks_is_rejected():
    runs = _runs()
    for cheat in (_NormalisedByRun(), _LooksAhead()):
        with pytest.raises(ew.LeakError):
            ew.evaluate(cheat, runs)


def test_every_shipped_predictor_is_causal():
    runs = _runs()
    preds = [p for p in ew.predictors() if not isinstance(p, ew.OriginalArcClassifier)]
    preds.append(ew.OriginalArcClassifier("logistic"))
    for p in preds:
        p.fit(runs[:4])
        ew.check_causal(p, runs[:2], fracs=(0.5,), edges=2)


def test_outcome_counts_leads_and_false_alarms():
    runs = _runs()
    fail = next(r for r in runs if r.failing)
    assert fail.onset == 200
    alarms = np.zeros(len(fail.x), dtype=bool)
    alarms[[0, 150]] = True
    out = ew.outcome(fail, alarms)
    assert out.lead == 200 and out.false_alarms == 0  # step 0 is within HORIZON (300)
    long = replace(fail, x=np.ones((400, fail.x.shape[1]), dtype=np.float32), onset=350)
    far = ew.outcome(long, np.isin(np.arange(400), [10, 300]))
    # step 10 is more than HORIZON before the onset: a false alarm among 50 healthy steps
    assert (far.lead, far.false_alarms, far.healthy_steps) == (50, 1, 50)
    late = ew.outcome(fail, np.arange(len(fail.x)) == 200)
    assert late.lead == 0
    healthy = next(r for r in runs if not r.failing)
    h = ew.outcome(healthy, np.arange(300) % 100 == 0)
    assert (h.false_alarms, h.healthy_steps, h.lead) == (3, 300, None)
    s = ew.summarize([out, late, h], n_boot=50)
    assert s["recall@100"] == 0.5 and s["recall@0"] == 1.0
    assert s["fa"] == pytest.approx(1e4 * 3 / 300)


def test_a_corpus_run_past_the_edge_records_every_step_until_it_diverges():
    """A real run of the corpus: the regression MLP at plain-SGD LR 0.4 (past its edge of ~0.28)
    blows up on its own within a few dozen steps; the twin at 0.2 does not."""
    bad = organic.run(organic.Spec("t", "fail", 0, model="reg", opt="sgd", momentum=0.0, lr=0.4,
                                   steps=60), None)  # fmt: skip
    good = organic.run(organic.Spec("t", "twin", 0, model="reg", opt="sgd", momentum=0.0, lr=0.2,
                                    steps=60), None)  # fmt: skip
    assert bad.shape[1] == good.shape[1] == len(organic.COLUMNS)
    assert len(good) == 60 and ew.onset(good[:, ew.C["loss"]]) is None
    assert len(bad) < 60 and not np.isfinite(bad[-1, ew.C["loss"]])  # rows stop at the Inf/NaN
    assert ew.onset(bad[:, ew.C["loss"]]) == len(bad) - 1


def test_power_iteration_finds_the_top_eigenvalue_of_a_known_hessian():
    """On ``0.5 * sum(a * w^2)`` the Hessian is ``diag(a)``: power iteration by double backward
    finds its top eigenvalue, and that of ``S H S`` under a diagonal scaling ``S``."""
    torch = pytest.importorskip("torch")
    a = [torch.tensor([1.0, 3.0, 0.5]), torch.tensor([[2.0, 7.0], [0.1, 4.0]])]
    w = [torch.ones_like(t, requires_grad=True) for t in a]
    loss = sum(0.5 * (t * p * p).sum() for t, p in zip(a, w))
    grads = torch.autograd.grad(loss, w, create_graph=True)
    v = organic._unit(w, torch.Generator().manual_seed(0))
    lam, v = organic._top_eig(grads, w, v, 60)
    assert float(lam) == pytest.approx(7.0, rel=1e-4)
    assert float(v[1][0, 1].abs()) == pytest.approx(1.0, rel=1e-3)  # the eigenvector
    scale = [torch.tensor([1.0, 2.0, 1.0]), torch.ones(2, 2)]  # 3 * 2^2 = 12 now leads
    v = organic._unit(w, torch.Generator().manual_seed(1))
    lam, _ = organic._top_eig(grads, w, v, 60, scale)
    assert float(lam) == pytest.approx(12.0, rel=1e-4)


def test_measuring_sharpness_leaves_the_training_run_untouched():
    spec = organic.Spec("t", "twin", 0, model="reg", opt="sgd", momentum=0.0, lr=0.2, steps=25)
    plain = organic.run(spec, None, sharp_every=0)
    cost: list = []
    sharp = organic.run(spec, None, sharp_every=10, cost=cost)
    s, e = ew.C["sharpness"], ew.C["eos"]
    assert np.array_equal(plain[:, :s], sharp[:, :s], equal_nan=True)  # the others, bit for bit
    assert np.isnan(plain[:, s:]).all()
    assert np.isfinite(sharp[:, s:]).all() and (sharp[:, s] > 0).all()
    # held between measurements (steps 0, 10, 20); the ratio is lr * sharpness / 2 here
    assert (sharp[:10, s] == sharp[0, s]).all() and sharp[10, s] != sharp[9, s]
    np.testing.assert_allclose(sharp[:, e], 0.2 * sharp[:, s] / 2, rtol=1e-5)
    assert len(cost) == 2 and min(cost) > 0


def test_the_shipped_early_warning_row_runs_arcs_own_rule():
    """The row of Arc's early warning drives ``arc_dist.forecast.Forecaster`` (default
    ``EarlyWarning``) with Arc's policy verdicts: it forecasts a growing gradient norm once,
    after the growth starts, and stays quiet on a flat one."""
    from arc_dist.config import EarlyWarning

    x = np.ones((300, len(organic.COLUMNS)), dtype=np.float32)
    x[:, ew.C["loss"]] = _flat(300)
    flat = ew.ArcForecast().alarms(x)
    x[150:, ew.C["grad_norm"]] = 1.15 ** np.arange(150)
    grow = ew.ArcForecast().alarms(x)
    assert not flat.any()
    assert grow.sum() == 1 and 150 < np.argmax(grow) <= 165
    assert f"threshold {EarlyWarning().threshold:g}" in ew.ArcForecast().name
