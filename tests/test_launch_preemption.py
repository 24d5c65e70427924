"""SIGTERM through real torchrun: the final checkpoint, the retry exit code, and the resume.

What a Kubernetes eviction does: SIGTERM reaches the launcher, which forwards it to torchrun,
which forwards it to the workers. Every rank agrees (the flag travels in the step's signals),
writes one final checkpoint of the current healthy state, and exits 10; the launcher exits 10;
the next start resumes from exactly that checkpoint.
"""

from __future__ import annotations

import math
import re
import signal
import time

import pytest

from arc_dist.checkpoint import Storage, scan
from arc_dist.errors import ExitCode

from ._launchproc import EXAMPLES, LaunchProc, events, example_args

pytestmark = pytest.mark.slow


@pytest.mark.timeout(420)
def test_sigterm_writes_a_final_checkpoint_exits_retry_and_the_restart_resumes(tmp_path):
    report, ckpt = tmp_path / "report.jsonl", tmp_path / "ckpt"
    args = example_args(report, ckpt, 60, "--throttle", "0.15", "--checkpoint-every", "50")
    run = LaunchProc(tmp_path, ["--nproc-per-node=2", "--max-restarts=2"], EXAMPLES / "train_ddp.py",
                     args, name="first")  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not any(e["event"] == "step" and e["step"] >= 20 for e in events(report)):
            assert run.proc.poll() is None, run.output[-3000:]
            assert time.monotonic() < deadline, "training did not reach step 20"
            time.sleep(0.2)
        run.proc.send_signal(signal.SIGTERM)  # as the kubelet would
        rc = run.wait(120)
    finally:
        run.cleanup()
    out = run.output
    assert rc == ExitCode.RETRY, out[-3000:]
    m = re.search(r"SIGTERM on ranks \[[\d, ]+\] at step (\d+): writing a final checkpoint", out)
    assert m, out[-3000:]
    at = int(m.group(1))
    assert 20 <= at < 60
    # the periodic saves are every 50 steps: the only checkpoint is the final one
    assert [c.step for c in scan(Storage(str(ckpt))) if c.committed] == [at]
    assert not any(e["event"] == "done" for e in events(report))

    again = LaunchProc(tmp_path, ["--nproc-per-node=2", "--max-restarts=0"], EXAMPLES / "train_ddp.py",
                       example_args(report, ckpt, 60, "--checkpoint-every", "50"), name="second")  # fmt: skip
    try:
        assert again.wait(240) == ExitCode.OK, again.output[-3000:]
    finally:
        again.cleanup()
    starts = [e for e in events(report) if e["event"] == "start" and e["rank"] == 0]
    assert starts[-1]["step"] == at, starts  # resumed from the final checkpoint
    done = [e for e in events(report) if e["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == 60 and math.isfinite(done[0]["loss"])
