"""Background checkpoints that borrow the in-memory snapshot's host copies.

A checkpoint step that is also a snapshot step writes the snapshot's buffers instead of copying
the model and optimizer a second time. These tests hold the write in flight (the manager's
``fault_hook`` blocks the writer thread) while training goes on: the next snapshots, and a
rollback that restores from the very snapshot being written, must leave the checkpoint equal,
bit for bit, to the live state at its step. Real ``Arc``, real files, real gloo ranks.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.checkpoint import CheckpointManager, TrainState, scan
from arc_dist.checkpoint.storage import Storage
from arc_dist.snapshot import SnapshotStore
from tests._dist import run_ranks
from tests.checkpoint_helpers import (
    assert_state_equal,
    batch,
    full_model_state,
    make_model,
    make_optimizer,
    reference_state,
)

pytestmark = pytest.mark.timeout(150)


def _arc(url, *, every, keep_snapshots=2, width=64, max_skips=2):
    """width 64: the model's tensors outweigh the state a snapshot does not hold (RNG)."""
    model = make_model(0, width)
    if dist.is_initialized() and dist.get_world_size() > 1:
        model = DDP(model)
    opt, sched = make_optimizer(model)
    cfg = ArcConfig(
        snapshot_every=every,
        checkpoint_every=every,
        keep_snapshots=keep_snapshots,
        confirm_after=0,
        max_skips=max_skips,
        local_snapshots=False,
    )
    return Arc(model, opt, sched, checkpoint_dir=url, config=cfg), model, opt, sched


def _state(model, opt) -> dict[str, torch.Tensor]:
    """Every tensor of the model and the optimizer, cloned."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


def _blocker(mgr, step):
    """Blocks the write of ``step`` (in the writer thread) until the returned event is set."""
    reached, release = threading.Event(), threading.Event()

    def hook(point, detail):
        current = mgr._current
        if point == "write" and current is not None and current.step == step:
            reached.set()
            assert release.wait(60), "the test never released the write"

    mgr.fault_hook = hook
    return reached, release


def _load_newest(url, width=64):
    model = make_model(1, width)
    opt, _ = make_optimizer(model)
    with CheckpointManager(url, confirm_after=0, check_writable=False) as mgr:
        step = mgr.load({"train": TrainState(model, opt)})
    return step, _state(model, opt)


def _train(arc, model, opt, sched, until, *, nan_at=None, after_step=None):
    """The loop of docs/api.md; ``after_step(arc, action)`` right after ``arc.step``."""
    while arc.global_step < until:
        x, y = batch(arc.global_step)
        loss = ((model(x) - y) ** 2).mean()
        if arc.global_step == nan_at:
            nan_at = None  # once
            loss = loss * float("nan")
        loss.backward()
        action = arc.step(loss)
        if after_step is not None:
            after_step(arc, action)
        if not action.should_skip:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)


def test_lend_gives_only_unchanged_tensors_of_the_snapshot_of_that_step():
    model = make_model(0, 16)
    with torch.inference_mode():
        model.register_buffer("frozen", torch.ones(2))  # no version counter: never lent
    opt, _ = make_optimizer(model)
    model(batch(0)[0]).sum().backward()
    opt.step()
    store = SnapshotStore(model, opt, keep=2)
    snap = store.take(3, {})
    assert store.lend(2) is None
    loan = store.lend(3)
    w = model[0].weight
    exp_avg = opt.state[w]["exp_avg"]
    assert torch.equal(loan.host(w.detach()), w) and torch.equal(loan.host(exp_avg), exp_avg)
    assert loan.host(w.detach()).data_ptr() != w.data_ptr()  # the snapshot's host copy
    assert loan.host(model.frozen) is None and loan.host(torch.zeros_like(w)) is None
    with torch.no_grad():
        w.add_(1.0)
    assert loan.host(w.detach()) is None  # changed since the snapshot
    loan.release()
    store.restore(snap, lambda extra: None)
    assert store.lend(3) is None  # the live tensors were rewritten from it


def test_checkpoint_from_snapshot_buffers_survives_the_next_snapshots(tmp_path):
    url = str(tmp_path / "ck")
    arc, model, opt, sched = _arc(url, every=2)
    mgr = arc._durability.manager
    reached, release = _blocker(mgr, 4)
    live = {}

    def record(arc, action):
        live[arc.global_step - 1] = _state(model, opt)  # the state the step's saves hold

    # the write of step 4 stays in flight while snapshots 6 and 8 are taken: with two slots,
    # snapshot 8 would reuse step 4's buffers (the saves due at 6 and 8 are skipped: busy)
    _train(arc, model, opt, sched, 3, after_step=record)
    mgr.wait()  # step 2's write is done: step 4's is not skipped as busy
    _train(arc, model, opt, sched, 5, after_step=record)
    assert reached.wait(60)
    staged = mgr.stats()["checkpoint_staged_bytes"]
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert staged < model_bytes  # model and optimizer tensors came from the snapshot
    _train(arc, model, opt, sched, 9, after_step=record)
    assert arc._snapshots.steps() == (6, 8)
    release.set()
    mgr.wait()
    stats = arc.stats()
    assert stats["last_committed_step"] == 4 and stats["checkpoints_skipped"] == 2
    # the slot held for the write was surplus once returned: still two snapshots' memory
    _train(arc, model, opt, sched, 11, after_step=record)
    assert len(arc._snapshots._ring) + len(arc._snapshots._spare) == 2
    arc.close()

    step, saved = _load_newest(url)  # 10 is newer now
    assert step == 10
    assert_state_equal(saved, live[10])
    # step 4, read alone: every tensor equals the live state at step 4
    for info in scan(Storage(url)):
        if info.step != 4:
            (tmp_path / "ck" / f"step_{info.step}").rename(tmp_path / f"aside_{info.step}")
    step, saved = _load_newest(url)
    assert step == 4
    assert_state_equal(saved, live[4])


def test_rollback_to_the_snapshot_being_written(tmp_path):
    url = str(tmp_path / "ck")
    arc, model, opt, sched = _arc(url, every=2, max_skips=0)  # a NaN loss rolls back at once
    mgr = arc._durability.manager
    reached, release = _blocker(mgr, 4)
    live, restored = {}, []

    def record(arc, action):
        if action.rolled_back:
            restored.append((arc.global_step, _state(model, opt)))
        else:
            live.setdefault(arc.global_step - 1, _state(model, opt))

    _train(arc, model, opt, sched, 3, after_step=record)
    mgr.wait()  # step 2's write is done: step 4's is not skipped as busy
    _train(arc, model, opt, sched, 5, after_step=record)
    assert reached.wait(60)
    # step 5 fails while step 4 is written from the snapshot the rollback restores
    _train(arc, model, opt, sched, 9, nan_at=5, after_step=record)
    assert [s for s, _ in restored] == [4]
    assert_state_equal(restored[0][1], live[4])
    release.set()
    mgr.wait()
    assert arc.stats()["rollbacks"] == 1 and arc.stats()["last_committed_step"] == 4
    arc.close()
    assert_state_equal(
        full_model_state(model), reference_state(9, width=64)
    )  # the retried steps are exact
    step, saved = _load_newest(url)
    assert step == 4
    assert_state_equal(saved, live[4])


def _ddp_worker(rank, world, url, until):
    arc, model, opt, sched = _arc(url, every=5)
    start = arc.resume()
    staged = []

    def settle(arc, action):
        # the previous write ends before the next save is due: no save is skipped
        if (arc.global_step + 1) % 5 == 0:
            arc._durability.manager.wait()
        if arc.global_step % 5 == 1:
            staged.append(arc.stats()["checkpoint_staged_bytes"])

    _train(arc, model, opt, sched, until, after_step=settle)
    arc.close()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return dict(start=start, stats=arc.stats(), state=full_model_state(model), staged=staged,
                model_bytes=nbytes)  # fmt: skip


def test_ddp_checkpoints_from_snapshots_resume_exactly(tmp_path):
    url = str(tmp_path / "ck")
    r0, r1 = run_ranks(_ddp_worker, 2, url, 23)  # checkpoints and snapshots at 5, 10, 15, 20
    assert r0["stats"]["checkpoints"] == r1["stats"]["checkpoints"] == 4
    for r in (r0, r1):
        assert r["staged"] and all(s < r["model_bytes"] for s in r["staged"])
    assert_state_equal(r0["state"], r1["state"])
    assert_state_equal(r0["state"], reference_state(23, width=64))
    # resumed from step 20 (written from the snapshot's buffers), one rank trains on exactly
    (w,) = run_ranks(_ddp_worker, 1, url, 23)
    assert w["start"] == 20
    assert_state_equal(w["state"], reference_state(23, width=64))
