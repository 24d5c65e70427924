"""``python -m arc_dist.launch`` against real torchrun: each worker failure maps to its exit code.

Every test starts the launcher in its own session with its own temp folder (TMPDIR and
torchrun's log folder), kills whatever is left in a ``finally``, and asserts outcomes only.
torchrun launches are slow here (5-15 s each), so there are few of them.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from arc_dist.errors import ExitCode

from ._launchproc import alive

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "workers", "launch_worker.py")


def _starts(markers) -> list[tuple[int, int, int]]:
    """(restart, rank, pid) of every worker start, in order of restart then rank."""
    out = []
    for p in glob.glob(os.path.join(markers, "start-*.json")):
        restart, rank, pid = os.path.basename(p)[len("start-") : -len(".json")].split("-")
        out.append((int(restart), int(rank), int(pid)))
    return sorted(out)


def _kill_leftovers(proc: subprocess.Popen, markers) -> None:
    for pid in [proc.pid] + [pid for _, _, pid in _starts(markers)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


class Launch:
    def __init__(self, tmp_path, mode: str, *flags: str):
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.log_dir = tmp_path / "logs"
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        for k in list(env):
            if k.startswith(("ARC_", "PET_", "TORCHELASTIC_")):
                del env[k]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arc_dist.launch", f"--log-dir={self.log_dir}", *flags,
             WORKER, mode, str(self.markers)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

    def wait(self, timeout: float = 150) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            return self.proc.returncode, out
        finally:
            _kill_leftovers(self.proc, self.markers)

    @property
    def starts(self):
        return _starts(self.markers)


@pytest.mark.timeout(180)
def test_success_exits_ok_and_prints_the_command(tmp_path):
    run = Launch(tmp_path, "ok", "--nproc-per-node=2", "--max-restarts=1")
    rc, out = run.wait()
    assert rc == ExitCode.OK, out
    line = next(ln for ln in out.splitlines() if "running:" in ln)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line
    for arg in ("-m torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                "--max-restarts=1", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                f"--log-dir={run.log_dir}", WORKER):  # fmt: skip
        assert arg in line
    starts = run.starts
    assert [(r, k) for r, k, _ in starts] == [(0, 0), (0, 1)]
    for *_, pid in starts:  # the workers really got the variable
        env = json.loads(next(run.markers.glob(f"start-*-{pid}.json")).read_text())
        assert env == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "WORLD_SIZE": "2"}
    assert "exit 0 (OK)" in out


@pytest.mark.timeout(180)
def test_unrecoverable_error_exits_11_without_a_restart_loop(tmp_path):
    run = Launch(tmp_path, "unrecoverable", "--nproc-per-node=2", "--max-restarts=5")
    rc, out = run.wait()
    assert rc == ExitCode.UNRECOVERABLE, out
    assert "UnrecoverableError: step 7: nonfinite_loss persisted" in out
    assert "stopping torchrun instead of restarting" in out
    # torchrun had 5 restarts left; the launcher stopped it (one restart may slip through
    # between the error file appearing and torchrun getting the SIGTERM)
    assert max(r for r, _, _ in run.starts) <= 1


@pytest.mark.timeout(180)
def test_a_plain_record_script_is_classified_from_torchruns_root_cause(tmp_path):
    """Without main_entry nothing lands in the launcher's error folder; the agent's copy of the
    root cause (by the exception's class name) still says "do not retry"."""
    run = Launch(tmp_path, "plain_record", "--nproc-per-node=1", "--max-restarts=0")
    rc, out = run.wait()
    assert rc == ExitCode.UNRECOVERABLE, out
    assert "UnrecoverableError: a script with torch's @record only" in out
    assert [p.name for p in (run.log_dir / "arc-errors").iterdir()] == []


@pytest.mark.timeout(240)
def test_the_same_bug_before_any_progress_exits_11_after_three_attempts(tmp_path):
    run = Launch(tmp_path, "bug", "--nproc-per-node=2", "--max-restarts=6")
    rc, out = run.wait(200)
    assert rc == ExitCode.UNRECOVERABLE, out
    assert "3 attempts in a row failed with the same error before passing the step" in out
    assert "KeyError: \"'labels'\"" in out and "stopping torchrun instead of restarting" in out
    assert 2 <= max(r for r, _, _ in run.starts) <= 3  # not 6 restarts (one may slip through)


@pytest.mark.timeout(180)
def test_sigkilled_worker_exits_retry_when_restarts_run_out(tmp_path):
    run = Launch(tmp_path, "kill", "--nproc-per-node=2", "--max-restarts=1")
    rc, out = run.wait()
    assert rc == ExitCode.RETRY, out
    assert {r for r, _, _ in run.starts} == {0, 1}  # the restart happened, then gave up
    assert "no error file" in out


@pytest.mark.timeout(180)
def test_repeated_device_error_exits_bad_node(tmp_path):
    # (one device error when restarts run out -> 12: tests/test_health.py)
    run = Launch(tmp_path, "hardware", "--max-restarts=5", "--bad-node-after=2")
    rc, out = run.wait()
    assert rc == ExitCode.BAD_NODE, out
    assert "replace the node" in out and "simulated CUDA error" in out
    assert max(r for r, _, _ in run.starts) <= 2  # stopped after two bad attempts (+1 slip)


@pytest.mark.timeout(180)
def test_sigterm_is_forwarded_and_exits_retry(tmp_path):
    run = Launch(tmp_path, "sleep", "--nproc-per-node=2", "--max-restarts=3")
    try:
        deadline = time.monotonic() + 120
        while len(run.starts) < 2:  # both workers are up
            assert run.proc.poll() is None, run.proc.stdout.read()
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        pids = [pid for *_, pid in run.starts]
        run.proc.send_signal(signal.SIGTERM)
        rc, out = run.wait()
    finally:
        _kill_leftovers(run.proc, run.markers)
    assert rc == ExitCode.RETRY, out
    assert "received SIGTERM: forwarding it to torchrun" in out
    assert "preempted" in out
    for pid in pids:  # torchrun took its workers down before the launcher exited
        assert not alive(pid), f"worker {pid} outlived the launcher"
    assert len(run.starts) == 2  # and did not restart them


@pytest.mark.timeout(180)
def test_sigterm_while_torchrun_is_being_started_is_forwarded(tmp_path, monkeypatch, capfd):
    """A SIGTERM between the launcher's handler and torchrun's start is not lost."""
    from arc_dist.elastic import launcher as launch

    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for k in list(os.environ):
        if k.startswith(("ARC_", "PET_", "TORCHELASTIC_")):
            monkeypatch.delenv(k)
    spec, _ = launch.parse_args([f"--log-dir={tmp_path / 'logs'}", "--max-restarts=3",
                                 WORKER, "sleep", str(markers)])  # fmt: skip
    real_popen = subprocess.Popen
    started: list[subprocess.Popen] = []

    def popen_after_sigterm(*args, **kwargs):
        if not started:  # the signal arrives while the launcher is starting torchrun
            os.kill(os.getpid(), signal.SIGTERM)
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen_after_sigterm)
    try:
        outcome = launch.Launcher(spec).run()
    finally:
        for p in started:
            _kill_leftovers(p, markers)
    err = capfd.readouterr().err
    assert outcome.exit_code == ExitCode.RETRY, err
    assert "forwarding SIGTERM to torchrun" in err and "preempted" in outcome.reason
    assert all(r == 0 for r, _, _ in _starts(markers))  # torchrun did not restart anything
