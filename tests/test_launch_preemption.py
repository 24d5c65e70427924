"""SIGTERM through real torchrun: the final checkpoint, the retry exit code, and the resume.

What a Kubernetes eviction does: SIGTERM reaches the launcher, which forwards it to torchrun,
which forwards it to the workers. Every rank agrees (the flag travels in the step's signals),
writes one final checkpoint of the current healthy state, and exits 10; the launcher exits 10;
the next start resumes from exactly that checkpoint, not from an older periodic one (confirmed
or not) nor from an older node-local snapshot, and deletes nothing.
"""

from __future__ import annotations

import math
import re
import signal
import time

import pytest

from arc_dist.checkpoint import Storage, scan
from arc_dist.errors import ExitCode

from ._launchproc import TRAIN_WORKER, LaunchProc, events, example_args

pytestmark = pytest.mark.slow


def _final_checkpoint_step(out: str) -> int:
    m = re.search(r"SIGTERM on ranks \[[\d, ]+\] at step (\d+): writing a final checkpoint", out)
    assert m, out[-3000:]
    return int(m.group(1))


@pytest.mark.timeout(420)
def test_sigterm_writes_a_final_checkpoint_exits_retry_and_the_restart_resumes(tmp_path):
    report, ckpt = tmp_path / "report.jsonl", tmp_path / "ckpt"
    args = example_args(report, ckpt, 60, "--throttle", "0.15", "--checkpoint-every", "20",
                        "--log-every", "1")  # fmt: skip
    run = LaunchProc(tmp_path, ["--nproc-per-node=2", "--max-restarts=2"], TRAIN_WORKER,
                     args, name="first")  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any(e["event"] == "step" and e["step"] >= 46 for e in events(report)):
            assert run.proc.poll() is None, run.output[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 46"
            time.sleep(0.2)
        run.proc.send_signal(signal.SIGTERM)  # as the kubelet would
        rc = run.wait(120)
    finally:
        run.cleanup()
    out = run.output
    assert rc == ExitCode.RETRY, out[-3000:]
    at = _final_checkpoint_step(out)
    assert 46 <= at < 60
    # the periodic saves at 20 and 40 (both confirmed 5 steps later), then the final one
    infos = [c for c in scan(Storage(str(ckpt))) if c.committed]
    assert [(c.step, c.confirmed) for c in infos] == [(20, True), (40, True), (at, False)]
    assert not any(e["event"] == "done" for e in events(report))

    again = LaunchProc(tmp_path, ["--nproc-per-node=2", "--max-restarts=0"], TRAIN_WORKER,
                       example_args(report, ckpt, 60, "--checkpoint-every", "20"), name="second")  # fmt: skip
    try:
        assert again.wait(240) == ExitCode.OK, again.output[-3000:]
    finally:
        again.cleanup()
    starts = [e for e in events(report) if e["event"] == "start" and e["rank"] == 0]
    assert starts[-1]["step"] == at, starts  # resumed from the final checkpoint
    done = [e for e in events(report) if e["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == 60 and math.isfinite(done[0]["loss"])


@pytest.mark.timeout(420)
def test_sigterm_at_step_47_restart_in_the_same_launch_resumes_at_47(tmp_path):
    # checkpoints every 20 steps (confirmed 5 later), node-local snapshots every 5: at step 47
    # the newest confirmed checkpoint is step_40 and the newest local snapshot step 45; torchrun
    # restarts the group (same run id, so the local tier is a candidate) and it must take step_47
    report, ckpt = tmp_path / "report.jsonl", tmp_path / "ckpt"
    args = example_args(report, ckpt, 60, "--checkpoint-every", "20", "--chaos", "preempt@47/1")
    run = LaunchProc(tmp_path, ["--nproc-per-node=2", "--max-restarts=1"], TRAIN_WORKER,
                     args)  # fmt: skip
    try:
        assert run.wait(300) == ExitCode.OK, run.output[-3000:]
    finally:
        run.cleanup()
    out = run.output
    at = _final_checkpoint_step(out)
    assert at in (47, 48)  # the signal lands in step 47; under DDP its flag may ride on step 48
    starts = [e for e in events(report) if e["event"] == "start" and e["rank"] == 0]
    assert [(s["restart"], s["step"]) for s in starts] == [(0, 0), (1, at)], starts
    assert f"resumed from step_{at} (committed" in out and "local snapshot tier not used" in out
    done = [e for e in events(report) if e["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == 60 and math.isfinite(done[0]["loss"])
    # keep 3: step_20 made way; step_47 was confirmed after the restart, nothing else was lost
    infos = [c for c in scan(Storage(str(ckpt))) if c.committed]
    assert [c.step for c in infos] == [40, at, 60]
    assert [c.step for c in infos if c.confirmed] == [40, at]
