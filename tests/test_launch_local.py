"""Fast local recovery under real torchrun: a SIGKILLed rank's group resumes from /dev/shm.

examples/train_ddp.py (through tests/workers/train_worker.py) with 2 ranks under the launcher,
snapshots every 5 steps (tests/_launchproc.example_args). With durable checkpoints only every 50
steps, a rank SIGKILLed at step 33 restarts from the node-local snapshot of step 30 and finishes
with the loss of a fault-free run; the tier in /dev/shm is gone after the clean end. With every
local snapshot of rank 1 corrupted (one flipped byte) before the restart, both ranks fall back to
the newest healthy durable checkpoint and the log says why.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from arc_dist.checkpoint.local_format import default_local_dir
from arc_dist.errors import ExitCode

from ._launchproc import events
from .test_launch_recovery import STEPS, _committed_before_restart, _done, _launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> float:
    """The fault-free run's final loss (as tests/test_launch_recovery.py's)."""
    run, report = _launch(tmp_path_factory.mktemp("reference"), "reference")
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
    assert rc == ExitCode.OK, run.output[-3000:]
    done = _done(report)
    assert done["step"] == STEPS and math.isfinite(done["loss"])
    return done["loss"]


def _check_finished(run, report, reference: float) -> int:
    """The run's outcome checks; returns the step the restart resumed at."""
    done = _done(report)
    assert done["step"] == STEPS and done["restart"] == 1
    assert math.isfinite(done["loss"]) and abs(done["loss"] - reference) < 0.05 * reference
    starts = [e for e in events(report) if e["event"] == "start" and e["rank"] == 0]
    assert [s["restart"] for s in starts] == [0, 1], starts  # exactly one group restart
    assert done["resumed_from"] == starts[1]["step"]
    return starts[1]["step"]


@pytest.mark.timeout(300)
def test_sigkill_resumes_from_the_local_snapshot_not_the_durable_checkpoint(tmp_path, reference):
    # durable checkpoints every 50 steps: none exists when rank 1 dies at step 33
    run, report = _launch(tmp_path, "local", "--checkpoint-every", "50", "--chaos", "crash@33/1")
    shm = default_local_dir(str(tmp_path / "local" / "ckpt"), None)
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
        existed = os.path.exists(shm)
        shutil.rmtree(shm, ignore_errors=True)  # never leave memory behind, also on failure
    out = run.output
    assert rc == ExitCode.OK, out[-3000:]
    assert "injecting crash at step 33" in out  # rank 1 SIGKILLs itself
    assert _check_finished(run, report, reference) == 30, out[-3000:]
    assert "resumed from the local snapshot tier at step 30" in out
    assert "no healthy durable checkpoint" in out
    if os.path.isdir("/dev/shm"):
        assert shm.startswith("/dev/shm/")
    assert not existed  # the clean end removed the tier


def _wait_for(pred, report: Path, run, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not pred(events(report)):
        run.track()
        assert run.proc.poll() is None, run.output[-3000:]
        assert time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.02)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.timeout(300)
def test_corrupted_local_snapshots_fall_back_to_durable_storage(tmp_path, reference):
    local = tmp_path / "shm"
    run, report = _launch(
        tmp_path, "corrupt", "--local-dir", str(local), "--log-every", "1", "--throttle", "0.1"
    )
    try:
        _wait_for(lambda ev: any(e["event"] == "step" and e["step"] >= 33 for e in ev), report, run)
        pids = {e["rank"]: e["pid"] for e in events(report) if e["event"] == "start"}
        for pid in pids.values():  # freeze the group: no snapshot is written meanwhile
            os.kill(pid, signal.SIGSTOP)
        victims = sorted(local.glob("step_*/rank_1.pt"))
        assert [p.parent.name for p in victims][-1:] in (["step_30"], ["step_35"]), victims
        for p in victims:  # every local snapshot of rank 1; rank 0's stay intact
            _flip_byte(p)
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[0], signal.SIGCONT)
        rc = run.wait(240)
    finally:
        run.cleanup()
    out = run.output
    assert rc == ExitCode.OK, out[-3000:]
    resumed = _check_finished(run, report, reference)
    # the newest healthy durable checkpoint committed before the kill, not a local snapshot
    assert resumed == _committed_before_restart(out) and resumed % 10 == 0, out[-3000:]
    assert "is unusable (rank 1: rank_1.pt fails its" in out
    # every local snapshot was rejected, or the usable ones are older than that checkpoint
    assert "local snapshot tier not used: every local snapshot was rejected" in out or (
        "is older than the newest healthy durable checkpoint" in out
    ), out[-3000:]
    assert f"resuming from durable storage (step {resumed})" in out
