"""The DDP ride (arc_dist/ddp_hook.py) on a real 2-rank gloo group: what it carries is exact,
and its backward allocates nothing of its own once its buffers exist."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.signals import Col

from ._dist import run_ranks
from ._workload import Data, make_model, params_digest, train

STEPS = 6


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The torch ops dispatched inside it, by name, and whether each allocated its result."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, bool] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = not (func.is_view or func._schema.is_mutable)
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.Linear(256, 8))


def _run(rank: int, world: int) -> dict:
    out: dict = {}
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
    # one bucket (bucket 0 holds every gradient), and several buckets in both gradient layouts
    for name, cap, view in (("one", 100, False), ("many", 0.05, False), ("view", 0.05, True)):
        model = DDP(_model(), bucket_cap_mb=cap, gradient_as_bucket_view=view)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        cfg = ArcConfig(snapshot_every=1000, deep_check_every=3)  # step 3 rides its deep check
        arc = Arc(model, opt, config=cfg, chaos="")
        ride = arc._ride
        rows, ops, ptrs, prev_loss = [], {}, set(), None
        for step in range(STEPS):
            if name == "one":  # this rank's own gradients, before DDP averages them
                with model.no_sync():
                    model(x).square().mean().backward()
                own_sq = sum(float(p.grad.double().square().sum()) for p in model.parameters())
                opt.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            with _Ops() as seen:
                loss.backward()
            reduced_sq = sum(float(p.grad.double().square().sum()) for p in model.parameters())
            taken = ride.with_grad_norm(ride.take(), None)
            mine = taken.matrix[rank].tolist()
            weight_sq = sum(float(p.double().square().sum()) for p in model.parameters())
            rows.append(dict(grad_sq=float(taken.grad_sq), reduced_sq=reduced_sq, row=mine,
                             weight_sq=weight_sq, deep=taken.deep,
                             prev_loss=prev_loss, own_sq=own_sq if name == "one" else None,
                             lr=opt.param_groups[0]["lr"]))  # fmt: skip
            if step >= 2:  # DDP rebuilt its buckets after the first backward: buffers settled
                ptrs.add((taken.matrix.data_ptr(), ride._both.data_ptr()))
                if not taken.deep:  # a deep check takes its norms during backward
                    ops.update(seen.ops)
            ride._arrived = True  # hand the same ride to Arc.step, as if not yet taken
            arc.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            prev_loss = float(loss)
        arc.close()
        out[name] = dict(rows=rows, ops=ops, ptrs=ptrs)
    # the same backward under DDP's own hook: the ops a ride adds to it
    model = DDP(_model(), bucket_cap_mb=0.05)
    for _ in range(3):
        with _Ops() as seen:
            model(x).square().mean().backward()
        model.zero_grad(set_to_none=True)
    out["plain_ops"] = seen.ops
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_run, 2, timeout=180)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["one", "many", "view"])
def test_the_ride_carries_the_reduced_norm_and_this_ranks_row(ranks, name):
    for rank, res in enumerate(ranks):
        for step, r in enumerate(res[name]["rows"]):
            assert math.isclose(r["grad_sq"], r["reduced_sq"], rel_tol=1e-5), (rank, step, r)
            row = r["row"]
            assert row[Col.LR] == pytest.approx(r["lr"]) and row[Col.LR_RATIO] == 1.0
            assert row[Col.PREEMPT] == 0.0
            if r["prev_loss"] is None:
                assert row[Col.LOSS_VALID] == 0.0
            else:
                assert row[Col.LOSS_VALID] == 1.0
                assert row[Col.LOSS] == pytest.approx(r["prev_loss"], rel=1e-6)
            assert r["deep"] == (step == 3) and row[Col.DEEP] == float(step == 3)
            if r["deep"]:
                assert row[Col.WEIGHT_SQ] == pytest.approx(r["weight_sq"], rel=1e-5)
                assert row[Col.STATE_SQ] > 0 and row[Col.STATE_FLAGS] == 0
            if r["own_sq"] is not None:
                assert row[Col.LOCAL_GRAD_SQ] == pytest.approx(r["own_sq"], rel=1e-5)
    # the replicas' matrices agree
    for a, b in zip(ranks[0][name]["rows"], ranks[1][name]["rows"]):
        assert a["grad_sq"] == pytest.approx(b["grad_sq"], rel=1e-6)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["one", "many", "view"])
def test_the_ride_allocates_nothing_per_step(ranks, name):
    for res in ranks:
        assert len(res[name]["ptrs"]) == 1  # one matrix and one bucket-0 buffer, reused
        plain = res["plain_ops"]
        added = {op for op, allocates in res[name]["ops"].items() if allocates and op not in plain}
        assert not added, f"the ride's backward allocates through {sorted(added)}"


def _deep(rank: int, world: int, fault: str | None) -> dict:
    """``fault`` at step 25, before its forward, on rank 1: a deep-check step that rides."""
    model = DDP(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = ArcConfig(snapshot_every=20, deep_check_every=5, divergence_every=0)
    arc = Arc(model, opt, config=cfg, chaos="")
    fired = []

    def damage(step: int) -> None:
        if fault and rank == 1 and step == 25 and not fired:
            fired.append(step)
            with torch.no_grad():
                if fault == "nan_weights":
                    next(model.parameters()).view(-1)[0] = float("nan")
                else:  # the optimizer state of one parameter blown up
                    next(iter(opt.state.values()))["exp_avg"].mul_(1e6)

    events = train(model, opt, arc, Data("mlp", rank), 40, max_calls=80, before_step=damage)
    out = dict(events=events, stats=arc.stats(), digest=params_digest(model))
    arc.close()
    return out


def _deep_all(rank: int, world: int) -> dict:
    return {f: _deep(rank, world, f) for f in (None, "nan_weights", "optimizer_corrupt")}


@pytest.fixture(scope="module")
def deep():
    return run_ranks(_deep_all, 2, timeout=180)


@pytest.mark.timeout(240)
def test_deep_checks_ride_without_a_collective_of_their_own(deep):
    for res in deep:
        clean = res[None]
        assert clean["events"] == []
        # 40 steps, deep checks every 5: only the snapshot steps 0 and 20 run a collective
        assert clean["stats"]["collectives"] == 2, clean["stats"]
        assert clean["stats"]["fast_steps"] == 38


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault,reason", [("nan_weights", "nonfinite_weights"),
                                          ("optimizer_corrupt", "optimizer_state")])  # fmt: skip
def test_a_riding_deep_check_finds_damage_and_blames_its_rank(deep, fault, reason):
    for res in deep:
        # found on the step it happened (a NaN weight would fail the next loss first), rolled
        # back to the snapshot of step 20
        assert res[fault]["events"] == [(20, "failure", reason, (1,), True)]
        assert res[fault]["stats"]["rollbacks"] == 1
    assert deep[0][fault]["digest"] == deep[1][fault]["digest"]


def _deep_error(rank: int, world: int) -> dict:
    """On rank 1 only, the optimizer state breaks the deep check of step 25 (a riding one)."""
    model = DDP(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    arc = Arc(model, opt, config=ArcConfig(snapshot_every=20, deep_check_every=5), chaos="")

    def damage(step: int) -> None:
        if rank == 1 and step == 25:
            next(iter(opt.state.values()))["step"] = torch.zeros(2)  # not a counter

    try:
        train(model, opt, arc, Data("mlp", rank), 40, before_step=damage)
    except Exception as e:  # noqa: BLE001 - what each rank raised is the test's subject
        return dict(type=type(e).__name__, error=str(e), step=arc.global_step)
    return dict(type=None, step=arc.global_step)


@pytest.mark.timeout(240)
def test_a_deep_check_that_raises_on_one_rank_reaches_the_others_inside_step():
    r0, r1 = run_ranks(_deep_error, 2, timeout=180)
    assert r1["type"] == "RuntimeError" and r1["step"] == 25, r1
    assert r0["type"] == "PeerError" and "rank 1 at step 25" in r0["error"], r0
