"""The hang watchdog in real subprocesses: a stalled process dumps every stack and exits 10."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from arc_dist.errors import ExitCode
from arc_dist.watchdog import Watchdog

WORKER = os.path.join(os.path.dirname(__file__), "workers", "watchdog_worker.py")


def _run(mode: str, tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"), "RANK": "3"}
    return subprocess.run(
        [sys.executable, WORKER, mode],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(150)
def test_hang_dumps_all_stacks_and_exits_retry(tmp_path):
    p = _run("hang", tmp_path)
    assert p.returncode == ExitCode.RETRY, p.stderr
    assert "entering hang" in p.stdout
    # faulthandler's dump on stderr names the blocked function and the watchdog's own thread
    assert "stuck_in_a_hang" in p.stderr
    assert "most recent call first" in p.stderr
    assert "made no progress" in p.stderr
    # the logger got the message and the formatted stacks too
    assert "arc_dist.watchdog: rank 3" in p.stdout and "stuck_in_a_hang" in p.stdout
    # the error file tells the launcher why: a hang, exit 10 (retry)
    data = json.loads((tmp_path / "error.json").read_text())
    assert data["message"]["message"].startswith("HangError: rank 3")
    assert data["message"]["arc"]["exitCode"] == ExitCode.RETRY
    assert "stuck_in_a_hang" in data["message"]["extraInfo"]["py_callstack"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "mode, survived",
    [
        ("progress", "survived"),  # a Watchdog of its own: grace, allow, stop
        ("arc", "survived 10"),  # Arc.allow_hang around a pause longer than hang_timeout
    ],
)
def test_grace_allow_and_stop_keep_a_slow_but_live_process_alive(tmp_path, mode, survived):
    p = _run(mode, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert survived in p.stdout
    assert not (tmp_path / "error.json").exists()


def test_arc_allow_hang_is_a_no_op_without_a_watchdog():
    import torch

    from arc_dist import Arc

    model = torch.nn.Linear(2, 1)
    arc = Arc(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with arc.allow_hang(5.0), arc.allow_hang():
        pass
    arc.close()


@pytest.mark.timeout(150)
def test_backstop_ends_a_process_whose_hung_thread_holds_the_gil(tmp_path):
    p = _run("gil", tmp_path)
    assert "holding the GIL" in p.stdout
    # faulthandler's C timer: status 1 (mapped to RETRY by the launcher) and a stack dump
    assert p.returncode == 1, p.stderr
    assert "Timeout" in p.stderr and "most recent call first" in p.stderr


def test_deadline_moves_with_beat_extend_and_allow():
    wd = Watchdog(timeout=1000.0, grace=5000.0, backstop=None)
    try:
        assert wd.seconds_left > 5000  # first step: timeout + grace
        wd.beat()
        assert wd.seconds_left <= 1000
        wd.extend(3000)
        assert wd.seconds_left > 3000
        wd.beat()
        with wd.allow(7000):
            assert wd.seconds_left > 7000
            with wd.allow(10):
                pass
            assert wd.seconds_left > 7000  # the inner block ended, the outer one still holds
        assert wd.seconds_left <= 1000  # leaving the block counts as progress
    finally:
        wd.stop()
    wd.stop()  # idempotent


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timeout": 0}, "timeout=0"),
        ({"timeout": -1.0}, "timeout=-1.0"),
        ({"timeout": 1.0, "grace": -1}, "grace=-1"),
        ({"timeout": 1.0, "backstop": 0}, "backstop=0"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Watchdog(**kwargs)
