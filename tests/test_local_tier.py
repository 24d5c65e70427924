"""The node-local snapshot tier (arc_dist/checkpoint/local_tier.py) and the resume choice (arc_dist/checkpoint/resume.py).

Fast tiers: the pure choice and manifest checks; ``Arc`` in one process with real files (the tier
in a temp dir, durable checkpoints in another): a "crashed" run (closed without cleaning, as a
SIGKILL leaves it) is resumed by a new ``Arc`` from the local tier, bit for bit equal to an
uninterrupted run, and every reason to fall back (a flipped byte, a deleted tier, another run,
a stale snapshot) ends on durable storage with a log line that says why. Then 2 real gloo ranks
under DDP: one replicated-state file per host, resume from it, and the all-ranks agreement
(rank 1's files gone: both ranks take durable storage). Real torchrun SIGKILL tests:
tests/test_launch_local.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.checkpoint.local_format import (
    Identity,
    check_manifest,
    default_local_dir,
    make_manifest,
)
from arc_dist.checkpoint.resume import DURABLE, LOCAL, DurableView, choose_source
from tests._dist import run_ranks
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    batch,
    full_model_state,
    make_model,
    make_optimizer,
    reference_state,
)

pytestmark = pytest.mark.timeout(120)


# -- the choice: a pure function ------------------------------------------------------------------
def test_choice_takes_the_newest_snapshot_every_rank_has():
    local = [[(30, "a.0"), (25, "a.0")], [(25, "a.0")]]
    c = choose_source(local, DurableView(newest=20))
    assert (c.source, c.step, c.lineage) == (LOCAL, 25, "a.0")
    assert "newest healthy durable checkpoint: step 20" in c.reason


def test_choice_falls_back_when_a_rank_lacks_it_or_lineages_differ():
    c = choose_source([[(30, "a.0")], []], DurableView(newest=20), notes=[[], ["step_30: gone"]])
    assert c.source == DURABLE and "missing on ranks [1]" in c.reason and "gone" in c.reason
    c = choose_source([[(30, "a.0")], [(30, "b.0")]], DurableView(newest=20))
    assert c.source == DURABLE  # two trajectories that only share a step number
    c = choose_source([[], []], DurableView(), notes=[["step_5: from another run"], []])
    assert c.source == DURABLE and c.reason.startswith("no local snapshot usable")
    assert "rank 0: step_5: from another run" in c.reason


def test_choice_rejects_stale_and_verified_bad_snapshots():
    both = [[(30, "a.0"), (25, "a.0")]] * 2
    c = choose_source(both, DurableView(newest=40))
    assert c.source == DURABLE and "older than the newest healthy durable" in c.reason
    assert choose_source(both, DurableView(newest=30)).step == 30  # same step: from memory
    c = choose_source(both, DurableView(newest=20), rejected={(30, "a.0")})
    assert (c.source, c.step) == (LOCAL, 25)
    c = choose_source(both, DurableView(newest=20), rejected={(30, "a.0"), (25, "a.0")})
    assert c.source == DURABLE and "rejected" in c.reason


def test_choice_uses_local_when_durable_storage_is_down_or_absent():
    local = [[(30, "a.0")]] * 2
    c = choose_source(local, DurableView(error="ConnectionError: no route"))
    assert c.source == LOCAL and "could not be listed" in c.reason
    c = choose_source(local, DurableView(configured=False))
    assert c.source == LOCAL and "no durable storage" in c.reason
    assert choose_source([[], []], DurableView(configured=False)).source == DURABLE


def _ident(**kw) -> Identity:
    base = dict(run_id="r1", world_size=2, rank=1, local_world_size=2, host="h",
                layout="replicated", config_digest="d")  # fmt: skip
    return Identity(**{**base, **kw})


def test_manifest_check_names_what_changed():
    m = make_manifest(_ident(), step=30, lineage="t.0", kind="rank", shared="shared_w0",
                      algorithm="crc32", file="rank_1.pt", size=10, checksum="00")  # fmt: skip
    assert check_manifest(m, _ident(), 30) is None
    assert "another run" in check_manifest(m, _ident(run_id="r2"), 30)
    assert "world size changed (saved at 2, now 1)" in check_manifest(m, _ident(world_size=1), 30)
    assert "topology changed" in check_manifest(m, _ident(host="other"), 30)
    assert "topology changed" in check_manifest(m, _ident(local_world_size=4), 30)
    assert "rank 1, not rank 0" in check_manifest(m, _ident(rank=0), 30)
    assert "ArcConfig changed" in check_manifest(m, _ident(config_digest="e"), 30)
    assert "not rank step 25" in check_manifest(m, _ident(), 25)
    assert "not an arc-dist" in check_manifest({"format": "x"}, _ident(), 30)
    # a manifest never leads the reader out of its directory
    assert "garbles its file" in check_manifest(
        {**m, "file": {**m["file"], "name": "../../x.pt"}}, _ident(), 30
    )
    assert "outside its directory" in check_manifest({**m, "shared": "../s"}, _ident(), 30)
    del m["lineage"]
    assert "garbles" in check_manifest(m, _ident(), 30)


def test_default_dir_is_dev_shm_else_the_temp_dir(tmp_path):
    a = default_local_dir("s3://b/run", "id1", shm=str(tmp_path))
    assert a.startswith(str(tmp_path) + os.sep + "arc-dist-")
    assert a == default_local_dir("s3://b/run", "id2", shm=str(tmp_path))  # keyed by the job
    assert a != default_local_dir("s3://b/other", "id1", shm=str(tmp_path))
    import tempfile

    b = default_local_dir("s3://b/run", "id1", shm=str(tmp_path / "missing"))
    assert b.startswith(tempfile.gettempdir())


def test_config_validates_local_fields():
    with pytest.raises(ValueError, match="local_keep"):
        ArcConfig(local_keep=0)
    with pytest.raises(ValueError, match="local_dir"):
        ArcConfig(local_dir="")
    with pytest.raises(ValueError, match="local_snapshots"):
        ArcConfig(local_snapshots="yes")


# -- Arc in one process, real files ---------------------------------------------------------------
def _wrap(model, kind: str):
    if kind == "ddp":
        return DDP(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _arc(ckpt: str, local: str, seed: int = 0, kind: str = "ddp", **cfg):
    model = make_model(seed)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = _wrap(model, kind)
    opt, sched = make_optimizer(model)
    config = ArcConfig(
        snapshot_every=5, checkpoint_every=4, confirm_after=1, local_dir=local, **cfg
    )
    arc = Arc(model, opt, sched, checkpoint_dir=ckpt, config=config)
    pos = Position()
    arc.register("data", pos)
    return arc, model, opt, sched, pos


def _train(arc, model, opt, sched, pos, until: int) -> None:
    while arc.global_step < until:
        x, y = batch(arc.global_step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if not arc.step(loss).should_skip:
            opt.step()
            sched.step()
            pos.value = arc.global_step
        opt.zero_grad(set_to_none=True)
        if arc._durability.manager is not None:
            arc._durability.manager.wait()  # the same checkpoints in every run


def _crashed_run(ckpt: str, local: str, until: int = 11, kind: str = "ddp") -> None:
    """Train, then stop as a SIGKILL would leave things: nothing cleaned up."""
    arc, *rest = _arc(ckpt, local, kind=kind)
    assert arc.resume() == 0
    _train(arc, *rest, until)
    arc._close(clean=False)  # waits for the writers only: the files are what a crash leaves


def _resume(ckpt: str, local: str, until: int = 20, kind: str = "ddp"):
    arc, model, opt, sched, pos = _arc(ckpt, local, seed=1, kind=kind)  # other initial weights
    start = arc.resume()
    source = arc.stats()["resume_source"]
    _train(arc, model, opt, sched, pos, until)
    arc.close()
    return start, source, full_model_state(model), pos.value


@pytest.fixture
def run_id(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-a")
    return "run-a"


def test_restart_resumes_from_the_local_tier_bit_exactly(tmp_path, run_id, caplog):
    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    _crashed_run(ckpt, local)
    # snapshots at 5 and 10 (keep 2); under one rank, one replicated-state file and one own file
    assert sorted(os.listdir(local)) == ["step_10", "step_5"]
    assert sorted(os.listdir(Path(local) / "step_10")) == [
        "rank_0.json", "rank_0.pt", "shared_w0.json", "shared_w0.pt",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="arc_dist"):
        start, source, state, pos = _resume(ckpt, local)
    # durable storage has step 8: the local 10 is newer
    assert (start, source) == (10, "local")
    assert "resumed from the local snapshot tier at step 10" in caplog.text
    assert "newest healthy durable checkpoint: step 8" in caplog.text
    assert_state_equal(state, reference_state(20))
    assert pos == 20  # registered objects come back too
    assert not os.path.exists(local)  # a clean close removes the tier


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "delete", "other_run", "stale"])
def test_unusable_local_tier_falls_back_to_durable_storage(tmp_path, run_id, damage, monkeypatch,
                                                           caplog):  # fmt: skip
    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    _crashed_run(ckpt, local)
    expect = {
        "flip": "older than the newest healthy durable checkpoint (step 8)",
        "delete": "no local snapshot",
        "other_run": "from another run",
        "stale": "the local snapshot (step 5) is older than the newest healthy durable",
    }[damage]
    if damage == "flip":  # step 10 fails its checksum; step 5 is older than durable step 8
        _flip_byte(Path(local) / "step_10" / "shared_w0.pt")
    elif damage == "delete":
        import shutil

        shutil.rmtree(local)
    elif damage == "other_run":
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    else:
        import shutil

        shutil.rmtree(Path(local) / "step_10")
    with caplog.at_level(logging.INFO, logger="arc_dist"):
        start, source, state, _ = _resume(ckpt, local)
    assert (start, source) == (8, "durable")
    assert "local snapshot tier not used" in caplog.text and expect in caplog.text, caplog.text
    if damage == "flip":
        assert "local snapshot step_10 is unusable (rank 0: shared_w0.pt fails its" in caplog.text
    assert_state_equal(state, reference_state(20))


def test_local_restore_failing_midway_without_a_durable_checkpoint_fails_loudly(tmp_path, run_id):
    import shutil

    from arc_dist.errors import CheckpointError

    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    _crashed_run(ckpt, local)
    shutil.rmtree(ckpt)  # no durable checkpoint to load over a half-restored state
    arc, model, opt, sched, pos = _arc(ckpt, local, seed=1)

    def broken(sd):  # the model and optimizer are restored by now: the state is half restored
        raise RuntimeError("simulated: this object cannot take its state")

    pos.load_state_dict = broken
    with pytest.raises(CheckpointError, match="failed midway") as err:
        arc.resume()  # before: "started fresh" at step 0 with the snapshot's weights
    assert "simulated: this object cannot take its state" in str(err.value)
    assert str(Path(local)) in str(err.value)  # what to remove to start fresh
    arc._close(clean=False)


def test_a_newer_healthy_durable_checkpoint_beats_the_local_tier(tmp_path, run_id, caplog):
    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    _crashed_run(ckpt, local, until=13)  # durable 8 (confirmed) and 12 (not yet); local 5, 10
    with caplog.at_level(logging.INFO, logger="arc_dist"):
        start, source, state, _ = _resume(ckpt, local)
    assert (start, source) == (12, "durable")
    assert "the local snapshot (step 10) is older than the newest healthy durable checkpoint " \
        "(step 12)" in caplog.text  # fmt: skip
    assert_state_equal(state, reference_state(20))


def test_rollback_drops_newer_local_snapshots(tmp_path, run_id):
    arc, *rest = _arc(str(tmp_path / "ck"), str(tmp_path / "shm"))
    arc.resume()
    _train(arc, *rest, 13)
    arc._durability.local.wait()
    lineage = arc._durability.local.lineage
    arc._durability.local.on_rollback(5)  # as an escalation past the snapshot at 10 does
    assert sorted(os.listdir(tmp_path / "shm")) == ["step_5"]
    assert arc._durability.local.lineage != lineage  # later snapshots are another trajectory
    arc.close()


def test_unwritable_local_dir_only_warns(tmp_path, run_id, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="arc_dist"):
        arc, *rest = _arc(str(tmp_path / "ck"), str(blocker / "shm"))
        assert arc.resume() == 0
        _train(arc, *rest, 7)
    assert "is not writable" in caplog.text and arc.stats()["local_snapshots"] == 0
    arc.close()


def test_tier_is_off_without_a_run_id(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("ARC_RUN_ID", raising=False)
    arc, *rest = _arc(str(tmp_path / "ck"), str(tmp_path / "shm"))
    assert arc._durability.local is None
    arc.close()


# -- two gloo ranks: DDP (one replicated file per host) and FSDP2 (a shard file per rank) ----------
def _worker(rank, world, ckpt, local, phase, kind):
    os.environ["TORCHELASTIC_RUN_ID"] = "run-2"
    if phase == "crash":
        _crashed_run(ckpt, local, kind=kind)
        return None
    return _resume(ckpt, local, kind=kind)


@pytest.mark.slow
def test_ddp_ranks_share_one_replicated_file_and_agree(tmp_path):
    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    run_ranks(_worker, 2, ckpt, local, "crash", "ddp")
    assert sorted(os.listdir(Path(local) / "step_10")) == [
        "rank_0.json", "rank_0.pt", "rank_1.json", "rank_1.pt", "shared_w0.json", "shared_w0.pt",
    ]  # fmt: skip
    r0, r1 = run_ranks(_worker, 2, ckpt, local, "resume", "ddp")
    assert r0[:2] == r1[:2] == (10, "local")
    assert_state_equal(r0[2], reference_state(20))
    assert_state_equal(r1[2], reference_state(20))
    assert not os.path.exists(local)

    # rank 1's own files gone (e.g. it restarted on another node): both ranks take durable storage
    ckpt, local = str(tmp_path / "ck2"), str(tmp_path / "shm2")
    run_ranks(_worker, 2, ckpt, local, "crash", "ddp")
    for step in ("step_5", "step_10"):
        for name in ("rank_1.json", "rank_1.pt"):
            os.remove(Path(local) / step / name)
    r0, r1 = run_ranks(_worker, 2, ckpt, local, "resume", "ddp")
    assert r0[:2] == r1[:2] == (8, "durable")
    assert_state_equal(r0[2], reference_state(20))


@pytest.mark.slow
def test_fsdp2_ranks_resume_their_shards_from_the_local_tier(tmp_path):
    ckpt, local = str(tmp_path / "ck"), str(tmp_path / "shm")
    run_ranks(_worker, 2, ckpt, local, "crash", "fsdp")
    assert sorted(os.listdir(Path(local) / "step_10")) == [
        "rank_0.json", "rank_0.pt", "rank_1.json", "rank_1.pt",
    ]  # fmt: skip
    r0, r1 = run_ranks(_worker, 2, ckpt, local, "resume", "fsdp")
    assert r0[:2] == r1[:2] == (10, "local")
    assert_state_equal(r0[2], reference_state(20))
    assert_state_equal(r1[2], reference_state(20))


def test_unrecoverable_error_frees_the_local_tier(tmp_path, run_id):
    from arc_dist import UnrecoverableError

    local = tmp_path / "shm"
    arc, model, opt, sched, pos = _arc(str(tmp_path / "ck"), str(local), max_rollbacks=1)
    arc.resume()
    _train(arc, model, opt, sched, pos, 12)
    arc._durability.local.wait()  # the write of step 10 runs in the background
    assert sorted(os.listdir(local)) == ["step_10", "step_5"]
    with pytest.raises(UnrecoverableError):  # a NaN loss on every step from here on
        while True:
            x, y = batch(arc.global_step)
            loss = ((model(x) - y) ** 2).mean() * float("nan")
            loss.backward()
            if not arc.step(loss).should_skip:
                opt.step()
            opt.zero_grad(set_to_none=True)
    assert not local.exists()  # no retry resumes from it (the launcher exits 11)
    arc.close()
