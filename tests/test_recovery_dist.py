"""Agreement and recovery on real gloo process groups (2 and 4 ranks, DDP and FSDP2).

Each rank group is spawned once per module and runs every scenario in turn (importing torch
in a fresh process costs seconds here); the tests then assert on what each rank reported.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig, UnrecoverableError

from ._dist import run_ranks
from ._workload import Data, eval_loss, make_model, params_digest, train

STEPS = 80
FAULT_STEP = 40
#: fault -> (reason, response). A one-step anomaly skips its update (the state is intact
#: without it); evidence of damaged state rolls back.
ONE_RANK_FAULTS = {
    "nan_loss": ("nonfinite_loss", "skip"),
    "inf_loss": ("nonfinite_loss", "skip"),
    "loss_spike": ("loss_spike", "skip"),
    "grad_explosion": ("grad_explosion", "skip"),
    "nan_grad": ("nonfinite_grad", "skip"),
    "lr_spike": ("lr_spike", "rollback"),
    "nan_weights": ("nonfinite_weights", "rollback"),
    "optimizer_reset": ("optimizer_state", "rollback"),
    "optimizer_corrupt": ("optimizer_state", "rollback"),
}


def _optimizer(name: str, model, lr: float):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _run(rank, world, sc: dict) -> dict:
    model = make_model(sc["model"], sc.get("seed", 0))
    if sc.get("fsdp"):
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        wrapped = model
    else:
        wrapped = DDP(model)
    opt = _optimizer(sc.get("opt", "adam"), wrapped, sc.get("lr", 3e-3))
    sched = None
    if sc.get("warmup"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    elif sc.get("constant_schedule"):  # an LR spike on every rank is evidence against it
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    data = Data(sc["model"], rank, sc.get("seed", 0))
    config = ArcConfig(
        snapshot_every=10,
        deep_check_every=10,
        max_rollbacks=2,
        recovery_steps=10,
        ride_ddp=sc.get("ride_ddp", True),
    )
    group = None
    if sc.get("own_group"):  # a process group of its own instead of the default one
        import torch.distributed as dist

        group = dist.new_group(list(range(world)), backend="gloo")
    arc = Arc(wrapped, opt, sched, config=config, chaos=sc.get("chaos", ""), process_group=group)
    out = {"error": None}
    try:
        out["events"] = train(
            wrapped,
            opt,
            arc,
            data,
            sc.get("steps", STEPS),
            max_calls=400,
            sched=sched,
            clip=sc.get("clip"),
        )
    except UnrecoverableError as e:
        out["error"] = str(e)
        return out
    out.update(
        digest=params_digest(wrapped),
        eval=eval_loss(wrapped, data),
        step=arc.global_step,
        stats=arc.stats(),
        fired=list(arc.chaos.fired) if arc.chaos else [],
    )
    arc.close()
    return out


def _run_all(rank, world, scenarios: dict) -> dict:
    return {name: _run(rank, world, sc) for name, sc in scenarios.items()}


CLEAN = {
    f"clean-{m}-{o}-{lr}-s{s}": dict(model=m, opt=o, lr=lr, seed=s, warmup=(m == "lm"), steps=120)
    for m, o, lr, s in [
        ("mlp", "adam", 3e-3, 0),
        ("mlp", "adam", 3e-3, 1),
        ("mlp", "sgd", 5e-2, 2),
        ("mlp", "adam", 3e-2, 3),
        ("lm", "adamw", 3e-3, 0),
        ("lm", "adamw", 1e-2, 1),
    ]
}
TWO_RANK = {
    **CLEAN,
    "reference-mlp": dict(model="mlp"),
    "reference-lm": dict(model="lm", opt="adamw", warmup=True, steps=150),
    **{f"one-{k}": dict(model="mlp", chaos=f"{k}@{FAULT_STEP}/1") for k in ONE_RANK_FAULTS},
    **{
        f"all-{k}": dict(model="mlp", chaos=f"{k}@{FAULT_STEP}", constant_schedule=k == "lr_spike")
        for k in ONE_RANK_FAULTS
    },
    "lm-three-faults": dict(
        model="lm",
        opt="adamw",
        warmup=True,
        steps=150,
        chaos="nan_loss@30/1 grad_explosion@50/0 lr_spike@65/1",
    ),
    "persistent": dict(model="mlp", chaos=f"nan_loss@{FAULT_STEP}/1!"),
    "persistent-spike": dict(model="mlp", chaos=f"loss_spike@{FAULT_STEP}/1!"),
    "own-group-nan_loss": dict(model="mlp", own_group=True, chaos=f"nan_loss@{FAULT_STEP}/1"),
    "clip-clean": dict(model="lm", opt="adamw", warmup=True, clip=1.0, steps=120),
    "clip-grad_explosion": dict(model="mlp", clip=1.0, chaos="grad_explosion@43/1"),
    # DDP's own C++ hook, one all-reduce of Arc's own per step
    "no-ride-clean": dict(model="lm", opt="adamw", warmup=True, ride_ddp=False, steps=120),
    "no-ride-grad_explosion": dict(model="mlp", ride_ddp=False, chaos="grad_explosion@43/1"),
}
FOUR_RANK = {
    "reference-mlp": dict(model="mlp"),
    "nan_loss-r2": dict(model="mlp", chaos=f"nan_loss@{FAULT_STEP}/2"),
    "grad_explosion-r3": dict(model="mlp", chaos=f"grad_explosion@{FAULT_STEP}/3"),
    "lr_spike-r1+r3": dict(model="mlp", chaos=f"lr_spike@{FAULT_STEP}/1+3"),
}
FSDP = {
    "reference-mlp": dict(model="mlp", fsdp=True),
    "nan_loss": dict(model="mlp", fsdp=True, chaos=f"nan_loss@{FAULT_STEP}/1"),
    "grad_explosion": dict(model="mlp", fsdp=True, chaos=f"grad_explosion@{FAULT_STEP}/0"),
    "nan_weights": dict(model="mlp", fsdp=True, chaos=f"nan_weights@{FAULT_STEP}/1"),
    # before the first periodic snapshot: back to the initial state, taken before any
    # optimizer state existed
    "early-nan_weights": dict(model="mlp", fsdp=True, chaos="nan_weights@5/1"),
}


@pytest.fixture(scope="module")
def two():
    return run_ranks(_run_all, 2, TWO_RANK, timeout=280)


@pytest.fixture(scope="module")
def four():
    return run_ranks(_run_all, 4, FOUR_RANK, timeout=280)


@pytest.fixture(scope="module")
def fsdp():
    return run_ranks(_run_all, 2, FSDP, timeout=200)


def _same_on_all_ranks(results, name):
    first = results[0][name]
    for r, res in enumerate(results[1:], 1):
        assert res[name]["events"] == first["events"], f"rank {r} saw other actions in {name}"
    return first


def _assert_recovered(results, name, reference, *, steps=STEPS, replicated=True):
    first = _same_on_all_ranks(results, name)
    if replicated:
        digests = {res[name]["digest"] for res in results}
        assert len(digests) == 1, f"{name}: replicas differ after recovery"
    for res in results:
        assert res[name]["step"] == steps
        ev, ref = res[name]["eval"], res[reference]["eval"]
        assert math.isfinite(ev)
        assert ev <= 1.5 * ref + 0.02, f"{name}: eval loss {ev:.4f} vs fault-free {ref:.4f}"
    return first


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CLEAN))
def test_clean_runs_raise_no_verdict(two, name):
    for rank, res in enumerate(two):
        assert res[name]["error"] is None
        assert res[name]["events"] == [], f"false positive on rank {rank}: {res[name]['events']}"
        assert res[name]["stats"]["rollbacks"] == 0


def _handled(events) -> list[tuple]:
    """(reason, bad ranks, response) of every non-healthy action (a warning in these runs is a
    skipped update: the tests also check the skips counted)."""
    return [(e[2], e[3], "rollback" if e[4] else "skip" if e[1] == "warning" else e[1])
            for e in events]  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(ONE_RANK_FAULTS))
def test_fault_on_one_rank_is_handled_everywhere(two, kind):
    name = f"one-{kind}"
    first = _assert_recovered(two, name, "reference-mlp")
    reason, response = ONE_RANK_FAULTS[kind]
    assert _handled(first["events"]) == [(reason, (1,), response)], first["events"]
    assert two[1][name]["fired"] == [(kind, FAULT_STEP, 1)]
    assert two[0][name]["fired"] == []
    stats = two[0][name]["stats"]
    assert (stats["rollbacks"], stats["skips"]) == ((1, 0) if response == "rollback" else (0, 1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", list(ONE_RANK_FAULTS))
def test_fault_on_all_ranks(two, kind):
    first = _assert_recovered(two, f"all-{kind}", "reference-mlp")
    reason, response = ONE_RANK_FAULTS[kind]
    assert _handled(first["events"]) == [(reason, (0, 1), response)], first["events"]


@pytest.mark.timeout(300)
def test_three_faults_in_a_language_model(two):
    first = _assert_recovered(two, "lm-three-faults", "reference-lm", steps=150)
    assert _handled(first["events"]) == [
        ("nonfinite_loss", (1,), "skip"),
        ("grad_explosion", (0,), "skip"),
        ("lr_spike", (1,), "rollback"),
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,reason", [("persistent", "nonfinite_loss"), ("persistent-spike", "loss_spike")]
)
def test_persistent_fault_is_unrecoverable_on_every_rank(two, name, reason):
    """Skipped while it may be one bad step, rolled back once it persists, then backed off,
    escalated and given up on: the same error on every rank."""
    errors = [res[name]["error"] for res in two]
    assert all(errors), errors
    assert errors[0] == errors[1]
    assert reason in errors[0] and "[1]" in errors[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,reason,bad",
    [
        ("nan_loss-r2", "nonfinite_loss", (2,)),
        ("grad_explosion-r3", "grad_explosion", (3,)),
        ("lr_spike-r1+r3", "lr_spike", (1, 3)),
    ],
)
def test_four_ranks(four, name, reason, bad):
    assert all(res["reference-mlp"]["events"] == [] for res in four)
    first = _assert_recovered(four, name, "reference-mlp")
    response = "rollback" if reason == "lr_spike" else "skip"
    assert _handled(first["events"]) == [(reason, bad, response)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,reason",
    [
        ("nan_loss", "nonfinite_loss"),
        ("grad_explosion", "grad_explosion"),
        ("nan_weights", "nonfinite_weights"),
    ],
)
def test_fsdp2(fsdp, name, reason):
    assert all(res["reference-mlp"]["events"] == [] for res in fsdp)
    first = _assert_recovered(fsdp, name, "reference-mlp", replicated=False)
    response = "rollback" if reason == "nonfinite_weights" else "skip"
    assert [(h[0], h[2]) for h in _handled(first["events"])] == [(reason, response)]


@pytest.mark.timeout(300)
def test_fsdp2_rollback_to_the_state_before_any_optimizer_state(fsdp):
    first = _assert_recovered(fsdp, "early-nan_weights", "reference-mlp", replicated=False)
    assert [e[0] for e in first["events"] if e[4]] == [0]  # rolled back to step 0, once
    assert [res["early-nan_weights"]["stats"]["rollbacks"] for res in fsdp] == [1, 1]


@pytest.mark.timeout(300)
def test_reusing_the_clipping_norm(two):
    for res in two:
        assert res["clip-clean"]["events"] == [] and res["clip-clean"]["error"] is None
    first = _assert_recovered(two, "clip-grad_explosion", "reference-mlp")
    assert _handled(first["events"]) == [("grad_explosion", (1,), "skip")]


@pytest.mark.timeout(300)
def test_without_the_ride_every_step_takes_one_collective(two):
    for res in two:
        clean = res["no-ride-clean"]
        assert clean["events"] == [] and clean["error"] is None and clean["step"] == 120
        assert clean["stats"]["fast_steps"] == 0
        assert clean["stats"]["collectives"] >= 120
        assert res["clip-clean"]["stats"]["fast_steps"] > 0  # the default rides DDP's all-reduce
    first = _assert_recovered(two, "no-ride-grad_explosion", "reference-mlp")
    # only averaged gradients are seen without the ride: no single rank is blamed
    assert _handled(first["events"]) == [("grad_explosion", (0, 1), "skip")]


@pytest.mark.timeout(300)
def test_a_given_process_group(two):
    first = _assert_recovered(two, "own-group-nan_loss", "reference-mlp")
    assert _handled(first["events"]) == [("nonfinite_loss", (1,), "skip")]
