"""The checkpoint lifecycle rules (docs/checkpoints.md, "Lifecycle"), one test per row.

Pure tests of ``arc_dist.checkpoint.lifecycle`` first (no processes, no files), then the same
rules through a real ``CheckpointManager`` on real files at world size 1 (the problems seen in
practice: a SIGTERM checkpoint thrown away at restart, storage emptied by retention plus a
rollback, confirmations counted for checkpoints retention had already deleted). The
SIGTERM-under-torchrun case is in test_launch_preemption.py.
"""

from __future__ import annotations

import logging
import warnings

import pytest

from arc_dist import Arc, ArcConfig
from arc_dist.checkpoint import CheckpointManager, Storage, scan
from arc_dist.checkpoint.catalog import CheckpointInfo
from arc_dist.checkpoint.lifecycle import Lifecycle, resume_order
from arc_dist.checkpoint.manifest import (
    CONFIRMED_NAME,
    MANIFEST_NAME,
    FileEntry,
    make_manifest,
)
from arc_dist.cli import main as cli
from arc_dist.observe.events import read_events
from tests.checkpoint_helpers import (
    Position,
    assert_state_equal,
    make_model,
    make_optimizer,
    reference_state,
)
from tests.test_checkpoint import Run
from tests.test_local_tier import _train as train_arc

pytestmark = pytest.mark.timeout(120)


def _info(step: int, status: str | None = "healthy", confirmed: bool = False) -> CheckpointInfo:
    files = {"x": 1, MANIFEST_NAME: 1}
    if confirmed:
        files[CONFIRMED_NAME] = 1
    verdict = {} if status is None else {"status": status}
    m = make_manifest(
        step, 1, {".metadata": FileEntry(1, "0")}, checksum_algorithm="crc32", verdict=verdict
    )
    return CheckpointInfo(step, f"/r/step_{step}", files, m)


def _run(lc: Lifecycle, start: int, stop: int, targets=None) -> list[int]:
    """Healthy steps ``start..stop-1``; the steps confirmed meanwhile."""
    out = []
    for g in range(start, stop):
        if targets is not None:
            lc.rollback_targets = tuple(targets(g))
        out += [s for s, _ in lc.healthy_step(g).confirmed]
    return out


def _save(lc: Lifecycle, step: int, healthy: bool = True):
    lc.saving(step)
    return lc.committed(step, healthy)


# -- committed -----------------------------------------------------------------------------------
def test_committed_only_once_the_manifest_is_written_and_never_after_a_failure():
    lc = Lifecycle(keep=3, confirm_after=2)
    lc.saving(10)
    assert lc.checkpoints == {} and lc.pending == [10]  # being written: not a checkpoint yet
    lc.abandoned(10)  # every attempt failed
    assert lc.pending == [] and _run(lc, 10, 20) == []
    _save(lc, 20)
    assert list(lc.checkpoints) == [20] and lc.pending == [20]


# -- confirmed -----------------------------------------------------------------------------------
def test_confirmed_after_confirm_after_healthy_steps_counted_from_the_save_call():
    lc = Lifecycle(keep=3, confirm_after=3)
    lc.saving(10)
    assert _run(lc, 10, 13) == []  # steps 11, 12 count while it is written; 10 itself does not
    out = lc.committed(10, healthy=True)
    assert out.confirmed == ()
    out = lc.healthy_step(13)
    assert out.confirmed == ((10, 3),) and lc.checkpoints[10].confirmed
    # counted enough before the commit: confirmed at the commit
    lc.saving(20)
    _run(lc, 20, 24)
    assert lc.committed(20, healthy=True).confirmed == ((20, 3),)
    # confirm_after=0: at once
    assert _save(Lifecycle(keep=1, confirm_after=0), 5).confirmed == ((5, 0),)


# -- resumed -------------------------------------------------------------------------------------
def test_resume_takes_the_newest_healthy_checkpoint_not_the_newest_confirmed():
    infos = [_info(20, confirmed=True), _info(40, confirmed=True), _info(47)]  # 47: SIGTERM save
    assert [i.step for i in resume_order(infos)] == [47, 40, 20]
    # saved under a warning: after every healthy one; confirmed makes it healthy; no status
    # (a save outside Arc) counts as healthy; a partial directory is not a checkpoint
    partial = CheckpointInfo(60, "/r/step_60", {"x": 1})
    infos = [
        _info(10, "warning", confirmed=True),
        _info(20),
        _info(30, None),
        _info(40, "warning"),
        _info(50, "warning"),
        partial,
    ]
    assert [i.step for i in resume_order(infos)] == [30, 20, 10, 50, 40]


def test_resumed_checkpoint_counts_towards_confirmation_and_is_never_retracted():
    lc = Lifecycle(keep=3, confirm_after=5)
    lc.loaded([_info(20, confirmed=True), _info(47), _info(50, "warning")], 47)
    assert lc.pending == [47] and lc.checkpoints[50].healthy is False
    assert lc.rolled_back(30).retract == ()  # a rollback cannot retract it (nor reach before it)
    assert _run(lc, 47, 53) == [47]


# -- retracted -----------------------------------------------------------------------------------
def test_rollback_retracts_unconfirmed_checkpoints_past_the_restored_state_only():
    lc = Lifecycle(keep=10, confirm_after=5)
    for step in (10, 20):
        _save(lc, step)
        _run(lc, step, step + 10)  # 10 and 20 are confirmed by step 25 / 29
    _save(lc, 30)
    _run(lc, 30, 32)
    lc.saving(35)  # still being written
    out = lc.rolled_back(25)
    assert out.retract == (30,) and out.reject == (35,)
    assert sorted(lc.checkpoints) == [10, 20] and lc.pending == []
    # a confirmed checkpoint past the restored state is kept: it is the evidence-backed fallback
    out = lc.rolled_back(15)
    assert out.retract == () and sorted(lc.checkpoints) == [10, 20]
    # a save that commits after the rollback rejected it is retracted at its commit
    lc.saving(40)
    lc.rolled_back(38)
    assert lc.committed(40, healthy=True).retract == (40,) and 40 not in lc.checkpoints


# -- pruned --------------------------------------------------------------------------------------
def test_retention_keeps_newest_plus_confirmed_healthy_resumed_and_rollback_fallbacks():
    lc = Lifecycle(keep=2, confirm_after=100)
    lc.loaded([_info(5, confirmed=True), _info(20)], 20)
    out = [_save(lc, s, healthy=s < 40).pruned for s in (25, 30, 35, 40, 45)]
    # 5: newest confirmed; 20: resumed from (no newer one is confirmed); 35: newest healthy
    # (40 and 45 were saved under warnings)
    assert out == [(), (), (25,), (30,), ()]
    assert sorted(lc.checkpoints) == [5, 20, 35, 40, 45]
    assert lc.protected() == {5, 20, 35}
    # the newest checkpoint at or before each state a rollback can restore is kept: 35 is no
    # longer the newest healthy once 50 commits, 40 no longer among the 2 newest
    lc.rollback_targets = (36, 44)
    assert _save(lc, 50).pruned == ()
    lc.rollback_targets = (36,)
    assert _save(lc, 55).pruned == (40, 45)
    assert sorted(lc.checkpoints) == [5, 20, 35, 50, 55]
    # newer confirmed checkpoints take over from the resumed one and the old fallbacks
    lc.rollback_targets = ()
    assert _run(lc, 55, 156) == [20, 35, 50, 55]
    assert sorted(lc.checkpoints) == [50, 55]


def test_storage_never_left_without_a_healthy_checkpoint_off_the_failed_trajectory():
    # resumed from an unconfirmed checkpoint with checkpoint_every * keep < confirm_after
    lc = Lifecycle(keep=3, confirm_after=20)
    lc.loaded([_info(20)], 20)
    for s in (25, 30, 35):
        _save(lc, s)
        _run(lc, s, s + 5)
    assert 20 in lc.checkpoints  # resumed from: not pruned although 3 newer ones exist
    lc.rolled_back(22)
    assert sorted(lc.checkpoints) == [20]

    # a fresh run, snapshots every 25 steps (keep 2): the checkpoint under the older one stays
    lc = Lifecycle(keep=2, confirm_after=100)
    for s in range(10, 50, 10):
        _save(lc, s)
        _run(lc, s, s + 10, targets=lambda g: (25 * (g // 25 - 1), 25 * (g // 25)))
    assert sorted(lc.checkpoints) == [20, 30, 40]  # 20: newest at or before snapshot 25
    lc.rolled_back(25)  # the newest snapshot (escalation would go further back: none here)
    assert sorted(lc.checkpoints) == [20]


def test_a_checkpoint_pruned_before_its_confirmation_is_never_confirmed():
    lc = Lifecycle(keep=3, confirm_after=20)
    confirmed = []
    for s in range(5, 65, 5):
        out = _save(lc, s)
        confirmed += [c for c, _ in out.confirmed]
        confirmed += _run(lc, s, s + 5, targets=lambda g: (g - g % 5,))
    assert confirmed == [] and sorted(lc.checkpoints) == [50, 55, 60]
    assert lc.pending == [50, 55, 60]


def test_config_warns_when_confirm_after_outlasts_retention():
    with pytest.warns(UserWarning, match=r"confirm_after=20 .* keep_checkpoints >= 4"):
        ArcConfig(checkpoint_every=5, keep_checkpoints=3, confirm_after=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArcConfig(checkpoint_every=5, keep_checkpoints=4, confirm_after=20)
        ArcConfig(checkpoint_every=0, confirm_after=20)  # only explicit saves: nothing to warn


# -- the same rules through a real manager, real files ----------------------------------------
def _manager(url, **kw) -> CheckpointManager:
    kw.setdefault("retry_backoff", 0.05)
    return CheckpointManager(str(url), **kw)


def _states(url) -> list[tuple[int, str]]:
    return [(i.step, i.state) for i in scan(Storage(str(url)))]


def test_final_checkpoint_beats_an_older_confirmed_one_and_nothing_is_deleted(tmp_path, caplog):
    ck = tmp_path / "ck"
    run = Run()
    run.train(20)
    with _manager(ck, confirm_after=2) as mgr:  # the first run: a periodic save, confirmed
        mgr.save(20, run.app_state(), verdict={"status": "healthy"})
        for g in range(20, 23):
            mgr.on_healthy_step(g)
        run.train(27)
        mgr.save(47, run.app_state(), verdict={"status": "healthy"})  # the SIGTERM save
    assert _states(ck) == [(20, "confirmed"), (47, "committed")]
    at_47 = {k: v.clone() for k, v in run.model.state_dict().items()}

    with _manager(ck, confirm_after=2) as mgr:  # the restart
        fresh = Run(seed=3)
        assert mgr.load(fresh.app_state()) == 47
        mgr.wait()
    assert_state_equal(fresh.model.state_dict(), at_47)
    assert _states(ck) == [(20, "confirmed"), (47, "committed")]  # nothing thrown away

    # saved under a warning: an older healthy one is resumed, the newer one is left in place
    run.train(3)
    with _manager(ck, confirm_after=2) as mgr:
        mgr.save(50, run.app_state(), verdict={"status": "warning"})
    with caplog.at_level(logging.INFO, logger="arc_dist"), _manager(ck) as mgr:
        assert mgr.load(Run(seed=3).app_state()) == 47
        mgr.wait()
    assert "newer step_50 left in place" in caplog.text
    assert _states(ck) == [(20, "confirmed"), (47, "committed"), (50, "committed")]


def test_cli_prune_keeps_the_newest_healthy_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    run = Run()
    with _manager(ck, keep=5, confirm_after=100) as mgr:
        for step, status in ((10, "healthy"), (20, "healthy"), (30, "warning"), (40, "warning")):
            mgr.save(step, run.app_state(), verdict={"status": status})
    assert cli(["prune", str(ck), "--keep", "1"]) == 0
    assert "removing step_10" in capsys.readouterr().out
    assert [s for s, _ in _states(ck)] == [20, 40]  # 20: what a resume would load


def test_resumed_unconfirmed_checkpoint_survives_retention_and_a_rollback(tmp_path):
    ck = tmp_path / "ck"
    run = Run()
    run.train(20)
    with _manager(ck, confirm_after=20) as mgr:
        mgr.save(20, run.app_state())
    with _manager(ck, keep=3, confirm_after=20) as mgr:  # resumed; saves every 5 steps
        assert mgr.load(run.app_state()) == 20
        for step in (25, 30, 35):
            for g in range(step - 5, step):
                mgr.on_healthy_step(g)
            mgr.save(step, run.app_state(), blocking=False)
            mgr.wait()
        assert [s for s, _ in _states(ck)] == [20, 25, 30, 35]  # 20 kept: resumed from
        mgr.on_rollback(22)
        mgr.wait()
        assert _states(ck) == [(20, "committed")]
        assert mgr.stats()["checkpoints_rejected"] == 3


def _arc_run(url: str, steps: int, **cfg) -> Arc:
    model = make_model(0)
    opt, sched = make_optimizer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the config warning is tested above
        config = ArcConfig(snapshot_every=5, async_checkpoint=False, **cfg)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=config)
    pos = Position()
    arc.register("data", pos)
    arc.resume()
    train_arc(arc, model, opt, sched, pos, steps)
    arc.close()
    return arc


@pytest.mark.parametrize("keep", [3, 5])
def test_stats_and_events_count_only_confirmations_of_checkpoints_that_exist(tmp_path, keep):
    url = str(tmp_path / "ck")
    arc = _arc_run(url, 46, checkpoint_every=5, keep_checkpoints=keep, confirm_after=20)
    confirms = [e for e in read_events(url) if e["kind"] == "checkpoint_confirm"]
    stats = arc.stats()
    if keep == 3:  # each checkpoint is deleted 15 steps after its save, before 20 healthy steps
        assert stats["checkpoints_confirmed"] == 0 and stats["last_confirmed_step"] is None
        assert confirms == []
        assert _states(url) == [(35, "committed"), (40, "committed"), (45, "committed")]
    else:  # kept 25 steps: 5 .. 25 are confirmed at 25 .. 45, then pruned but 25 (newest)
        assert stats["checkpoints_confirmed"] == 5 and stats["last_confirmed_step"] == 25
        assert [e["step"] for e in confirms] == [5, 10, 15, 20, 25]
        assert _states(url) == [(25, "confirmed")] + [(s, "committed") for s in (30, 35, 40, 45)]
    assert_state_equal(arc.model.state_dict(), reference_state(46))
