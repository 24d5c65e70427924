"""Single-process mode (no torch.distributed) and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from arc_dist import Arc, ArcConfig, UnrecoverableError

from ._workload import (
    EVERY_FAULT,
    EVERY_FAULT_EVENTS,
    Data,
    eval_loss,
    make_model,
    params_digest,
    train,
)
from .checkpoint_helpers import Position


def _setup(chaos="", model_kind="mlp", constant_schedule=False, **cfg):
    model = make_model(model_kind)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0) if constant_schedule else None
    arc = Arc(model, opt, sched, config=ArcConfig(snapshot_every=10, **cfg), chaos=chaos)
    return model, opt, arc, Data(model_kind, 0)


def test_single_process_recovers_from_every_step_fault():
    """One-step anomalies skip their update; damaged state (an LR the scheduler does not
    explain, NaN weights, a reset optimizer) rolls back."""
    ref_model, ref_opt, ref_arc, ref_data = _setup()
    assert train(ref_model, ref_opt, ref_arc, ref_data, 120) == []
    model, opt, arc, data = _setup(
        EVERY_FAULT,
        constant_schedule=True,  # an LR spike is evidence against an attached scheduler
    )
    events = train(model, opt, arc, data, 120, max_calls=400, sched=arc.scheduler)
    assert [(e[1], e[2], e[4]) for e in events] == EVERY_FAULT_EVENTS
    assert arc.global_step == 120 and arc.stats()["rollbacks"] == 3 and arc.stats()["skips"] == 3
    assert arc.stats()["collectives"] == 0 and arc.stats()["host_syncs"] == arc._calls
    assert math.isfinite(eval_loss(model, data))
    assert eval_loss(model, data) <= 1.5 * eval_loss(ref_model, ref_data) + 0.02


def test_rollback_restores_exact_state():
    model, opt, arc, data = _setup(max_skips=0)  # a NaN loss rolls back at once
    train(model, opt, arc, data, 10)
    snap_digest, snap_opt = params_digest(model), copy.deepcopy(opt.state_dict())
    # the next step snapshots step 10; corrupt everything after it and fail
    loss = data.loss(model, data.next())
    loss.backward()
    healthy = arc.step(loss)
    assert healthy.status == "healthy"
    assert healthy.failed_step is None and healthy.restored_step is None
    opt.step()
    opt.zero_grad()
    loss = data.loss(model, data.next()) * float("nan")
    loss.backward()
    action = arc.step(loss)
    assert action.rolled_back and action.step == 10 and arc.global_step == 10
    # what the rollback cost, for the job's log line
    assert (action.failed_step, action.restored_step) == (11, 10)
    assert params_digest(model) == snap_digest
    restored = opt.state_dict()
    for k, st in snap_opt["state"].items():
        for name, v in st.items():
            assert torch.equal(restored["state"][k][name], v)
    # the first rollback keeps the LR: one bad event is not a reason to train slower
    assert restored["param_groups"][0]["lr"] == snap_opt["param_groups"][0]["lr"]
    assert all(p.grad is None for p in model.parameters())


def test_persistent_fault_raises_unrecoverable():
    model, opt, arc, data = _setup("nan_loss@25!", max_rollbacks=2)
    with pytest.raises(UnrecoverableError, match=r"nonfinite_loss on ranks \[0\]"):
        train(model, opt, arc, data, 100, max_calls=400)


def test_grad_scaler_overflow_is_a_skip_not_a_failure():
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    arc = Arc(model, opt, scaler=scaler, config=ArcConfig(snapshot_every=10), chaos="nan_grad@15")
    data = Data("mlp", 0)
    actions = []
    while arc.global_step < 30:
        loss = data.loss(model, data.next())
        scaler.scale(loss).backward()
        a = arc.step(loss)
        actions.append(a)
        if not a.should_skip:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    skipped = [a for a in actions if a.should_skip]
    assert [(a.status, a.reason, a.rolled_back) for a in skipped] == [
        ("warning", "amp_overflow", False)
    ]
    assert scaler.get_scale() == 2.0**9
    assert arc.stats()["rollbacks"] == 0 and arc.stats()["skips"] == 1


def _amp_clip_loop(model, opt, scaler, arc, data, steps):
    """The AMP loop with clipping: unscale_ before clip_grad_norm_, the norm handed to Arc."""
    actions = []
    while arc.global_step < steps and len(actions) < 3 * steps:
        loss = data.loss(model, data.next())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        a = arc.step(loss, grad_norm=norm)
        actions.append(a)
        if not a.should_skip:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return actions


def test_amp_with_clipping_survives_a_rollback_and_a_skip():
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    # deep checks on every step: the damaged weights are seen (and rolled back) at once
    config = ArcConfig(snapshot_every=10, deep_check_every=1)
    arc = Arc(model, opt, scaler=scaler, config=config, chaos="nan_weights@15 nan_grad@24")
    actions = _amp_clip_loop(model, opt, scaler, arc, Data("mlp", 0), 30)
    assert arc.global_step == 30
    assert [(a.reason, a.rolled_back, a.step) for a in actions if a.status != "healthy"] == [
        ("nonfinite_weights", True, 10),
        ("amp_overflow", False, 24),
    ]
    assert arc.stats()["rollbacks"] == 1 and arc.stats()["skips"] == 1
    assert math.isfinite(scaler.get_scale()) and math.isfinite(eval_loss(model, Data("mlp", 0)))


def test_restoring_a_scaler_mid_step_leaves_it_ready_for_the_next_step():
    """A durable checkpoint loaded after ``unscale_`` (the snapshot path is tested above)."""
    from arc_dist.checkpoint import TrainState

    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    state = TrainState(model, opt, scaler=scaler)
    data = Data("mlp", 0)
    scaler.scale(data.loss(model, data.next())).backward()
    saved = copy.deepcopy(state.state_dict())
    scaler.unscale_(opt)
    state.load_state_dict(saved)
    scaler.unscale_(opt)  # the next step's unscale_
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**10


def test_no_false_positives_with_schedulers_and_clean_lrs():
    for lr, sched_kind in [(1e-2, "cosine"), (3e-3, "step"), (1e-3, "warmup")]:
        model = make_model("lm")
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        if sched_kind == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100)
        elif sched_kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, 20, gamma=0.5)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30))
        arc = Arc(
            model, opt, sched, config=ArcConfig(snapshot_every=10, deep_check_every=1), chaos=""
        )
        assert train(model, opt, arc, Data("lm", 0), 100, sched=sched) == [], (lr, sched_kind)


def test_backoff_survives_the_scheduler():
    """A failure that recurs before recovery backs off the LR; the scheduler keeps it."""
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    config = ArcConfig(snapshot_every=5, lr_restore=False, max_skips=0)
    arc = Arc(model, opt, sched, config=config, chaos="nan_loss@12 nan_loss@13")
    train(model, opt, arc, Data("mlp", 0), 20, sched=sched)
    assert arc.stats()["rollbacks"] == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_bad_input_is_named_and_nothing_is_mutated():
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = params_digest(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Arc("model", opt)
    with pytest.raises(TypeError, match="Optimizer"):
        Arc(model, "adam")
    with pytest.raises(TypeError, match="ArcConfig"):
        Arc(model, opt, config={"snapshot_every": 5})
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not parameters of the model"):
        Arc(model, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        Arc(model, opt, process_group=object())
    arc = Arc(model, opt, chaos="")
    loss = model(torch.randn(4, 16)).mean()
    with pytest.raises(ValueError, match="no gradients"):
        arc.step(loss)
    with pytest.raises(ValueError, match="scalar loss"):
        arc.step(model(torch.randn(4, 16)))
    with pytest.raises(ValueError, match="scalar loss"):
        arc.step(0.5)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        arc.save()
    assert params_digest(model) == before and arc.global_step == 0


def test_env_var_supplies_chaos_but_never_overrides(monkeypatch):
    monkeypatch.setenv("ARC_CHAOS", "nan_loss@3")
    model, opt, arc, data = _setup(chaos=None)
    assert [f.kind for f in arc.chaos.faults] == ["nan_loss"]
    model, opt, arc, data = _setup(chaos="")  # none, and no forward hook on the model
    assert arc.chaos is None and not model._forward_hooks
    monkeypatch.setenv("ARC_CHAOS", "nan_loss3")
    with pytest.raises(ValueError, match="ARC_CHAOS|KIND@STEP"):
        _setup(chaos=None)


def test_a_multi_process_launch_without_a_process_group_is_refused(monkeypatch, tmp_path):
    """torchrun sets WORLD_SIZE; a script that forgets init_process_group would otherwise run
    every process as rank 0 of 1 into the same checkpoint directory."""
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2.*init_process_group\(\) before Arc"):
        Arc(model, opt, checkpoint_dir=str(tmp_path / "ck"), chaos="")
    assert not (tmp_path / "ck").exists()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single-process torchrun launch is fine
    Arc(model, opt, chaos="").close()


def test_context_manager_closes():
    model, opt, arc, data = _setup()
    with arc:
        train(model, opt, arc, data, 3)
    with pytest.raises(RuntimeError, match="after close"):
        arc.step(torch.tensor(1.0))


@pytest.mark.parametrize("per_rank", [False, True])
def test_registered_state_round_trips(tmp_path, per_rank):
    url = f"memory://arc-register-{per_rank}"
    model, opt, _, data = _setup()
    arc = Arc(model, opt, checkpoint_dir=url, config=ArcConfig(async_checkpoint=False), chaos="")
    pos = Position()
    arc.register("data", pos, per_rank=per_rank)
    with pytest.raises(ValueError, match="taken"):
        arc.register("data", pos)
    train(model, opt, arc, data, 7)
    pos.value = 7
    arc.save()
    arc.close()
    model2, opt2, _, _ = _setup()
    arc2 = Arc(model2, opt2, checkpoint_dir=url, config=ArcConfig(async_checkpoint=False), chaos="")
    pos2 = Position()
    arc2.register("data", pos2, per_rank=per_rank)
    assert arc2.resume() == 7 and pos2.value == 7
    assert params_digest(model2) == params_digest(model)
    arc2.close()


# -- change is not damage ------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])
        self.head = 0

    def forward(self, x):
        return self.heads[self.head](self.trunk(x))


def _run_clean(model, opt, steps, before_step=None, **cfg):
    """A clean run through the contract's loop: no failure, no rollback, every step reached."""
    config = ArcConfig(snapshot_every=10, deep_check_every=5, **cfg)
    arc = Arc(model, opt, config=config, chaos="")
    data = Data("mlp", 0)
    events = []
    while arc.global_step < steps:
        if before_step is not None:
            before_step(arc.global_step)
        loss = data.loss(model, data.next())
        loss.backward()
        action = arc.step(loss)
        if action.status != "healthy":
            events.append((action.step, action.status, action.reason, action.should_skip))
        if not action.should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    stats = arc.stats()
    assert [e for e in events if e[1] == "failure"] == [] and stats["rollbacks"] == 0, events
    assert stats["failures"] == 0 and arc.global_step == steps
    return arc, events


def test_alternating_heads_with_adamw():
    """Each head misses its gradient on alternate steps, so AdamW's per-parameter step counters
    differ: that is how the optimizer works, not damage."""
    model = TwoHeads()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def switch(step):
        model.head = step % 2

    arc, events = _run_clean(model, opt, 120, switch)
    counters = {float(st["step"]) for st in opt.state.values()}
    assert len(counters) > 1 and events == []


def test_freezing_then_unfreezing_layers():
    """Layers frozen for the first 60 steps gain optimizer state when unfrozen (the state norm
    grows, their step counters start at 1)."""
    model = make_model("mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    frozen = list(model[0].parameters()) + list(model[2].parameters())
    for p in frozen:
        p.requires_grad_(False)

    def unfreeze(step):
        if step == 60:
            for p in frozen:
                p.requires_grad_(True)

    arc, events = _run_clean(model, opt, 140, unfreeze)
    assert all(p in opt.state for p in frozen) and events == []


def test_a_rollback_past_add_param_group_keeps_the_group():
    """The loop adds an unfrozen layer with ``add_param_group`` once (after step 12), then damage
    at step 15 rolls back to the snapshot of step 10, taken before the group existed: the group
    stays (without state, as then) and the layer goes on training."""
    model = make_model("mlp")
    layer = list(model[0].parameters())
    before = [p.detach().clone() for p in layer]
    for p in layer:
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    arc = Arc(model, opt, config=ArcConfig(snapshot_every=10), chaos="nan_weights@15")
    data = Data("mlp", 0)
    while arc.global_step < 30:
        if arc.global_step >= 12 and len(opt.param_groups) == 1:
            for p in layer:
                p.requires_grad_(True)
            opt.add_param_group({"params": layer, "lr": 1e-3})
        loss = data.loss(model, data.next())
        loss.backward()
        if not arc.step(loss).should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert arc.stats()["rollbacks"] == 1 and arc.global_step == 30
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == layer
    assert all(p in opt.state and not torch.equal(p, b) for p, b in zip(layer, before))


def test_manual_lr_warmup_from_zero_and_a_backoff_on_top():
    """The loop sets the LR itself every step (no scheduler), from 0: no LR spike. After a
    failure that recurs, Arc's backoff stays a multiplier on the loop's LR."""
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.0)

    def warmup(step):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, step / 30)

    _run_clean(model, opt, 100, warmup)

    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    config = ArcConfig(snapshot_every=10, recovery_steps=20, max_skips=0)
    arc = Arc(model, opt, config=config, chaos="nan_loss@45 nan_loss@46")
    data = Data("mlp", 0)
    lrs = {}
    while arc.global_step < 80:
        warmup(arc.global_step)
        loss = data.loss(model, data.next())
        loss.backward()
        action = arc.step(loss)
        lrs[arc.global_step] = opt.param_groups[0]["lr"]
        if not action.should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    assert arc.stats()["rollbacks"] == 2 and arc.stats()["failures"] == 2
    assert lrs[50] == pytest.approx(0.5 * 3e-3)  # the loop set 3e-3; the backoff stays on top
    assert lrs[80] == pytest.approx(3e-3) and arc.stats()["lr_scale"] == 1.0  # restored
