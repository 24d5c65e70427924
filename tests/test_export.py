"""``arc-dist export``: real checkpoints (one process, 2-rank DDP and FSDP2) to torch/safetensors
files read back without arc-dist and compared tensor by tensor; partial and damaged ones refused.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, safe_open

from arc_dist.checkpoint import CheckpointManager, TrainState
from arc_dist.checkpoint.manifest import MANIFEST_NAME
from arc_dist.cli import main as cli
from arc_dist.export import export_checkpoint, export_torchtitan
from tests._dist import run_ranks
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    make_model,
    make_optimizer,
    train_steps,
)
from tests.test_checkpoint_dist import _wrap

pytestmark = pytest.mark.timeout(120)


def _leaves(obj, prefix: str = "") -> dict:
    """``{dotted path: leaf}`` of nested dicts and lists, as DCP flattens them."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in obj):
        items = enumerate(obj)
    else:
        return {prefix[:-1]: obj}
    out = {}
    for k, v in items:
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def _assert_same(got: dict, want: dict) -> None:
    g, w = _leaves(got), _leaves(want)
    assert sorted(g) == sorted(w), set(g) ^ set(w)
    for k, v in w.items():
        if isinstance(v, torch.Tensor):
            assert isinstance(g[k], torch.Tensor) and g[k].dtype == v.dtype, k
            assert torch.allclose(g[k], v, rtol=0, atol=0, equal_nan=True), k
        else:
            assert g[k] == v, (k, g[k], v)


def _saved_run(tmp_path):
    """A one-process run saved at steps 3 and 6 (model, AdamW, StepLR, GradScaler, user object)."""
    model = make_model()
    opt, sched = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pos = Position()
    url = str(tmp_path / "ck")
    with CheckpointManager(url, confirm_after=0) as mgr:
        for step in (3, 6):
            train_steps(model, opt, step - 3, step, sched)
            pos.value = step
            mgr.save(step, {"train": TrainState(model, opt, sched, scaler), "data": pos})
    app = {"train": TrainState(model, opt, sched, scaler), "data": pos}
    return url, {k: v.state_dict() for k, v in app.items()}, model


def test_export_torch_and_safetensors_round_trip(tmp_path, capsys):
    url, saved, model = _saved_run(tmp_path)
    full = tmp_path / "full.pt"
    assert cli(["export", url, "--to", "torch", "--out", str(full)]) == 0  # root: newest, step 6
    assert "step_6 ->" in capsys.readouterr().out
    _assert_same(torch.load(full, weights_only=True), saved)

    only = tmp_path / "model.pt"
    assert cli(["export", f"{url}/step_6", "--model-only", "--out", str(only)]) == 0
    sd = torch.load(only, weights_only=True)
    fresh = make_model(seed=1)
    fresh.load_state_dict(sd)  # strict: exactly the model's own names
    assert_state_equal(sd, model.state_dict())

    st = tmp_path / "model.safetensors"
    assert cli(["export", url, "--to", "safetensors", "--model-only", "--out", str(st)]) == 0
    assert_state_equal(load_file(st), model.state_dict())

    # everything as safetensors: tensors under flat names, other values as JSON metadata
    st_full = tmp_path / "full.safetensors"
    r = export_checkpoint(url, str(st_full), to="safetensors")
    flat = _leaves(saved)
    tensors = load_file(st_full)
    assert sorted(tensors) == sorted(k for k, v in flat.items() if isinstance(v, torch.Tensor))
    _assert_same(tensors, {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)})
    with safe_open(st_full, "pt") as f:
        meta = f.metadata()
    assert (
        meta["arc_dist.step"] == "6"
        and '"train.scheduler.last_epoch": 6' in meta["arc_dist.values"]
    )
    assert r.step == 6 and r.tensors == len(tensors)

    # an older step by name; the default file name
    os.chdir(tmp_path)
    assert cli(["export", f"{url}/step_3", "--model-only"]) == 0
    assert (tmp_path / "step_3-model.pt").exists()


def test_export_refuses_partial_damaged_and_missing(tmp_path, capsys):
    url, _, _ = _saved_run(tmp_path)
    out = tmp_path / "x.pt"
    os.remove(tmp_path / "ck" / "step_3" / MANIFEST_NAME)
    assert cli(["export", f"{url}/step_3", "--out", str(out)]) == 2
    assert "not committed" in capsys.readouterr().err

    shard = next(p for p in (tmp_path / "ck" / "step_6").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli(["export", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and shard.name in err
    assert cli(["export", f"{url}/step_9", "--out", str(out)]) == 2
    assert "step_9 not found" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("x.pt.tmp*"))


def _dist_save_worker(rank, world, url, kind):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = _wrap(make_model(), kind)
    opt, sched = make_optimizer(model)
    train_steps(model, opt, 0, 3, sched)
    with CheckpointManager(url, confirm_after=0) as mgr:
        mgr.save(3, {"train": TrainState(model, opt, sched)})
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=full)  # collective
    return (msd, osd) if rank == 0 else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_export_of_a_two_rank_checkpoint_is_whole(tmp_path, kind):
    url = str(tmp_path / "ck")
    msd, osd = run_ranks(_dist_save_worker, 2, url, kind, timeout=90)[0]
    out = tmp_path / "full.pt"
    export_checkpoint(url, str(out))
    got = torch.load(out, weights_only=True)["train"]
    _assert_same(got["model"], msd)
    _assert_same(got["optim"], osd)
    st = tmp_path / "m.safetensors"
    export_checkpoint(url, str(st), to="safetensors", model_only=True)
    model = make_model(seed=5)
    model.load_state_dict(load_file(st))
    assert_state_equal(model.state_dict(), msd)


def test_torchtitan_layout_resumes_where_arc_dist_stopped(tmp_path):
    """The folder torchtitan's DCP checkpointer finds (``step-N`` with ``.metadata``) and loads:
    its states flattened as torchtitan flattens them (model FQNs at the top level, the flat
    FQN-keyed optimizer, ``lr_scheduler``, ``train_state``), into a fresh model and optimizer."""
    import re

    import torch.distributed.checkpoint as dcp

    url, saved, model = _saved_run(tmp_path)
    folder = tmp_path / "dump" / "checkpoint"
    assert cli(["export", url, "--to", "torchtitan", "--out", str(folder)]) == 0
    (step_dir,) = folder.iterdir()
    assert re.fullmatch(r"step-(\d+)", step_dir.name).group(1) == "6"
    assert (step_dir / ".metadata").is_file()

    # torchtitan's side: a model and an optimizer built with (name, param) pairs, state created
    fresh = make_model(seed=1)
    opt = torch.optim.AdamW(fresh.named_parameters(), lr=0.01)
    for p in fresh.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    osd = opt.state_dict()
    names = [n for g in osd["param_groups"] for n in g["param_names"]]
    flat_optim = {}
    for idx, per_param in osd["state"].items():
        for k, v in per_param.items():
            flat_optim[f"state.{names[idx]}.{k}"] = v
    for g in osd["param_groups"]:
        for n in g["param_names"]:
            flat_optim.update(
                {
                    f"param_groups.{n}.{k}": v
                    for k, v in g.items()
                    if k not in ("params", "param_names")
                }
            )
    states = {
        **fresh.state_dict(),
        "optimizer": flat_optim,
        "lr_scheduler": {"last_epoch": 0},
        "train_state": {"step": 0, "ntokens_seen": 0},
    }
    dcp.load(states, checkpoint_id=str(step_dir), no_dist=True)  # strict: every key present
    assert_state_equal(fresh.state_dict(), model.state_dict())
    want = saved["train"]["optim"]
    for fqn, per_param in want["state"].items():
        for k, v in per_param.items():
            assert torch.equal(states["optimizer"][f"state.{fqn}.{k}"], v), (fqn, k)
    assert states["optimizer"]["param_groups.0.weight.lr"] == want["param_groups"][0]["lr"]
    assert states["lr_scheduler"] == {"last_epoch": 6}
    assert states["train_state"] == {"step": 6, "ntokens_seen": 0}

    # model only, for torchtitan's checkpoint.initial_load_path
    r = export_torchtitan(url, str(tmp_path / "init"), model_only=True)
    only = make_model(seed=2)
    dcp.load(only.state_dict(), checkpoint_id=r.path, no_dist=True)
    assert_state_equal(only.state_dict(), model.state_dict())
