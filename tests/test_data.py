"""The data position across restarts: ``ResumableDistributedSampler`` and per-rank state.

Pure tests compare the sampler with ``torch.utils.data.DistributedSampler``; the multi-process
tests resume a real DDP run with ``Arc`` and ``file://`` checkpoints at another world size and
check that every sample of every epoch was trained on exactly once.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from arc_dist import Arc, ArcConfig, CheckpointError, ReshardError, ResumableDistributedSampler
from tests._dist import run_ranks
from tests.checkpoint_helpers import Position, make_model, make_optimizer

pytestmark = pytest.mark.timeout(180)


def _dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.arange(n), torch.randn(n, 8, generator=g))


# -- the sampler on its own -------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (3, 4), (7, 1)])
def test_sampler_yields_what_distributed_sampler_yields(n, world, shuffle, drop_last):
    ds = _dataset(n)
    for epoch in (0, 3):
        for rank in range(world):
            ours = ResumableDistributedSampler(ds, world, rank, shuffle, 11, drop_last)
            theirs = DistributedSampler(ds, world, rank, shuffle, 11, drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)
            assert isinstance(ours, DistributedSampler)


def _draw(samplers, per_rank: int) -> list[int]:
    """Every rank draws ``per_rank`` indices in lockstep, as DDP ranks do."""
    its = [iter(s) for s in samplers]
    return [i for _ in range(per_rank) for it in its for i in [next(it)]]


@pytest.mark.parametrize("old,new,draws", [(2, 3, 3), (4, 1, 3), (1, 4, 4), (3, 3, 2), (1, 4, 3)])
def test_position_carries_over_to_another_world_size(old, new, draws):
    ds = _dataset(24)
    first = [ResumableDistributedSampler(ds, old, r, seed=2) for r in range(old)]
    for s in first:
        s.set_epoch(1)
    seen = _draw(first, draws)
    states = [s.state_dict() for s in first]
    assert all(st == states[0] for st in states)  # global: the same on every rank
    assert states[0]["position"] == draws * old and states[0]["epoch"] == 1

    second = [ResumableDistributedSampler(ds, new, r, seed=2) for r in range(new)]
    for s in second:
        s.load_state_dict(states[0])
        s.set_epoch(1)  # the resumed epoch: the position is kept
        assert s.state_dict() == states[0]
    seen += [i for its in zip(*second) for i in its]
    # the epoch, each sample once; where the rest does not split evenly, padded from the head
    # of the epoch's order as DistributedSampler pads
    pad = -(24 - draws * old) % new
    assert sorted(set(seen)) == list(range(24)) and len(seen) == 24 + pad
    assert all(s.state_dict()["position"] == 24 for s in second)
    # the pass after a resumed one starts at the beginning of its epoch
    assert sorted(i for its in zip(*second) for i in its) == list(range(24))


def test_resumed_complete_epoch_is_empty_and_set_epoch_elsewhere_discards(caplog):
    ds = _dataset(8)
    s = ResumableDistributedSampler(ds, 2, 0, seed=0)
    assert len(list(s)) == 4 and s.state_dict()["position"] == 8
    done = s.state_dict()
    s2 = ResumableDistributedSampler(ds, 2, 0, seed=0)
    s2.load_state_dict(done)
    assert list(s2) == []  # the epoch was finished before the checkpoint
    s2.set_epoch(1)
    assert len(list(s2)) == 4

    s3 = ResumableDistributedSampler(ds, 2, 0, seed=0)
    s3.load_state_dict({**done, "position": 4})
    with caplog.at_level(logging.WARNING, logger="arc_dist"):
        s3.set_epoch(5)
    assert "discards the resumed position" in caplog.text
    assert s3.state_dict()["position"] == 0 and len(list(s3)) == 4


def test_load_refuses_another_data_order(tmp_path):
    s = ResumableDistributedSampler(_dataset(8), 1, 0, seed=0)
    state = s.state_dict()
    other = ResumableDistributedSampler(_dataset(9), 1, 0, seed=1)
    with pytest.raises(ValueError, match=r"seed: saved 0, now 1; dataset_len: saved 8, now 9"):
        other.load_state_dict(state)

    # through Arc: the checkpoint is unusable, and resume() says why instead of starting over
    for n in (8, 9):
        model = make_model(0)
        opt, _ = make_optimizer(model)
        arc = Arc(model, opt, checkpoint_dir=str(tmp_path), config=ArcConfig(confirm_after=0))
        arc.register("sampler", ResumableDistributedSampler(_dataset(n)))
        if n == 8:
            arc.save()
        else:
            with pytest.raises(CheckpointError, match="dataset_len: saved 8, now 9"):
                arc.resume()
        arc.close()


# -- a DDP run resumed at another world size --------------------------------------------------
N, EPOCHS, BATCH = 64, 2, 2


def _resharded_worker(rank, world, url, stop_at):
    """Train from the newest checkpoint; stop in the step that saves ``stop_at`` (the batch in
    flight is never trained, as in a crash). Returns the indices trained on, per epoch."""
    model = make_model(0)
    if world > 1:
        model = DDP(model)
    opt, sched = make_optimizer(model)
    cfg = ArcConfig(checkpoint_every=4, confirm_after=0, async_checkpoint=False)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=cfg)
    ds = _dataset(N)
    sampler = ResumableDistributedSampler(ds, shuffle=True, seed=3)
    arc.register("sampler", sampler)
    start = arc.resume()
    trained: dict[int, list[int]] = {}
    stopped = False
    for epoch in range(sampler.epoch, EPOCHS):
        sampler.set_epoch(epoch)
        for index, x in DataLoader(ds, batch_size=BATCH, sampler=sampler):
            loss = model(x).square().mean()
            loss.backward()
            at = arc.global_step
            action = arc.step(loss)
            if stop_at is not None and at == stop_at:
                stopped = True
                break
            assert not action.should_skip
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            trained.setdefault(epoch, []).extend(index.tolist())
        if stopped:
            break
    arc.close()
    return dict(start=start, trained=trained, step=arc.global_step, world=world)


def test_resume_at_other_world_sizes_trains_each_sample_once_per_epoch(tmp_path):
    url = f"file://{tmp_path}/ck"
    # 2 ranks until the save at step 8, then 1 rank until the save at 28 (across the epoch
    # boundary), then 2 ranks to the end
    phases = [(2, 8), (1, 28), (2, None)]
    results = []
    for world, stop_at in phases:
        results.append(run_ranks(_resharded_worker, world, url, stop_at, timeout=150))
    assert [r[0]["start"] for r in results] == [0, 8, 28]
    assert results[-1][0]["step"] == 8 + 20 + 14  # 128 samples: 8 * 4 + 20 * 2 + 14 * 4
    for epoch in range(EPOCHS):
        seen = [i for ranks in results for r in ranks for i in r["trained"].get(epoch, [])]
        assert sorted(seen) == list(range(N)), f"epoch {epoch}: repeats or gaps"


# -- per-rank state at another world size -----------------------------------------------------
def _per_rank_worker(rank, world, url):
    """Resume 1-rank per-rank state at world size 2 under each ``reshard`` choice."""
    out = {}
    for choice in ("error", "copy_rank0", "keep_own"):
        model = DDP(make_model(0))
        opt, sched = make_optimizer(model)
        arc = Arc(model, opt, sched, checkpoint_dir=url, config=ArcConfig(async_checkpoint=False))
        pos = Position(-1 - rank)
        arc.register("loader", pos, per_rank=True, reshard=choice)
        try:
            out[choice] = ("resumed", arc.resume(), pos.value)
        except ReshardError as e:
            out[choice] = ("ReshardError", str(e))
        arc.close()
    return out


def test_per_rank_state_at_another_world_size_needs_a_choice(tmp_path):
    url = f"file://{tmp_path}/ck"
    model = make_model(0)
    opt, sched = make_optimizer(model)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=ArcConfig(async_checkpoint=False))
    arc.register("loader", Position(41), per_rank=True)
    loss = model(torch.randn(4, 8)).square().mean()
    loss.backward()
    arc.step(loss)
    opt.step()
    arc.save()
    arc.close()

    r0, r1 = run_ranks(_per_rank_worker, 2, url, timeout=120)
    for r in (r0, r1):  # every rank refuses, before anything is loaded; nobody hangs
        kind, message = r["error"]
        assert kind == "ReshardError"
        assert "'loader' was saved at world size 1" in message
        assert "reshard='copy_rank0'" in message and "reshard='keep_own'" in message
        assert "ResumableDistributedSampler" in message
    assert r0["copy_rank0"] == r1["copy_rank0"] == ("resumed", 1, 41)
    assert r0["keep_own"] == ("resumed", 1, 41) and r1["keep_own"] == ("resumed", 1, -2)


def test_register_names_the_reshard_choices(caplog):
    model = make_model(0)
    opt, _ = make_optimizer(model)
    arc = Arc(model, opt)
    choices = r"\['error', 'copy_rank0', 'keep_own'\]"
    with pytest.raises(ValueError, match=rf"reshard='rank0'\) is invalid: choose one of {choices}"):
        arc.register("it", Position(), per_rank=True, reshard="rank0")
    with caplog.at_level(logging.WARNING, logger="arc_dist"):
        arc.register("it", Position(), reshard="keep_own")
    assert "has no effect without per_rank=True" in caplog.text
    arc.close()
