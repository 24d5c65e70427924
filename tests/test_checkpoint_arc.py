"""End to end: ``Arc`` with durable checkpoints, on real gloo ranks, real files and a real S3 server.

The loop is the one of docs/api.md. With identical batches on every rank, a DDP run's state at
step N equals a single-process run's (tests/checkpoint_helpers.reference_state), so a resumed run
can be checked bit for bit, also at another world size.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import torch
import torch.distributed as dist
from fsspec import AbstractFileSystem
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig, CheckpointError
from arc_dist.checkpoint import CheckpointStorageError, scan
from arc_dist.checkpoint.storage import Storage
from tests._dist import free_port, run_ranks
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    batch,
    full_model_state,
    make_model,
    make_optimizer,
    reference_state,
)
from tests.s3server import SECRET, MotoServer

pytestmark = pytest.mark.timeout(150)


def _arc(url, *, every=5, confirm=3, keep=3, width=16, options=None):
    model = make_model(0, width)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = DDP(model)
    opt, sched = make_optimizer(model)
    cfg = ArcConfig(checkpoint_every=every, confirm_after=confirm, keep_checkpoints=keep)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=cfg, storage_options=options)
    pos = Position()
    arc.register("data", pos)
    return arc, model, opt, sched, pos


def _loop(arc, model, opt, sched, pos, until, on_step=None):
    while arc.global_step < until:
        x, y = batch(arc.global_step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        action = arc.step(loss)
        if not action.should_skip:
            opt.step()
            sched.step()
            pos.value = arc.global_step
        opt.zero_grad(set_to_none=True)
        if on_step is not None and on_step(arc):
            break


def _train_worker(rank, world, url, until, kill_at):
    arc, model, opt, sched, pos = _arc(url)
    start = arc.resume()
    if kill_at is not None and rank == 1:  # SIGKILL in the middle of writing the save at kill_at

        def hook(point, detail):
            if point == "write" and arc.global_step >= kill_at and detail[1] > 200:
                os.kill(os.getpid(), signal.SIGKILL)

        arc._durability.manager.fault_hook = hook

    def settle(arc):
        # let the previous write finish before the next save is due, so no save is skipped and
        # the set of checkpoints is the same in every run (the writes still overlap 4 steps)
        if (arc.global_step + 1) % 5 == 0:
            arc._durability.manager.wait()

    _loop(arc, model, opt, sched, pos, until, settle)
    arc.close()
    return dict(start=start, stats=arc.stats(), state=full_model_state(model), pos=pos.value)


def test_arc_async_saves_resume_elsewhere_and_fall_back(tmp_path):
    url = str(tmp_path / "ck")
    r0, r1 = run_ranks(_train_worker, 2, url, 23, None)  # saves due at 5, 10, 15, 20
    assert r0["start"] == 0 and r0["stats"]["checkpoints"] == r1["stats"]["checkpoints"] == 4
    assert_state_equal(r0["state"], r1["state"])
    assert_state_equal(r0["state"], reference_state(23))
    # keep 3; step 20 has seen only 2 of the 3 healthy steps that confirm it
    assert [(i.step, i.state) for i in scan(Storage(url))] == [
        (10, "confirmed"),
        (15, "confirmed"),
        (20, "committed"),
    ]

    # one rank resumes the 2-rank run: the newest healthy checkpoint, confirmed or not
    (w1,) = run_ranks(_train_worker, 1, url, 23, None)
    assert w1["start"] == 20 and w1["pos"] == 23
    assert_state_equal(w1["state"], reference_state(23))

    # a flipped byte in the newest checkpoint: resume falls back to the one before
    shard = tmp_path / "ck" / "step_20" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    r0, r1 = run_ranks(_train_worker, 2, url, 23, None)
    assert r0["start"] == r1["start"] == 15
    assert_state_equal(r0["state"], reference_state(23))
    assert all(not verify_problems for verify_problems in _verify_all(url))  # 20 was rewritten


def _verify_all(url):
    from arc_dist.checkpoint import verify

    storage = Storage(url)
    return [verify(storage, i) for i in scan(storage) if i.committed]


def test_arc_rank_killed_mid_save_previous_checkpoint_resumes(tmp_path):
    url = str(tmp_path / "ck")
    results = run_ranks(_train_worker, 2, url, 30, 10, expect_death=True, grace=1.0)
    assert results[1] is None  # rank 1 died inside the save of step 10
    infos = {i.step: i for i in scan(Storage(url))}
    assert infos[5].confirmed and not (10 in infos and infos[10].committed)
    r0, r1 = run_ranks(_train_worker, 2, url, 14, None)  # the restarted job
    assert r0["start"] == r1["start"] == 5
    assert_state_equal(r0["state"], reference_state(14))


def _outage_worker(rank, world, url, options, flags):
    arc, model, opt, sched, pos = _arc(url, every=2, confirm=0, options=options)
    mgr = arc._durability.manager
    mgr.max_retries, mgr.retry_backoff = 1, 0.1  # tunables: keep the outage short
    seen = {"stop_step": None, "failed_step": None}

    def flag(name):
        return os.path.exists(os.path.join(flags, name))

    def on_step(arc):
        time.sleep(0.01)
        done = 0
        if rank == 0:
            s = arc.stats()
            if s["checkpoints"] >= 1 and not flag("committed"):
                open(os.path.join(flags, "committed"), "w").close()
            if flag("stopped") and seen["stop_step"] is None:
                seen["stop_step"] = arc.global_step
                seen["abandoned_before"] = s["checkpoints_abandoned"]
            if (
                seen["stop_step"] is not None
                and s["checkpoints_abandoned"] > seen["abandoned_before"]
            ):
                if seen["failed_step"] is None:
                    seen["failed_step"] = arc.global_step
                    open(os.path.join(flags, "failed"), "w").close()
            done = int(flag("restarted") and (s["last_committed_step"] or 0) > seen["failed_step"])
        t = torch.tensor([done])
        dist.broadcast(t, 0)  # the same stop decision on both ranks
        return bool(t.item())

    _loop(arc, model, opt, sched, pos, 3000, on_step)
    arc.close()
    return dict(seen=seen, stats=arc.stats(), step=arc.global_step, state=full_model_state(model))


def test_arc_s3_outage_saves_retry_training_goes_on(tmp_path):
    server = MotoServer(str(tmp_path / "moto.log"), port=free_port())
    server.start()
    flags = tmp_path / "flags"
    flags.mkdir()

    def wait_for(name, timeout=60):
        deadline = time.monotonic() + timeout
        while not (flags / name).exists():
            assert time.monotonic() < deadline and not job.done(), (
                f"no {name!r} flag: {job.exception() if job.done() else ''}"
            )
            time.sleep(0.05)

    try:
        server.make_bucket("ckpt")
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(
                run_ranks,
                _outage_worker,
                2,
                "s3://ckpt/arc",
                server.storage_options(),
                str(flags),
                timeout=120,
            )
            wait_for("committed")
            server.stop()  # the storage goes away while both ranks train and save
            (flags / "stopped").touch()
            wait_for("failed")
            server.start()
            server.make_bucket("ckpt")
            (flags / "restarted").touch()
            r0, r1 = job.result()
    finally:
        server.stop()
    seen, s = r0["seen"], r0["stats"]
    assert seen["failed_step"] > seen["stop_step"]  # training went on during the outage
    assert (
        s["checkpoint_failures"] >= 2
        and s["checkpoint_retries"] >= 1
        and s["checkpoints_abandoned"] >= 1
    )
    assert s["last_committed_step"] > seen["failed_step"]  # saves succeed again
    assert_state_equal(r0["state"], r1["state"])
    assert_state_equal(r0["state"], reference_state(r0["step"]))


class _DeniedFileSystem(AbstractFileSystem):
    """Storage that refuses every write with the error a read-only directory gives.

    Dropping root's privileges instead would also make the interpreter and a repository cloned
    into a root-only directory unreadable, so the test would depend on where it runs.
    """

    protocol = "arcdenied"

    def _deny(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    makedirs = mkdir = pipe_file = touch = _deny

    def _open(self, path, mode="rb", **kwargs):
        return self._deny(path)

    def ls(self, path, detail=True, **kwargs):
        raise FileNotFoundError(path)


def _check_denied(url):
    run = make_model()
    opt, _ = make_optimizer(run)
    with pytest.raises(CheckpointStorageError) as err:
        Arc(run, opt, checkpoint_dir=url)
    msg = str(err.value)
    assert "Permission denied" in msg and "writable" in msg and url in msg


def test_arc_permission_denied_is_a_clear_error():
    fsspec.register_implementation(_DeniedFileSystem.protocol, _DeniedFileSystem, clobber=True)
    _check_denied("arcdenied://bucket/ck")


def test_arc_read_only_directory_is_a_clear_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("this user may write into read-only directories (root)")
        _check_denied(str(tmp_path / "ck"))
    finally:
        tmp_path.chmod(0o755)


def test_arc_other_model_raises_checkpoint_error_naming_keys(tmp_path):
    url = str(tmp_path / "ck")
    arc, model, opt, sched, pos = _arc(url, every=0)
    _loop(arc, model, opt, sched, pos, 3)
    arc.save()
    arc.close()
    other, *_ = _arc(url, width=24)
    with pytest.raises(CheckpointError) as err:
        other.resume()
    other.close()
    msg = str(err.value)
    assert "step_3" in msg and "shape mismatch" in msg and "train.model.0.weight" in msg
    assert "[16, 8]" in msg and "[24, 8]" in msg
    assert SECRET not in msg and threading.active_count() >= 1
