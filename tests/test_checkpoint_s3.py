"""Checkpoints on a real S3-compatible server (moto's server mode, reached through s3fs).

Two DDP ranks save through ``s3://``; this process verifies, damages and loads the objects; an
outage is the server process stopped in the middle of training and started again.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from arc_dist.checkpoint import CheckpointManager, TrainState, scan
from arc_dist.cli import main as cli
from tests._dist import free_port, run_ranks
from tests.checkpoint_helpers import (
    assert_state_equal,
    make_model,
    make_optimizer,
    reference_state,
    train_steps,
)
from tests.s3server import SECRET, MotoServer

pytestmark = pytest.mark.timeout(120)


def _s3_worker(rank, world, url, options):
    from torch.nn.parallel import DistributedDataParallel as DDP

    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    model = DDP(make_model())
    opt, sched = make_optimizer(model)
    mgr = CheckpointManager(url, storage_options=options, confirm_after=0, keep=5)
    train_steps(model, opt, 0, 4, sched)
    mgr.save(4, {"train": TrainState(model, opt, sched)}, blocking=False)
    mgr.wait()
    train_steps(model, opt, 4, 8, sched)
    mgr.save(8, {"train": TrainState(model, opt, sched)}, blocking=True)
    mgr.close()
    return mgr.stats(), "\n".join(records)


def test_s3_two_ranks_save_verify_fallback_resume(s3_server, s3_bucket, capsys):
    url = f"s3://{s3_bucket}/run-7"
    options = s3_server.storage_options()
    results = run_ranks(_s3_worker, 2, url, options)
    for rank, (stats, logs) in enumerate(results):
        assert stats["checkpoints"] == 2 and stats["checkpoint_failures"] == 0
        assert ("checkpoint step_8 committed to s3://" in logs) == (rank == 0)  # rank 0 reports
        assert SECRET not in logs  # credentials never reach a log line, at any level
    mgr = CheckpointManager(url, storage_options=options)
    infos = scan(mgr.storage)
    assert [(i.step, i.state, i.manifest.world_size) for i in infos] == [
        (4, "confirmed", 2),
        (8, "confirmed", 2),
    ]
    for info in infos:
        assert SECRET not in mgr.storage.read_bytes(f"{info.path}/arc_manifest.json").decode()

    # the command line sees the same, then finds an altered object
    opts = [
        "-o",
        f"endpoint_url={s3_server.endpoint}",
        "-o",
        f"key={options['key']}",
        "-o",
        f"secret={SECRET}",
    ]
    assert cli(["checkpoints", url, *opts]) == 0 and "confirmed" in capsys.readouterr().out
    assert cli(["verify", url, *opts]) == 0
    shard = f"{infos[1].path}/__1_0.distcp"
    data = bytearray(mgr.storage.read_bytes(shard))
    data[len(data) // 3] ^= 0xFF
    mgr.storage.fs.pipe_file(shard, bytes(data))
    assert cli(["verify", url, *opts]) == 1
    assert "step_8: DAMAGED" in capsys.readouterr().out

    model = make_model(seed=5)
    opt, sched = make_optimizer(model)
    assert mgr.load({"train": TrainState(model, opt, sched)}) == 4  # falls back past step 8
    assert_state_equal(model.state_dict(), reference_state(4))
    mgr.close()


def test_s3_outage_saves_fail_and_retry_while_training_goes_on(tmp_path, caplog):
    server = MotoServer(str(tmp_path / "moto.log"), port=free_port())
    server.start()
    try:
        server.make_bucket("ckpt")
        model = make_model()
        opt, sched = make_optimizer(model)
        mgr = CheckpointManager(
            "s3://ckpt/run",
            storage_options=server.storage_options(),
            confirm_after=0,
            max_retries=1,
            retry_backoff=0.1,
        )
        app = {"train": TrainState(model, opt, sched)}
        step = 0

        def train_until(done, limit_s=60.0):
            nonlocal step
            deadline = time.monotonic() + limit_s
            while not done():
                assert time.monotonic() < deadline, f"stuck at step {step}: {mgr.stats()}"
                if step % 2 == 0:
                    mgr.save(step, app, blocking=False)  # skipped while one is in flight
                train_steps(model, opt, step, step + 1, sched)
                step += 1
                time.sleep(0.005)

        train_until(lambda: mgr.stats()["checkpoints"] >= 1)
        mgr.wait()
        server.stop()  # the storage goes away in the middle of training
        outage_start = step
        with caplog.at_level(logging.WARNING, logger="arc_dist"):
            train_until(lambda: mgr.stats()["checkpoints_abandoned"] >= 1)
        s = mgr.stats()
        assert s["checkpoint_failures"] >= 2 and s["checkpoint_retries"] >= 1
        assert step > outage_start + 2  # training went on meanwhile
        assert "retrying" in caplog.text and "could not be written" in caplog.text
        assert SECRET not in caplog.text

        server.start()  # back (moto keeps nothing across a restart: the bucket is new)
        server.make_bucket("ckpt")
        train_until(lambda: (mgr.stats()["last_committed_step"] or 0) > outage_start)
        mgr.wait()
        last = mgr.stats()["last_committed_step"]
        fresh = make_model(seed=5)
        fopt, fsched = make_optimizer(fresh)
        assert mgr.load({"train": TrainState(fresh, fopt, fsched)}) == last
        assert_state_equal(fresh.state_dict(), reference_state(last))
        mgr.close()
    finally:
        server.stop()
    assert torch.isfinite(next(model.parameters())).all()
