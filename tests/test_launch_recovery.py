"""Recovery under real torchrun, through the launcher and the examples: real signals, real hangs.

Each scenario runs examples/train_ddp.py's loop (with DDP, or FSDP2 as in train_fsdp.py;
tests/workers/train_worker.py adds the events the checks read) with 2 ranks, a fault from
``--chaos`` in the first attempt, durable checkpoints every 10 steps, and ends with outcome
checks: the exit code, the step count reached, a finite loss close to a fault-free run's, and a
restart that resumed no earlier than the newest checkpoint confirmed before the fault.
"""

from __future__ import annotations

import math
import re

import pytest

from arc_dist.errors import ExitCode

from ._launchproc import AGENT_SAW_A_FAILURE, TRAIN_WORKER, LaunchProc, events, example_args

pytestmark = pytest.mark.slow

STEPS = 40


def _launch(tmp, name, *extra, restarts=2, flags=()):
    report, ckpt = tmp / name / "report.jsonl", tmp / name / "ckpt"
    run = LaunchProc(
        tmp, ["--nproc-per-node=2", f"--max-restarts={restarts}", *flags], TRAIN_WORKER,
        example_args(report, ckpt, STEPS, *extra), name=name,
    )  # fmt: skip
    return run, report


def _done(report) -> dict:
    done = [e for e in events(report) if e["event"] == "done"]
    assert len(done) == 1, events(report)
    return done[0]


def _confirmed_before_restart(output: str) -> int:
    """The newest checkpoint step confirmed healthy in the first attempt's log."""
    first_attempt = output.split("restart 1, world size")[0]
    steps = [int(s) for s in re.findall(r"checkpoint step_(\d+) confirmed healthy", first_attempt)]
    return max(steps, default=0)


def _committed_before_restart(output: str) -> int:
    """The newest checkpoint step committed in the first attempt's log (every checkpoint Arc
    writes holds a state whose agreed verdict was healthy)."""
    first_attempt = output.split("restart 1, world size")[0]
    steps = [int(s) for s in re.findall(r"checkpoint step_(\d+) committed", first_attempt)]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The fault-free run's final loss (mean of its last 20 steps)."""
    tmp = tmp_path_factory.mktemp("reference")
    run, report = _launch(tmp, "reference")
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
    assert rc == ExitCode.OK, run.output[-3000:]
    done = _done(report)
    assert done["step"] == STEPS and math.isfinite(done["loss"])
    return done["loss"]


def _assert_recovered(run, report, reference: float) -> dict:
    done = _done(report)
    assert done["step"] == STEPS
    assert math.isfinite(done["loss"]) and abs(done["loss"] - reference) < 0.05 * reference
    starts = [e for e in events(report) if e["event"] == "start" and e["rank"] == 0]
    assert [s["restart"] for s in starts] == [0, 1], starts  # exactly one group restart
    resumed = starts[1]["step"]
    assert resumed >= _confirmed_before_restart(run.output) and resumed > 0, (
        resumed,
        run.output[-3000:],
    )
    assert done["restart"] == 1 and done["resumed_from"] == resumed
    return done


@pytest.mark.timeout(300)
def test_sigkill_of_one_rank_mid_step_restarts_and_resumes(tmp_path, reference):
    run, report = _launch(tmp_path, "crash", "--chaos", "crash@25/1")
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
    assert rc == ExitCode.OK, run.output[-3000:]
    assert "injecting crash at step 25" in run.output
    # the agent saw a worker fail. It logs only the earliest failure by whole-second
    # timestamps: the SIGKILL (-9), or the survivor's own error when its error file carries
    # the same second or an earlier one (a tie goes to local rank 0)
    assert AGENT_SAW_A_FAILURE.search(run.output), run.output[-3000:]
    _assert_recovered(run, report, reference)


@pytest.mark.timeout(300)
def test_hung_rank_is_caught_by_the_watchdog_and_the_group_restarts(tmp_path, reference):
    # rank 1 sleeps for an hour inside step 25; rank 0 waits for it in the step's collective
    run, report = _launch(
        tmp_path, "hang", "--chaos", "hang@25/1", "--hang-timeout", "4", "--hang-grace", "120"
    )
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
    out = run.output
    assert rc == ExitCode.OK, out[-3000:]
    assert "made no progress" in out
    # the hung rank's stack dump shows where it hung
    assert "_apply_step_fault" in out and "most recent call first" in out
    _assert_recovered(run, report, reference)


@pytest.mark.timeout(300)
def test_persistent_nan_exits_unrecoverable_without_a_restart_loop(tmp_path):
    # FSDP2 here, so train_fsdp.py's wrapping runs under torchrun too
    run, report = _launch(tmp_path, "nan", "--fsdp", "--chaos", "nan_loss@12!", restarts=3)
    try:
        rc = run.wait(240)
    finally:
        run.cleanup()
    out = run.output
    assert rc == ExitCode.UNRECOVERABLE, out[-3000:]
    assert "UnrecoverableError" in out and "do not retry" in out
    restarts = {e["restart"] for e in events(report) if e["event"] == "start"}
    assert restarts <= {0, 1}, restarts  # torchrun had 3 restarts left; at most one slipped in
    assert not [e for e in events(report) if e["event"] == "done"]
