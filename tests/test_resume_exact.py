"""Exact resume in one process: a run stopped at a checkpoint and resumed trains on the same
batches, ends with the same weights bit for bit and keeps the same LR backoff as a run that was
never stopped, also across a rollback and an epoch boundary."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from arc_dist import Arc, ArcConfig, Preempted, ResumableDistributedSampler
from tests.checkpoint_helpers import assert_state_equal, make_model, make_optimizer

pytestmark = pytest.mark.timeout(120)

N, BATCH, STEPS = 40, 4, 25  # 10 batches per epoch


def _train(url, *, every=5, stop=None, sigterm_at=None, chaos="", seed=0):
    """The contract's loop over a sampled DataLoader; returns where it started, the updates the
    final model holds as (step, sample indices), and the model state.

    ``stop``: leave inside the step that saves this step (the batch in flight is never trained,
    as in a crash); ``sigterm_at``: SIGTERM this process just before that step.
    """
    model = make_model(seed)
    opt, sched = make_optimizer(model)
    cfg = ArcConfig(  # max_skips=0: a NaN rolls back at once (else it only skips its update)
        snapshot_every=5,
        checkpoint_every=every,
        confirm_after=0,
        async_checkpoint=False,
        max_skips=0,
    )
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=cfg, chaos=chaos)
    g = torch.Generator().manual_seed(5)
    ds = TensorDataset(torch.arange(N), torch.randn(N, 8, generator=g))
    sampler = ResumableDistributedSampler(ds, seed=4)
    arc.register("sampler", sampler)
    start = arc.resume()
    history: list[tuple[int, list[int]]] = []
    try:
        for epoch in range(sampler.epoch, 100):
            sampler.set_epoch(epoch)
            for index, x in DataLoader(ds, batch_size=BATCH, sampler=sampler):
                if arc.global_step >= STEPS:
                    return start, history, model.state_dict()
                loss = (model(x) - x[:, :2].sin()).square().mean()
                loss.backward()
                at = arc.global_step
                if at == sigterm_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                action = arc.step(loss)
                if at == stop and not action.rolled_back:
                    return start, history, model.state_dict()
                if action.rolled_back:  # the updates since the restored state are undone
                    history = [h for h in history if h[0] < action.step]
                if not action.should_skip:
                    opt.step()
                    sched.step()
                    history.append((at, index.tolist()))
                opt.zero_grad(set_to_none=True)
    except Preempted:
        return start, history, model.state_dict()
    finally:
        arc.close()
    raise AssertionError("the loop ran out of epochs")


@pytest.mark.parametrize(
    "every,stop,sigterm_at",
    [(5, 10, None), (7, 7, None), (5, None, 13)],
    ids=["mid-epoch", "epoch-boundary", "sigterm"],
)
def test_resumed_run_trains_on_the_same_batches_bit_exactly(tmp_path, every, stop, sigterm_at):
    # a rollback at step 7 (to the snapshot at 5) in both runs: the failed batch is skipped,
    # not replayed, and the data position is not rewound
    chaos = "nan_loss@7"
    _, ref_history, ref_state = _train(str(tmp_path / "ref"), every=every, chaos=chaos)
    assert len(ref_history) == STEPS and [s for s, _ in ref_history] == list(range(STEPS))

    url = str(tmp_path / "ck")
    _, first, _ = _train(url, every=every, stop=stop, sigterm_at=sigterm_at, chaos=chaos)
    start, second, state = _train(url, every=every, seed=1)  # other initial weights
    assert start == (stop or sigterm_at)
    assert [h for h in first if h[0] < start] + second == ref_history
    assert_state_equal(state, ref_state)


def _lr_run(url, until, *, chaos="", save_at=None, old_format=False):
    """Train to ``until`` (with rollbacks at steps 7 and 8 when ``chaos`` says so: the second
    backs off the LR); returns the LR guard's state after the resume (or at the save), and
    (step, lr scale, lr) after every update."""
    model = make_model(0)
    opt, sched = make_optimizer(model)
    cfg = ArcConfig(snapshot_every=5, recovery_steps=8, async_checkpoint=False, max_skips=0)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=cfg, chaos=chaos)
    if old_format:  # Arc's state as written before the restore step was saved

        def old_state_dict(new=arc.state_dict):
            sd = new()
            sd["lr_scale"] = sd.pop("lr")["scale"]
            return sd

        arc.state_dict = old_state_dict
    arc.resume()
    lr_state = arc._lr.state_dict()
    trace = []
    g = torch.Generator().manual_seed(1)
    while arc.global_step < until:
        if arc.global_step == save_at:
            lr_state = arc._lr.state_dict()
            arc.save()
            break
        x = torch.randn(8, 8, generator=g)
        loss = (model(x) - x[:, :2].sin()).square().mean()
        loss.backward()
        if not arc.step(loss).should_skip:
            opt.step()
            sched.step()
            trace.append((arc.global_step, arc.stats()["lr_scale"], opt.param_groups[0]["lr"]))
        opt.zero_grad(set_to_none=True)
    arc.close()
    return lr_state, trace


#: a failure at step 7, and again at 8 before training recovered: the LR is backed off
RECURRING = "nan_loss@7 nan_loss@8"


def test_lr_backoff_survives_a_resume(tmp_path):
    _, ref = _lr_run(str(tmp_path / "ref"), 20, chaos=RECURRING)
    # backed off at the second rollback (8 -> 5), restored 8 steps after that failure
    assert [s for s, scale, _ in ref if scale == 0.5] == list(range(6, 16))
    assert all(scale == 1.0 for s, scale, _ in ref if s >= 16)

    url = str(tmp_path / "ck")
    first, _ = _lr_run(url, 20, chaos=RECURRING, save_at=10)
    second, trace = _lr_run(url, 20)
    assert first == second == {"scale": 0.5, "restore_at": 16}
    assert trace == [r for r in ref if r[0] > 10]


def test_checkpoint_without_the_restore_step_still_loads(tmp_path):
    url = str(tmp_path / "ck")
    _lr_run(url, 20, chaos=RECURRING, save_at=10, old_format=True)
    resumed, trace = _lr_run(url, 20)
    assert resumed == {"scale": 0.5, "restore_at": 18}
    # the restore step is unknown: the backoff stays for a full recovery window from the resume
    assert [s for s, scale, _ in trace if scale == 0.5] == list(range(11, 18))
    assert all(scale == 1.0 for s, scale, _ in trace if s >= 18)
