"""Early warning on organic failures: how far ahead does each predictor flag a run going bad?

Reads the corpus of ``benchmarks/organic.py`` (regenerated when missing), labels each run with
the rule of docs/early_warning.md (fixed before any predictor was written), and evaluates every
predictor the same way:

* split **by run pair** (a failing run and its twin share the model, seed and data order, so
  they always land on the same side); trained predictors and every fitted threshold only see
  the training folds;
* an alarm at step ``t`` may only use the recorded signals of steps ``<= t``: every predictor
  is checked on truncated traces before it is scored (:func:`check_causal`), so one that peeks
  is rejected, not reported;
* recall at a lead of >= 0, 10 and 100 steps: a failing run counts when an alarm fired within
  ``HORIZON`` steps before its onset (or at it) and at least that many steps before; alarms
  earlier than that, and every alarm on a healthy run, are false alarms, per 10,000 healthy
  steps; 95% intervals from a bootstrap over runs.

    python benchmarks/early_warning.py                     # a few minutes on one core
    python benchmarks/early_warning.py --out table.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import organic  # noqa: E402

C = {name: i for i, name in enumerate(organic.COLUMNS)}
#: an alarm more than this many steps before the onset is a false alarm, not a warning
HORIZON = 300
LEADS = (0, 10, 100)
#: the target: >= 60% of failures flagged >= 100 steps ahead at <= 0.5 false alarms per 10k
FA_TARGET = 0.5
TRAIN_LEAD = 100  # trained predictors learn "the onset is at most this many steps away"
SHARP = "Hessian-vector products (every 10 steps)"

# -- the label rule -------------------------------------------------------------------------


def onset(loss, alpha: float = 0.02, k: float = 6.0, start: int = 50, run: int = 3) -> int | None:
    """The failure onset of a loss trace (docs/early_warning.md), or None for a healthy run."""
    mu, var, streak = None, 0.0, 0
    for t, x in enumerate(np.asarray(loss, dtype=np.float64)):
        if not math.isfinite(x):
            return t - streak
        if mu is None:
            mu = x
            continue
        if t >= start and x > mu + k * max(math.sqrt(var), 0.01 * abs(mu)):
            streak += 1
            if streak == run:
                return t - run + 1
            continue  # an exceeding step does not move the averages
        streak = 0
        d = x - mu
        mu += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return None


@dataclass
class Run:
    spec: organic.Spec
    x: np.ndarray  # [steps, len(COLUMNS)]
    onset: int | None

    @property
    def failing(self) -> bool:
        return self.onset is not None

    @property
    def group(self) -> tuple:
        """A run and its twin form one group: they share everything but the setting's knob."""
        return (self.spec.setting, self.spec.seed)

    @property
    def family(self) -> str:
        """The kind of setting, whatever its knob's value (``warmup_past_edge_0.5`` ->
        ``warmup_past_edge``): the stricter split keeps a whole family on one side."""
        head, _, tail = self.spec.setting.rpartition("_")
        return head if head and tail.replace(".", "").isdigit() else self.spec.setting


def load_runs(path: Path = organic.DATA) -> list[Run]:
    return [Run(s, x, onset(x[:, C["loss"]])) for s, x in organic.load(path)]


# -- the harness ----------------------------------------------------------------------------


class LeakError(AssertionError):
    """A predictor's alarm at some step changed when later steps were removed: it used them."""


def check_causal(pred, runs: list[Run], fracs=(0.3, 0.6, 0.9), edges: int = 20) -> None:
    """Raises LeakError unless what ``pred`` computes on each prefix of a trace equals the
    full trace's prefix: its scores when it has any, its alarms always. The prefixes end at a
    few fixed fractions and right after each alarm's first step (up to ``edges`` of them), so
    an alarm that needed a later step is caught where it fires."""
    scored = isinstance(pred, Thresholded)
    for r in runs:
        full = pred.alarms(r.x)
        rising = np.nonzero(full & ~np.concatenate([[False], full[:-1]]))[0][:edges] + 1
        cuts = {max(1, int(len(r.x) * f)) for f in fracs} | set(rising.tolist())
        full_score = pred.score(r.x) if scored else None
        for cut in sorted(cuts):
            same = np.array_equal(pred.alarms(r.x[:cut]), full[:cut])
            if same and scored:
                part = pred.score(r.x[:cut])
                same = np.allclose(part, full_score[:cut], rtol=1e-9, atol=0, equal_nan=True)
            if not same:
                raise LeakError(f"{pred.name}: steps before {cut} of {r.spec} use later steps")


def folds(
    runs: list[Run], k: int = 5, seed: int = 0, by: str = "group"
) -> list[tuple[list[int], list[int]]]:
    """k train/test splits of run indices by ``Run.group`` (or ``Run.family``): no group (so no
    run, no twin pair) on both sides of a split, and every run tested exactly once."""
    key = {i: getattr(r, by) for i, r in enumerate(runs)}
    groups = sorted(set(key.values()))
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_of = {groups[g]: i % k for i, g in enumerate(order)}
    out = []
    for f in range(k):
        test = [i for i in key if fold_of[key[i]] == f]
        train = [i for i in key if fold_of[key[i]] != f]
        out.append((train, test))
    return out


@dataclass
class Outcome:
    failing: bool
    onset: int | None
    lead: int | None  # steps from the first alarm within HORIZON to the onset (None: missed)
    false_alarms: int
    healthy_steps: int


def outcome(run: Run, alarms: np.ndarray) -> Outcome:
    alarms = np.asarray(alarms, dtype=bool)
    if not run.failing:
        return Outcome(False, None, None, int(alarms.sum()), len(alarms))
    o = run.onset
    early = max(0, o - HORIZON)
    hits = np.nonzero(alarms[early : o + 1])[0]
    lead = int(o - (early + hits[0])) if hits.size else None
    return Outcome(True, o, lead, int(alarms[:early].sum()), early)


def evaluate(pred, runs: list[Run], k: int = 5, by: str = "group") -> list[Outcome]:
    out: list[Outcome | None] = [None] * len(runs)
    for train, test in folds(runs, k, by=by):
        pred.fit([runs[i] for i in train])
        # on a sample of the fold's runs, failing and healthy: the check recomputes prefixes
        fail = [runs[i] for i in test if runs[i].failing][:2]
        check_causal(pred, fail + [runs[i] for i in test if not runs[i].failing][:2], edges=5)
        for i in test:
            out[i] = outcome(runs[i], pred.alarms(runs[i].x))
    return out


def summarize(outs: list[Outcome], n_boot: int = 1000, seed: int = 0) -> dict:
    fail = [o for o in outs if o.failing]
    leads = np.array([-1 if o.lead is None else o.lead for o in fail])
    fa = np.array([o.false_alarms for o in outs], dtype=np.float64)
    hs = np.array([o.healthy_steps for o in outs], dtype=np.float64)
    rng = np.random.default_rng(seed)

    def ci(stat, n):
        idx = rng.integers(0, n, size=(n_boot, n))
        vals = np.array([stat(i) for i in idx])
        return np.percentile(vals, [2.5, 97.5])

    res = {"failing": len(fail), "healthy_steps": int(hs.sum())}
    for lead in LEADS:
        res[f"recall@{lead}"] = float(np.mean(leads >= lead)) if len(fail) else math.nan
        res[f"recall@{lead}_ci"] = ci(lambda i, lead=lead: np.mean(leads[i] >= lead), len(fail))
    # the failures that leave room for a 100-step warning at all
    far = np.array([o.lead is not None and o.lead >= 100 for o in fail if o.onset >= 100])
    res["far"] = len(far)
    res["recall@100_far"] = float(far.mean()) if len(far) else math.nan
    hit = leads[leads >= 0]
    res["median_lead"] = float(np.median(hit)) if hit.size else math.nan
    res["fa"] = 1e4 * fa.sum() / max(hs.sum(), 1)
    res["fa_ci"] = ci(lambda i: 1e4 * fa[i].sum() / max(hs[i].sum(), 1), len(outs))
    return res


# -- baselines ------------------------------------------------------------------------------


class Predictor:
    """``alarms(x)`` -> one bool per step, from the rows up to that step only."""

    name = "?"
    needs = "?"  # the signals it reads

    def fit(self, runs: list[Run]) -> None:
        """Learn from training runs (untrained predictors ignore them)."""

    def alarms(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _policy_steps(x):
    """Arc's :class:`~arc_dist.policy.HealthPolicy` (default thresholds, one rank, no deep
    checks) over the recorded rows: ``(step, policy, matrix, verdict)`` per step, the verdict
    judged from the step's loss, gradient norm and LR; the caller observes it."""
    from arc_dist.config import Thresholds
    from arc_dist.layout import Layout
    from arc_dist.policy import HealthPolicy
    from arc_dist.signals import NUM_COLS, Col

    p = HealthPolicy(Thresholds(), Layout.REPLICATED, 1)
    m = np.zeros((1, NUM_COLS))
    m[0, Col.LOSS_VALID] = m[0, Col.LR_RATIO] = 1.0
    for t, row in enumerate(x.astype(np.float64)):
        m[0, Col.LOSS] = row[C["loss"]]
        m[0, Col.GRAD_SQ] = m[0, Col.LOCAL_GRAD_SQ] = row[C["grad_norm"]] ** 2
        m[0, Col.LR] = row[C["lr"]]
        yield t, p, m, p.judge(m)


class ArcPolicy(Predictor):
    """Arc's :class:`~arc_dist.policy.HealthPolicy` with its default thresholds, driven offline
    from the recorded loss, gradient norm and LR (one rank, no deep checks). ``rollback``: the
    alarm is a rollback verdict; otherwise any skipped update too. The recorded run goes on
    as it did: Arc's skips do not change it here."""

    needs = "loss, grad norm, LR"

    def __init__(self, rollback: bool):
        self.rollback = rollback
        self.name = "Arc policy: rollback" if rollback else "Arc policy: skip or rollback"

    def alarms(self, x):
        from arc_dist.policy import FAILURE

        out = np.zeros(len(x), dtype=bool)
        for t, p, m, v in _policy_steps(x):
            p.observe(m, v, applied=not v.skip)
            failed = v.status == FAILURE
            out[t] = failed or (v.skip and not self.rollback)
            if failed:
                p.on_rollback()
        return out


class OlmoSkipStep(Predictor):
    """OLMo-core's ``SkipStepOptimizer``: skip when the loss or the grad norm is more than
    ``sigma_factor`` (6) standard deviations above the mean of the previous values of a
    rolling interval (128), once at least half the interval is there. Non-finite values fail
    the ``<=`` test, so they skip too."""

    name, needs = "OLMo-core 6-sigma skip", "loss, grad norm"

    def alarms(self, x, n: int = 128, sigma: float = 6.0):
        out = np.zeros(len(x), dtype=bool)
        for col in ("loss", "grad_norm"):
            s = pd.Series(x[:, C[col]].astype(np.float64))
            prev = s.shift(1).rolling(n, min_periods=n // 2 - 1)
            ok = (s - prev.mean()) <= sigma * prev.std()
            # len(losses incl. this one) >= n // 2 before it acts
            active = np.arange(len(x)) + 1 >= n // 2
            out |= active & ~ok.to_numpy()
        return out


class KillLossSpike(Predictor):
    """LLM Foundry's ``KillLossSpike`` callback (its spike part): once a window of 100 losses is
    full, a loss above ``outlier_multiplier`` (2) times the window's mean is an outlier; more
    than ``patience`` (4) outliers in a row is a loss spike."""

    name, needs = "LLM Foundry KillLossSpike", "loss"

    def alarms(self, x, window: int = 100, mult: float = 2.0, patience: int = 4):
        loss = x[:, C["loss"]].astype(np.float64)
        mean = pd.Series(loss).shift(1).rolling(window, min_periods=window).mean().to_numpy()
        with np.errstate(invalid="ignore"):
            outlier = loss > mult * mean
        out, count = np.zeros(len(x), dtype=bool), 0
        for t, o in enumerate(outlier):
            count = count + 1 if o else 0
            out[t] = count > patience
        return out


class LightningSpike(Predictor):
    """Lightning's ``SpikeDetection`` (defaults: window 10, warm-up 1, ``rtol`` 2, no ``atol``,
    ``finite_only``): a non-finite loss, or a loss that rose since the last accepted one and is
    at least ``rtol`` times the running mean away from it; spikes do not enter the mean."""

    name, needs = "Lightning SpikeDetection", "loss"

    def alarms(self, x, window: int = 10, warmup: int = 1, rtol: float = 2.0):
        out = np.zeros(len(x), dtype=bool)
        kept: list[float] = []
        last = 0.0
        for t, loss in enumerate(x[:, C["loss"]].astype(np.float64)):
            mean = float(np.mean(kept[-window:])) if kept else 0.0
            if not math.isfinite(loss):
                spike = True
            elif loss - last <= 0:
                spike = False
            else:
                spike = abs(loss - mean) >= abs(rtol * mean)
            out[t] = spike = spike and t >= warmup
            if not spike:
                kept.append(loss)
                last = loss
        return out


# -- features (every one a causal function of the rows up to t) -----------------------------


def _ema_prev(a: np.ndarray, halflife: float) -> np.ndarray:
    """The EMA of the values *before* each step (NaN at step 0)."""
    return pd.Series(a).ewm(halflife=halflife, adjust=False).mean().shift(1).to_numpy()


def _slope(a: np.ndarray, w: int) -> np.ndarray:
    """Least-squares slope of the last ``w`` values, per step."""
    s, t = pd.Series(a), pd.Series(np.arange(len(a), dtype=np.float64))
    return (s.rolling(w, min_periods=3).cov(t) / t.rolling(w, min_periods=3).var()).to_numpy()


def _max_upd(x: np.ndarray) -> np.ndarray:
    """The largest update/weight ratio over the parameter groups, per step."""
    return np.nanmax(x[:, [C[f"upd_{g}"] for g in organic.GROUPS]], axis=1)


def _log(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.maximum(a.astype(np.float64), 1e-30))


def arc_features(x: np.ndarray) -> np.ndarray:
    """The original ARC's 12 signal features as its README describes them (gradient norm, loss trend and
    variance, weight norm, optimizer-state norm, update size), each computed from steps <= t."""
    loss, gn = x[:, C["loss"]].astype(np.float64), _log(x[:, C["grad_norm"]])
    wn, v = _log(x[:, C["weight_norm"]]), _log(x[:, C["v_rms"]])
    upd = _log(_max_upd(x))
    ls = pd.Series(loss)
    feats = [
        loss,
        loss - _ema_prev(loss, 20),
        _slope(loss, 20),
        ls.rolling(20, min_periods=2).std().to_numpy(),
        gn,
        gn - _ema_prev(gn, 20),
        _slope(gn, 20),
        wn,
        wn - _ema_prev(wn, 20),
        np.nan_to_num(v, nan=0.0),  # SGD runs have no second moment
        np.nan_to_num(v - _ema_prev(v, 20), nan=0.0),
        upd,
    ]
    f = np.stack(feats, axis=1)
    return np.nan_to_num(np.clip(f, -1e6, 1e6), nan=0.0)


def _threshold(scores: list[np.ndarray], target: float = FA_TARGET) -> float:
    """The lowest threshold that keeps the training runs' healthy steps at <= ``target`` false
    alarms per 10,000 (alarm: score > threshold)."""
    s = np.sort(np.concatenate(scores))[::-1] if scores else np.array([np.inf])
    s = s[np.isfinite(s)]
    allowed = int(len(s) * target / 1e4)
    return float(s[allowed]) if len(s) > allowed else -np.inf


def _healthy_part(r: Run) -> slice:
    return slice(0, max(0, r.onset - HORIZON)) if r.failing else slice(None)


class Thresholded(Predictor):
    """A causal score per step; its threshold is fitted on the training folds' healthy steps to
    the false-alarm target. A non-finite loss always alarms (every baseline does that too)."""

    thr = math.inf

    def score(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def fit(self, runs):
        self.thr = _threshold([self.score(r.x)[_healthy_part(r)] for r in runs])

    def alarms(self, x):
        s = self.score(x)
        with np.errstate(invalid="ignore"):
            return (s > self.thr) | ~np.isfinite(x[:, C["loss"]])


class OriginalArcClassifier(Thresholded):
    """The original ARC's 12-feature classifier, evaluated honestly: trained per fold on training runs
    only (scaling included), to say "the onset is at most 100 steps away" from features of
    steps <= t; the alarm threshold is fitted on training runs like every other score."""

    needs = "loss, grad norm, weight norm, Adam state norm, update norm"

    def __init__(self, kind: str, sharp: bool = False):
        self.kind, self.sharp = kind, sharp
        self.name = f"ARC 12-feature {'logistic' if kind == 'logistic' else 'MLP'} (honest)"
        if sharp:
            self.name = self.name.replace(" (honest)", " + sharpness (honest)")
            self.needs += ", " + SHARP

    def features(self, x):
        """The 12 features; with ``sharp``, also the edge-of-stability ratio and the sharpness
        growth (0 where not measured)."""
        f = arc_features(x)
        if not self.sharp:
            return f
        extra = np.stack([x[:, C["eos"]].astype(np.float64), _growth("sharpness")(x)], axis=1)
        return np.concatenate([f, np.nan_to_num(np.clip(extra, -1e6, 1e6), nan=0.0)], axis=1)

    def fit(self, runs):
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        xs, ys = [], []
        for r in runs:
            f = self.features(r.x)
            y = np.zeros(len(f), dtype=int)
            if r.failing:
                f = f[: r.onset]  # the onset step itself is detection, not prediction
                y = y[: r.onset]
                y[max(0, r.onset - TRAIN_LEAD) :] = 1
            xs.append(f)
            ys.append(y)
        clf = (
            LogisticRegression(max_iter=2000, class_weight="balanced")
            if self.kind == "logistic"
            else MLPClassifier((32, 16), max_iter=300, random_state=0)
        )
        self.model = make_pipeline(StandardScaler(), clf)
        self.model.fit(np.concatenate(xs), np.concatenate(ys))
        super().fit(runs)

    def score(self, x):
        return self.model.predict_proba(self.features(x))[:, 1]


class Score(Thresholded):
    def __init__(self, name: str, needs: str, fn):
        self.name, self.needs, self.fn = name, needs, fn

    def score(self, x):
        return self.fn(x)


def _log_growth(a: np.ndarray, halflife: float = 50) -> np.ndarray:
    """log(a) against the EMA of log(a) before the step."""
    la = _log(a)
    return la - _ema_prev(la, halflife)


def _upd_growth(x):
    return _log_growth(_max_upd(x))


def _growth(col: str):
    return lambda x: _log_growth(x[:, C[col]])


def _loss_slope(x):
    return _slope(x[:, C["loss"]].astype(np.float64), 20)


def _fft_power(x, w: int = 64):
    """The original ARC's FFT oscillation power: share of the loss's spectral power above a quarter of
    the Nyquist frequency over the last ``w`` steps."""
    loss = x[:, C["loss"]].astype(np.float64)
    out = np.full(len(loss), np.nan)
    for t in range(w - 1, len(loss)):
        seg = loss[t - w + 1 : t + 1]
        if not np.all(np.isfinite(seg)):
            continue
        p = np.abs(np.fft.rfft(seg - seg.mean())) ** 2
        out[t] = p[len(p) // 4 :].sum() / max(p.sum(), 1e-30)
    return out


def _lyapunov(x, w: int = 20):
    """The original ARC's Lyapunov exponent, from parameter velocity: the growth rate of log ||dw||."""
    upd = _max_upd(x)
    dw = _log(upd * x[:, C["weight_norm"]])
    return _slope(dw, w)


def _fisher(x):
    """The original ARC's Fisher information, as the trace of the empirical Fisher: an EMA of the
    squared gradient norm, against its longer-term EMA."""
    g2 = x[:, C["grad_norm"]].astype(np.float64) ** 2
    short = pd.Series(g2).ewm(halflife=5, adjust=False).mean().to_numpy()
    return _log(short) - _log(_ema_prev(g2, 100))


def _conformal(x, w: int = 100):
    """The original ARC's conformal bound: the loss's rank among the last ``w`` losses (a split
    conformal p-value, as a score: 1 - p)."""
    loss = pd.Series(x[:, C["loss"]].astype(np.float64))
    return loss.rolling(w + 1, min_periods=21).rank(pct=True).to_numpy()


class EdgeOfStability(Predictor):
    """The theory's own bar, untrained: alarm while the edge-of-stability ratio (the LR times
    the sharpness against the optimizer's stability bound, ``organic._sharpness``) is above 1."""

    name, needs = "edge-of-stability ratio > 1 (untrained)", SHARP

    def alarms(self, x):
        with np.errstate(invalid="ignore"):
            return (x[:, C["eos"]] > 1.0) | ~np.isfinite(x[:, C["loss"]])


class ArcForecast(Predictor):
    """Arc's shipped early warning (``arc_dist.forecast.Forecaster`` with the default
    ``EarlyWarning``, threshold fixed), fed as Arc feeds it: the verdicts of Arc's policy on
    the steps whose update Arc applies (``ArcPolicy``'s matrix). The alarm is a forecast alone:
    Arc's own skips and rollbacks are the rows above."""

    needs = "grad norm"

    def __init__(self):
        from arc_dist.config import EarlyWarning

        self.name = f"Arc early warning (shipped, threshold {EarlyWarning().threshold:g})"

    def alarms(self, x):
        from arc_dist.config import EarlyWarning
        from arc_dist.forecast import Forecaster
        from arc_dist.policy import FAILURE

        f = Forecaster(EarlyWarning(enabled=True))
        out = np.zeros(len(x), dtype=bool)
        for t, p, m, v in _policy_steps(x):
            if v.status == FAILURE:
                p.on_rollback()
                f.on_rollback()
                continue
            p.observe(m, v, applied=not v.skip)
            if not v.skip:
                out[t] = f.observe(t, v) is not None
        return out


def _arc_forecast_score(x):
    """The shipped rule's score (``arc_dist.forecast.GradGrowth``) over the recorded grad norms."""
    from arc_dist.forecast import GradGrowth

    rule = GradGrowth()
    return np.array([rule.update(g) for g in x[:, C["grad_norm"]].astype(np.float64).tolist()])


def _log_growth_ema(x, col: str, short: float, long: float):
    """A short EMA of log(col) (the step included) against a long one of the steps before."""
    la = _log(x[:, C[col]])
    return pd.Series(la).ewm(halflife=short, adjust=False).mean().to_numpy() - _ema_prev(la, long)


def _log_loss_slope(x, w: int = 20):
    """The log loss's change over ``w`` steps, from its least-squares slope."""
    return _slope(_log(x[:, C["loss"]]), w) * w


def forecast_candidates() -> list[Predictor]:
    """The rules Arc's early warning was chosen from (``--candidates``): scores of what Arc
    agrees on every step (loss, grad norm), each with a threshold fitted on the training folds."""
    g, lo, both = "grad norm", "loss", "loss, grad norm"
    out = [(f"grad-norm growth, half-life {h}", g, _growth_hl("grad_norm", h)) for h in (20, 100)]
    out += [
        (f"grad norm: EMA {a} against EMA {b}", g,
         lambda x, a=a, b=b: _log_growth_ema(x, "grad_norm", a, b))
        for a, b in ((3, 50), (5, 100), (10, 100))
    ]  # fmt: skip
    out += [
        (f"log-loss slope ({w} steps)", lo, lambda x, w=w: _log_loss_slope(x, w)) for w in (10, 20)
    ]
    out.append(("loss growth, half-life 50", lo, _growth_hl("loss", 50)))
    out.append(("grad-norm growth + log-loss slope", both,
                lambda x: _growth("grad_norm")(x) + _log_loss_slope(x)))  # fmt: skip
    out.append(("min(grad-norm growth, 5 x log-loss slope)", both,
                lambda x: np.minimum(_growth("grad_norm")(x), 5 * _log_loss_slope(x))))  # fmt: skip
    return [Score(name, needs, fn) for name, needs, fn in out]


def _growth_hl(col: str, halflife: float):
    return lambda x: _log_growth(x[:, C[col]], halflife)


def predictors() -> list[Predictor]:
    return [
        ArcPolicy(rollback=True),
        ArcPolicy(rollback=False),
        OlmoSkipStep(),
        KillLossSpike(),
        LightningSpike(),
        OriginalArcClassifier("logistic"),
        OriginalArcClassifier("mlp"),
        Score("update/weight ratio growth", "weight deltas (a copy of the weights)", _upd_growth),
        Score("grad-norm growth", "grad norm", _growth("grad_norm")),
        Score("Adam second-moment growth (max)", "Adam state", _growth("v_max")),
        Score("max attention logit growth", "attention logits", _growth("max_logit")),
        Score("loss slope (20 steps)", "loss", _loss_slope),
        Score("ARC: FFT oscillation power", "loss", _fft_power),
        Score("ARC: Lyapunov (velocity growth)", "weight deltas", _lyapunov),
        Score("ARC: Fisher trace growth", "grad norm", _fisher),
        Score("ARC: conformal loss rank", "loss", _conformal),
        Score("sharpness growth", SHARP, _growth("sharpness")),
        Score("edge-of-stability ratio", SHARP, lambda x: x[:, C["eos"]].astype(np.float64)),
        EdgeOfStability(),
        OriginalArcClassifier("mlp", sharp=True),
        ArcForecast(),
        Score("Arc early warning score, threshold fitted", "grad norm", _arc_forecast_score),
    ]


# -- the report -----------------------------------------------------------------------------


def _pct(v, lo_hi) -> str:
    return f"{100 * v:.0f}% ({100 * lo_hi[0]:.0f}-{100 * lo_hi[1]:.0f})"


def table(runs: list[Run], preds: list[Predictor], by: str = "group") -> str:
    lines = [
        "| predictor | reads | recall lead>=0 | lead>=10 | lead>=100 | lead>=100, onset>=100 | "
        "median lead | false alarms /10k healthy steps | CPU ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        outs = evaluate(p, runs, k=len({r.family for r in runs}) if by == "family" else 5, by=by)
        t0 = time.process_time()  # the cost of the alarms alone, offline, per recorded step
        for r in runs:
            p.alarms(r.x)
        ms = 1e3 * (time.process_time() - t0) / sum(len(r.x) for r in runs)
        s = summarize(outs)
        lines.append(
            f"| {p.name} | {p.needs} | {_pct(s['recall@0'], s['recall@0_ci'])} | "
            f"{_pct(s['recall@10'], s['recall@10_ci'])} | "
            f"{_pct(s['recall@100'], s['recall@100_ci'])} | "
            f"{100 * s['recall@100_far']:.0f}% of {s['far']} | {s['median_lead']:.0f} | "
            f"{s['fa']:.1f} ({s['fa_ci'][0]:.1f}-{s['fa_ci'][1]:.1f}) | {ms:.2f} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def corpus_summary(runs: list[Run]) -> str:
    lines = [
        "| setting | runs | failing (label) | onset steps (min-median-max) |",
        "|---|---|---|---|",
    ]
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.spec.setting, []).append(r)
    for name, rs in by.items():
        ons = [r.onset for r in rs if r.failing]
        span = f"{min(ons)}-{int(np.median(ons))}-{max(ons)}" if ons else "-"
        lines.append(f"| {name} | {len(rs)} | {len(ons)} | {span} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=organic.DATA)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--split",
        choices=("group", "family"),
        default="group",
        help="group: a run and its twin stay together (default); family: leave one kind of "
        "setting out, all its runs together (tests whether a predictor generalises)",
    )
    ap.add_argument("--only", default="", help="comma-separated substrings of predictor names")
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="also the rules Arc's early warning was chosen from (docs/early_warning.md)",
    )
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # NaN slices of diverged steps, sklearn convergence
    if not a.data.exists():
        sys.exit(f"{a.data} is missing: run benchmarks/organic.py first")
    runs = load_runs(a.data)
    fail = [r for r in runs if r.failing]
    healthy = sum(len(r.x) for r in runs if not r.failing)
    head = (
        f"{len(runs)} runs, {len(fail)} failing by the label rule "
        f"({sum(r.onset >= 100 for r in fail)} with the onset at step >= 100), "
        f"{healthy} steps of healthy runs"
    )
    print(head)
    corpus = corpus_summary(runs)
    print(corpus)
    preds = predictors() + (forecast_candidates() if a.candidates else [])
    preds = [p for p in preds if not a.only or any(w in p.name for w in a.only.split(","))]
    result = table(runs, preds, by=a.split)
    if a.out:
        a.out.write_text(f"{head}\n\n{corpus}\n\n{result}\n")


if __name__ == "__main__":
    main()
