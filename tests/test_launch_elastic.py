"""Node loss and rejoin: two torchrun agents on this machine form a ``--nnodes=1:2`` job.

Agent A (it hosts the c10d rendezvous store) and agent B each run one rank of examples/train_ddp.py
(through tests/workers/train_worker.py). B is SIGKILLed as a whole (launcher, agent, worker: a node
losing power); A must continue alone at world size 1 from the newest checkpoint (a resharded
resume), then a new agent B' joins and the job scales back to 2 ranks and finishes.
"""

from __future__ import annotations

import math
import socket
import time

import pytest

from arc_dist.errors import ExitCode

from ._launchproc import TRAIN_WORKER, LaunchProc, events, example_args

pytestmark = pytest.mark.slow

STEPS = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(report, pred, what: str, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred(events(report)):
        for p in procs:
            assert p.proc.poll() is None, f"{what}: launcher exited early:\n{p.output[-3000:]}"
            p.track()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _steps(evs, world=None) -> list[int]:
    return [e["step"] for e in evs if e["event"] == "step" and world in (None, e["world"])]


@pytest.mark.timeout(400)
def test_node_loss_shrinks_to_one_node_and_a_new_node_scales_back(tmp_path):
    port = _free_port()
    report, ckpt = tmp_path / "report.jsonl", tmp_path / "ckpt"
    flags = [
        "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3",
        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
        # a dead agent drops out of the rendezvous after 3 missed 1 s heartbeats
        "--rdzv-conf=last_call_timeout=2,join_timeout=120,keep_alive_interval=1,"
        "keep_alive_max_attempt=3",
    ]  # fmt: skip
    args = example_args(report, ckpt, STEPS, "--throttle", "0.1")
    script = TRAIN_WORKER
    a = LaunchProc(tmp_path, flags, script, args, name="A")
    b = b2 = None
    try:
        deadline = time.monotonic() + 60
        while True:  # A's agent hosts the store; B must only connect to it
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert a.proc.poll() is None, a.output[-3000:]
                assert time.monotonic() < deadline, "A's rendezvous store never came up"
                time.sleep(0.2)
        b = LaunchProc(tmp_path, flags, script, args, name="B")
        _wait_for(report, lambda e: _steps(e, 2) and max(_steps(e, 2)) >= 20, "2 ranks", [a, b])

        b.cleanup()  # the node is gone: launcher, agent and worker at once
        n = len(events(report))
        _wait_for(report, lambda e: _steps(e[n:], 1), "A alone", [a])

        b2 = LaunchProc(tmp_path, flags, script, args, name="B2")
        n = len(events(report))
        _wait_for(report, lambda e: _steps(e[n:], 2), "2 ranks again", [a, b2], timeout=180)
        rc_a, rc_b2 = a.wait(240), b2.wait(240)
    finally:
        for p in (a, b, b2):
            if p is not None:
                p.cleanup()
    assert rc_a == ExitCode.OK, a.output[-3000:]
    assert rc_b2 == ExitCode.OK, b2.output[-3000:]

    evs = events(report)
    starts = [e for e in evs if e["event"] == "start" and e["rank"] == 0]
    worlds = [s["world"] for s in starts]
    i1 = worlds.index(1, worlds.index(2))  # 2 ranks, then 1 ...
    assert 2 in worlds[i1:], worlds  # ... then 2 again
    shrink, grow = starts[i1], starts[i1 + worlds[i1:].index(2)]
    assert shrink["step"] >= 10 and grow["step"] >= shrink["step"], starts  # resumed, not restarted
    assert "resharding" in a.output  # the checkpoint was loaded at another world size
    done = [e for e in evs if e["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == STEPS and done[0]["world"] == 2
    assert math.isfinite(done[0]["loss"]) and done[0]["loss"] < 3.5  # it learned (ln 256 = 5.5)
