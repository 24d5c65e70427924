"""The durability contract without a process group (world size 1, real files): the events the
checkpoint manager reports, and what ``Durability`` saves, skips and resumes."""

from __future__ import annotations

import pytest
import torch

from arc_dist import ArcConfig
from arc_dist.checkpoint import CheckpointManager, CheckpointStorageError, TrainState
from arc_dist.checkpoint.durability import Durability
from arc_dist.checkpoint.resume import Source
from arc_dist.snapshot import SnapshotStore


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


class _Own:
    """Stands in for the controller's own state (saved under "arc")."""

    def __init__(self) -> None:
        self.global_step = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step}

    def load_state_dict(self, sd: dict) -> None:
        self.global_step = int(sd["global_step"])


def _recorder():
    seen: list[tuple[str, int | None, dict]] = []
    return seen, lambda kind, step, values: seen.append((kind, step, values))


def test_manager_reports_commit_confirm_and_reject(tmp_path):
    seen, sink = _recorder()
    model, opt = _model()
    mgr = CheckpointManager(str(tmp_path), confirm_after=2, keep=5, on_event=sink)
    try:
        state = {"train": TrainState(model, opt)}
        mgr.save(1, state, verdict={"status": "healthy"}, blocking=True)
        mgr.on_healthy_step(2)
        mgr.on_healthy_step(3)  # two healthy steps after step 1: confirmed
        mgr.save(5, state, verdict={"status": "healthy"}, blocking=True)
        mgr.on_rollback(4)  # step 5 holds the failed trajectory: retracted
        mgr.wait()
    finally:
        mgr.close()
    kinds = [(k, s) for k, s, _ in seen]
    assert kinds == [
        ("checkpoint_commit", 1),
        ("checkpoint_confirm", 1),
        ("checkpoint_commit", 5),
        ("checkpoint_reject", None),
    ]
    commit = seen[0][2]
    assert commit["bytes"] > 0 and commit["seconds"] >= 0 and "stall_s" in commit
    assert seen[3][2] == {"count": 1}
    assert mgr.stats()["checkpoints_confirmed"] == 1


def test_manager_reports_each_failed_attempt(tmp_path):
    seen, sink = _recorder()
    model, opt = _model()
    mgr = CheckpointManager(str(tmp_path), max_retries=1, retry_backoff=0.0, on_event=sink)

    def hook(point, detail):
        if point == "before_manifest":
            raise OSError("storage went away")

    mgr.fault_hook = hook
    try:
        with pytest.raises(CheckpointStorageError):
            mgr.save(3, {"train": TrainState(model, opt)}, blocking=True)
    finally:
        mgr.close()
    assert [(k, s, v["abandoned"]) for k, s, v in seen] == [
        ("checkpoint_failure", 3, False),
        ("checkpoint_failure", 3, True),
    ]


def test_a_failing_listener_does_not_break_a_save(tmp_path):
    model, opt = _model()

    def broken(kind, step, values):
        raise RuntimeError("exporter down")

    with CheckpointManager(str(tmp_path), on_event=broken) as mgr:
        mgr.save(1, {"train": TrainState(model, opt)}, blocking=True)
        assert mgr.stats()["last_committed_step"] == 1


def _durability(tmp_path, model, opt, own, **config):
    cfg = ArcConfig(async_checkpoint=False, local_snapshots=False, **config)
    return Durability(
        train=TrainState(model, opt),
        arc_state=own,
        snapshots=SnapshotStore(model, opt, None, None, 2),
        config=cfg,
        group=None,
        rank=0,
        world_size=1,
        layout="replicated",
        checkpoint_dir=str(tmp_path),
    )


def test_periodic_saves_and_resume(tmp_path):
    model, opt = _model()
    own = _Own()
    d = _durability(tmp_path, model, opt, own, checkpoint_every=2, confirm_after=1)
    seen, sink = _recorder()
    d.subscribe(sink)
    try:
        for step in (1, 2, 2, 3):  # step 2 twice: its state is saved once
            own.global_step = step
            d.on_step(step, "healthy")
        d.on_rollback(1)  # another trajectory reaches step 2 again: saved again
        own.global_step = 2
        d.on_step(2, "warning")
        d.wait()
    finally:
        d.close(clean=True)
    starts = [(s, v["blocking"]) for k, s, v in seen if k == "checkpoint_start"]
    assert starts == [(2, True), (2, True)]
    assert [s for k, s, _ in seen if k == "checkpoint_commit"] == [2, 2]
    assert d.stats()["checkpoints"] == 2 and d.saved_step == 2

    model2, opt2 = _model()
    with torch.no_grad():
        model2.weight.add_(1.0)
    own2 = _Own()
    d2 = _durability(tmp_path, model2, opt2, own2, checkpoint_every=2, confirm_after=1)
    try:
        out = d2.resume()
    finally:
        d2.close(clean=True)
    assert out.source is Source.DURABLE and out.source == "durable"
    assert out.step == 2 and out.nbytes > 0
    assert own2.global_step == 2 and d2.saved_step == 2
    assert torch.equal(model2.weight, model.weight)
    assert d2.stats()["resume_source"] == "durable"


def test_resume_without_storage_loads_nothing(tmp_path):
    model, opt = _model()
    cfg = ArcConfig(local_snapshots=False)
    d = Durability(
        train=TrainState(model, opt), arc_state=_Own(),
        snapshots=SnapshotStore(model, opt, None, None, 2), config=cfg, group=None, rank=0,
        world_size=1, layout="replicated", checkpoint_dir=None,
    )  # fmt: skip
    assert d.resume().source is None
    with pytest.raises(ValueError, match="checkpoint_dir"):
        d.save(1, "healthy", blocking=True)
    d.close(clean=True)


def test_recorder_writes_checkpoint_records_from_the_training_thread_only():
    import threading

    from arc_dist.observe.events import EventLog
    from arc_dist.observe.recorder import Recorder

    log = EventLog(None)
    written: list[tuple[str, int | None, str]] = []
    values: list[dict] = []
    log.subscribe(lambda r: written.append((r["kind"], r["step"], threading.current_thread().name)))
    log.subscribe(lambda r: values.append(r["values"]))
    rec = Recorder(log)
    writer = threading.Thread(
        target=rec.checkpoint_event,
        args=("checkpoint_commit", 10, {"bytes": 2_000_000, "seconds": 0.5, "stall_s": 0.01}),
        name="arc-checkpoint",
    )
    writer.start()
    writer.join()
    assert written == []  # reported from the writer thread: waits for the training thread
    rec.checkpoint_event("checkpoint_start", 20, {"blocking": True})
    main = threading.current_thread().name
    assert written == [("checkpoint_commit", 10, main), ("checkpoint_start", 20, main)]
    assert values[0]["MB_per_s"] == 4.0 and values[0]["stall_s"] == 0.01
    rec.drain()
    assert len(written) == 2
