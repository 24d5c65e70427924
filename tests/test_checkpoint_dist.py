"""Multi-rank checkpoints on real gloo groups: async saves under DDP, resharding, SIGKILL mid-save.

Ranks are real processes (forkserver, see checkpoint_helpers.run_ranks) saving to real files.
Every test compares against a model trained in this process: with identical batches on every
rank DDP's averaged gradient equals the single-process one, so states must match exactly.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist.checkpoint import CheckpointManager, PerRank, TrainState, scan
from tests import faultfs
from tests._dist import run_ranks
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    full_model_state,
    make_model,
    make_optimizer,
    reference_state,
    train_steps,
)

pytestmark = pytest.mark.timeout(120)


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


def _setup(kind: str, seed: int = 0):
    model = _wrap(make_model(seed), kind)
    opt, sched = make_optimizer(model)
    return model, opt, sched


# -- a staging failure on one rank -------------------------------------------------------------
def _staging_failure_worker(rank, world, url):
    from datetime import timedelta

    model, opt, sched = _setup("ddp")
    # a short collective timeout: a rank left alone in DCP's collectives fails fast, not in 10 min
    mgr = CheckpointManager(url, confirm_after=0, retry_backoff=0.05, timeout=timedelta(seconds=15))
    if rank == 1:  # this rank's next staging fails, as a pinned allocation can
        real = mgr._stager.stage

        def fail_once(state_dict, **kw):
            mgr._stager.stage = real
            raise RuntimeError("simulated: pinned host allocation failed")

        mgr._stager.stage = fail_once
    for step in range(4):
        if step in (1, 2):
            mgr.save(step, {"train": TrainState(model, opt, sched)}, blocking=False)
            mgr.wait()
        train_steps(model, opt, step, step + 1, sched)
    # a blocking save: rank 1's user object cannot give its state; both ranks raise, none waits
    pos = Position()
    pos.state_dict = (lambda: 1 / 0) if rank == 1 else pos.state_dict
    try:
        mgr.save(3, {"train": TrainState(model, opt, sched), "pos": pos}, blocking=True)
        blocking_error = None
    except Exception as e:
        blocking_error = type(e).__name__
    mgr.save(4, {"train": TrainState(model, opt, sched)}, blocking=True)
    mgr.close()
    fresh = _setup("ddp")
    with CheckpointManager(url) as m2:
        loaded = m2.load({"train": TrainState(*fresh)})
    return mgr.stats(), loaded, full_model_state(fresh[0]), blocking_error


def test_staging_failure_on_one_rank_abandons_the_save_on_every_rank(tmp_path):
    url = str(tmp_path / "ck")
    r0, r1 = run_ranks(_staging_failure_worker, 2, url, timeout=90)
    (s0, loaded0, m0, e0), (s1, loaded1, m1, e1) = r0, r1
    assert (e0, e1) == ("CheckpointStorageError", "ZeroDivisionError")
    for s in (s0, s1):  # the same decision on both ranks: step 1 abandoned, 2 and 4 committed
        assert (s["checkpoints"], s["checkpoints_abandoned"], s["checkpoint_retries"]) == (2, 1, 0)
    assert [i.step for i in scan_url(url) if i.committed] == [2, 4]
    assert loaded0 == loaded1 == 4
    assert_state_equal(m0, m1)
    assert_state_equal(m0, reference_state(4))


def scan_url(url: str):
    from arc_dist.checkpoint.storage import Storage

    return scan(Storage(url))


# -- one node cannot read at resume ------------------------------------------------------------
def _one_rank_cannot_read_worker(rank, world, path):
    model, opt, sched = _setup("ddp")
    with CheckpointManager(path, confirm_after=0) as mgr:
        for step in (2, 4):
            train_steps(model, opt, step - 2, step, sched)
            mgr.save(step, {"train": TrainState(model, opt, sched)}, blocking=True)
    flaky = {"read_error": "PermissionError", "match": ".distcp", "ranks": [1]}
    with CheckpointManager(faultfs.url(path), storage_options=flaky) as m2:
        try:
            m2.load({"train": TrainState(*_setup("ddp"))})
            return None
        except Exception as e:
            return type(e).__name__, int(e.exit_code), str(e)


def test_a_rank_that_cannot_read_makes_every_rank_exit_for_a_retry(tmp_path):
    r0, r1 = run_ranks(_one_rank_cannot_read_worker, 2, str(tmp_path / "ck"), timeout=90)
    assert r0 == r1  # the same error, on both ranks
    name, code, msg = r0
    assert (name, code) == ("CheckpointStorageError", 10)
    assert "step_4" in msg and "rank 1: PermissionError" in msg and "step_2" not in msg


# -- async saves while DDP trains -------------------------------------------------------------
def _async_worker(rank, world, url):
    with pytest.raises(ValueError, match="memory:// is private to each process"):
        CheckpointManager("memory://shared-by-nobody")  # refused on every rank alike
    model, opt, sched = _setup("ddp")
    pos = Position()
    mgr = CheckpointManager(url, keep=2, confirm_after=2, retry_backoff=0.05)
    for step in range(12):
        mgr.on_healthy_step(step)
        if step % 3 == 0:
            pos.value = step
            mgr.save(
                step, {"train": TrainState(model, opt, sched), "data": PerRank(pos)}, blocking=False
            )
        train_steps(model, opt, step, step + 1, sched)  # DDP's all-reduce runs during the write
    mgr.close()
    return mgr.stats(), full_model_state(model)


def test_async_saves_during_ddp_training(tmp_path):
    url = str(tmp_path / "ck")
    (s0, m0), (s1, m1) = run_ranks(_async_worker, 2, url)
    assert_state_equal(m0, m1)
    assert_state_equal(m0, reference_state(12))
    for s in (s0, s1):  # both ranks took the same decisions
        assert s["checkpoints"] + s["checkpoints_skipped"] == 4 and s["checkpoint_failures"] == 0
    assert (s0["checkpoints"], s0["last_committed_step"]) == (
        s1["checkpoints"],
        s1["last_committed_step"],
    )
    infos = scan(CheckpointManager(url).storage)
    assert [i.step for i in infos if i.committed][-1] == s0["last_committed_step"]
    assert all(i.manifest.world_size == 2 for i in infos if i.committed)
    newest = [i for i in infos if i.committed][-1]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(newest.manifest.files)


# -- resharding -----------------------------------------------------------------------------
def _app(model, opt, sched, pos):
    return {"train": TrainState(model, opt, sched), "data": PerRank(pos, "copy_rank0")}


def _save_worker(rank, world, base, kinds, step):
    """Train ``step`` steps and save; returns each rank's RNG draw right after the save."""
    out = {}
    for kind in kinds:
        model, opt, sched = _setup(kind)
        train_steps(model, opt, 0, step, sched)
        torch.manual_seed(100 + rank)
        mgr = CheckpointManager(f"{base}/{kind}-w{world}", confirm_after=0)
        mgr.save(step, _app(model, opt, sched, Position(1000 + rank)), blocking=True)
        out[kind] = torch.rand(1).item()
        mgr.close()
    return out


def _load_worker(rank, world, base, kinds, src_world, step, save_too):
    out = {}
    for kind in kinds:
        model, opt, sched = _setup(
            kind, seed=7
        )  # other initial weights: the load must replace them
        torch.manual_seed(555 + rank)
        pos = Position(-1)
        mgr = CheckpointManager(f"{base}/{kind}-w{src_world}", confirm_after=0)
        loaded = mgr.load(_app(model, opt, sched, pos))
        rng = torch.rand(1).item()
        mgr.close()
        state = full_model_state(model)
        train_steps(
            model, opt, step, step + 2, sched
        )  # optimizer and scheduler state resharded too
        out[kind] = dict(
            loaded=loaded, rng=rng, pos=pos.value, state=state, after=full_model_state(model)
        )
    if save_too:
        out["saved"] = _save_worker(rank, world, base, kinds, step)
    return out


def _check_load(results, saved_rng, src_world, kinds, step):
    for rank, res in enumerate(results):
        for kind in kinds:
            r = res[kind]
            assert r["loaded"] == step
            assert_state_equal(r["state"], reference_state(step))
            assert_state_equal(r["after"], reference_state(step + 2))
            if rank < src_world:  # its own RNG stream and its own per-rank user state
                assert r["rng"] == saved_rng[rank][kind]
                assert r["pos"] == 1000 + rank
            else:  # a rank that did not exist: own RNG, rank 0's user state
                g = torch.Generator().manual_seed(555 + rank)
                assert r["rng"] == torch.rand(1, generator=g).item()
                assert r["pos"] == 1000


def test_resharding_ddp_and_fsdp2(tmp_path):
    base, kinds, step = str(tmp_path), ("ddp", "fsdp2"), 6
    saved4 = run_ranks(_save_worker, 4, base, kinds, step)
    res2 = run_ranks(_load_worker, 2, base, kinds, 4, step, True)  # 4 -> 2, and save at 2
    _check_load(res2, saved4, 4, kinds, step)
    res1 = run_ranks(_load_worker, 1, base, kinds, 2, step, True)  # 2 -> 1, and save at 1
    _check_load(res1, [r["saved"] for r in res2], 2, kinds, step)
    res2b = run_ranks(_load_worker, 2, base, kinds, 1, step, False)  # 1 -> 2
    _check_load(res2b, [r["saved"] for r in res1], 1, kinds, step)


# -- SIGKILL in the middle of a save ----------------------------------------------------------
def _kill_worker(rank, world, url, victim, point, threshold):
    model, opt, sched = _setup("ddp")
    train_steps(model, opt, 0, 4, sched)
    mgr = CheckpointManager(url, keep=3, confirm_after=0, retry_backoff=0.05)
    mgr.save(4, {"train": TrainState(model, opt, sched)}, blocking=True)
    train_steps(model, opt, 4, 8, sched)

    def hook(where, detail):
        if rank != victim or where != point:
            return
        if where == "write" and detail[1] < threshold:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    mgr.fault_hook = hook
    mgr.save(8, {"train": TrainState(model, opt, sched)}, blocking=False)
    mgr.wait()
    mgr.close()
    return "survived"


_TRIALS = [
    (1, "write", 1),  # rank 1 dies as its shard starts
    (0, "write", 1),
    (0, "before_manifest", 0),  # every data file written, no commit marker yet
    (0, "after_manifest", 0),  # committed: the new checkpoint is the one to use
] + [(r.randrange(2), "write", r.randrange(1, 6000)) for r in [random.Random(s) for s in range(4)]]


@pytest.mark.parametrize("victim,point,threshold", _TRIALS)
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path, victim, point, threshold):
    url = str(tmp_path / "ck")
    results = run_ranks(
        _kill_worker, 2, url, victim, point, threshold, expect_death=True, grace=1.0
    )
    assert results[victim] is None  # the victim really died
    infos = {i.step: i for i in scan(CheckpointManager(url).storage)}
    assert infos[4].state == "confirmed"
    # killed after its manifest: committed, but never confirmed healthy; otherwise partial (or
    # removed already by the survivor, whose retries failed against the dead peer)
    if point == "after_manifest":
        assert infos[8].state == "committed"
    else:
        assert 8 not in infos or infos[8].state == "partial"
        assert all(i.step == 4 for i in infos.values() if i.committed)
    model = make_model(seed=3)
    opt, sched = make_optimizer(model)
    newest = 8 if point == "after_manifest" else 4  # the newest committed (healthy) one
    with CheckpointManager(url, keep=1, confirm_after=0) as mgr:  # world size 1 now
        assert mgr.load({"train": TrainState(model, opt, sched)}) == newest
        assert_state_equal(model.state_dict(), reference_state(newest))
        mgr.save(12, {"train": TrainState(model, opt, sched)}, blocking=True)
    # the next commit's retention removed the partial directory and the older checkpoints
    assert [(i.step, i.state) for i in scan(mgr.storage)] == [(12, "confirmed")]


# -- a storage failure on rank 0 alone ------------------------------------------------------------
def _rank0_fails_worker(rank, world, url):
    from arc_dist.checkpoint import retention

    model, opt, sched = _setup("ddp")
    mgr = CheckpointManager(url, confirm_after=0, retry_backoff=0.05)
    app = {"train": TrainState(model, opt, sched)}
    mgr.save(4, app, blocking=True)
    real, calls = retention.uncommit, []

    def flaky_uncommit(storage, path):  # rank 0 cannot clear the old step_4 the first time
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (injected)")
        real(storage, path)

    retention.uncommit = flaky_uncommit
    try:
        mgr.save(4, app, blocking=False)  # step 4 again (as after a rollback): replace it
        mgr.wait()
        mgr.save(4, app, blocking=True)
    finally:
        retention.uncommit = real
    mgr.close()
    return mgr.stats()


def test_rank0_only_failure_fails_the_attempt_on_every_rank(tmp_path):
    s0, s1 = run_ranks(_rank0_fails_worker, 2, str(tmp_path / "ck"), timeout=60)
    for s in (s0, s1):  # both ranks saw the same attempts: nobody waited in a lone collective
        assert (s["checkpoints"], s["checkpoint_failures"], s["checkpoint_retries"]) == (3, 1, 1)
    infos = scan(CheckpointManager(str(tmp_path / "ck")).storage)
    assert [(i.step, i.state) for i in infos] == [(4, "confirmed")]
