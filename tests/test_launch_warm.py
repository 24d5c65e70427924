"""Fast recovery under the launcher: the survivor of a crashed peer exits without walking its heap,
and ``--warm-start`` forks workers from a per-node zygote with torch already imported, behind a
torch-free shim that torchrun supervises like any worker (arc_dist/elastic/zygote.py).

Real torchrun, real SIGKILL and SIGTERM; every test has its own TMPDIR and log folder, a timeout,
and kills whatever is left. No timing assertions: the times are benchmarks/recovery.py's.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from arc_dist.checkpoint import Storage, scan
from arc_dist.elastic.command import build_command, parse_args
from arc_dist.elastic.launcher import _descendants, sigkill_all
from arc_dist.elastic.zygote import REQUEST_WAIT, SHIM, wait_listening
from arc_dist.errors import ExitCode

from ._launchproc import (
    AGENT_SAW_A_FAILURE,
    REPO,
    TRAIN_WORKER,
    LaunchProc,
    alive,
    clean_env,
    events,
    example_args,
)

LAUNCH_WORKER = REPO / "tests" / "workers" / "launch_worker.py"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="warm start is Linux-only"
)


@pytest.mark.timeout(120)
def test_a_failing_exit_freezes_the_heap_before_the_teardown(tmp_path):
    # an atexit handler registered before main() runs after main_entry's (LIFO): the heap is
    # frozen by then, so the teardown's cycle collection skips torch's objects
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import atexit, gc
        from arc_dist.launch import main_entry
        atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, flush=True))

        @main_entry
        def main():
            raise RuntimeError("peer gone")

        main()
    """))  # fmt: skip
    env = clean_env(tmp_path, TORCHELASTIC_ERROR_FILE=str(tmp_path / "error.json"))
    p = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=100)  # fmt: skip
    assert p.returncode == ExitCode.RETRY, p.stderr[-2000:]
    assert "frozen True" in p.stdout, (p.stdout, p.stderr[-2000:])


def test_warm_start_flags_and_the_shim_command(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.setenv("ARC_WARM_IMPORTS", "gpt,my_pkg.model")
    spec, _ = parse_args(["--warm-start", "--warm-import=data", str(script), "--steps", "5"])
    assert spec.warm_start and spec.warm_imports == ["gpt", "my_pkg.model", "data"]
    cmd, _ = build_command(spec, agent_error_file="err.json", zygote="arc-zygote-x")
    assert cmd[-6:] == [SHIM, "arc-zygote-x", "--", str(script), "--steps", "5"]
    spec.module = True
    cmd, _ = build_command(spec, agent_error_file="err.json", zygote="arc-zygote-x")
    assert cmd[-6:] == [SHIM, "arc-zygote-x", "-m", str(script), "--steps", "5"]
    assert "-m" not in cmd[3:-6]  # torchrun runs the shim file; the shim runs the module
    monkeypatch.delenv("ARC_WARM_IMPORTS")
    with pytest.raises(SystemExit) as e:
        parse_args(["--warm-start", "--warm-import=not a module", str(script)])
    assert e.value.code == ExitCode.UNRECOVERABLE


# ------------------------------------------------------------ the shim and the zygote alone

SCRIPT = """
import os, signal, sys, time
mode = sys.argv[1]
if mode == "term":  # as Arc does: SIGTERM is a request to stop in an orderly way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(10))
print("argv", sys.argv[1:], "env", os.environ.get("WARM_TEST"), "cwd", os.getcwd(),
      "main", __name__, "ppid", os.getppid(), "pid", os.getpid(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "raise":
    raise RuntimeError("boom in the worker")
time.sleep(120)
"""


@pytest.fixture
def zygote(tmp_path):
    """A real zygote that imports nothing heavy (json): the protocol without torch's import; its
    stderr goes to ``zygote.err``."""
    address = f"arc-zygote-test-{uuid.uuid4().hex}"
    with open(tmp_path / "zygote.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-u", "-m", "arc_dist.elastic.zygote", address,
                                 "json"], env=clean_env(tmp_path), stderr=err,
                                start_new_session=True)  # fmt: skip
    (tmp_path / "w.py").write_text(SCRIPT)
    try:
        assert wait_listening(address, proc)
        yield address, proc
    finally:
        sigkill_all([proc.pid, *_descendants(proc.pid)])
        proc.wait()


def _shim(tmp_path, address, *args, warm_timeout: float | None = None) -> subprocess.Popen:
    extra = {} if warm_timeout is None else {"ARC_WARM_TIMEOUT": str(warm_timeout)}
    return subprocess.Popen(
        [sys.executable, "-u", SHIM, address, "--", "w.py", *args], cwd=tmp_path,
        env=clean_env(tmp_path, WARM_TEST="from-the-shim", **extra), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _worker_pid(shim: subprocess.Popen, zygote_pid: int) -> int:
    """The worker's pid from its first line; it must be the zygote's child, not the shim's."""
    line = shim.stdout.readline()
    ppid, pid = (int(x) for x in line.split("ppid ")[1].split(" pid "))
    assert ppid == zygote_pid, line
    return pid


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.timeout(60)
def test_shim_hands_over_argv_env_cwd_stdio_and_returns_the_exit_status(tmp_path, zygote):
    address, proc = zygote
    shim = _shim(tmp_path, address, "exit", "7")
    out, err = shim.communicate(timeout=50)
    assert shim.returncode == 7, (out, err)
    assert (
        f"argv ['exit', '7'] env from-the-shim cwd {tmp_path} main __main__ ppid {proc.pid}" in out
    )
    assert "to stderr" in err
    shim = _shim(tmp_path, address, "raise")
    out, err = shim.communicate(timeout=50)
    assert shim.returncode == 1 and "RuntimeError: boom in the worker" in err


@pytest.mark.timeout(60)
def test_shim_relays_sigterm_and_dies_of_the_workers_signal(tmp_path, zygote):
    address, proc = zygote
    handled = _shim(tmp_path, address, "term")
    plain = _shim(tmp_path, address, "sleep")
    workers = [_worker_pid(s, proc.pid) for s in (handled, plain)]
    for s in (handled, plain):
        s.send_signal(signal.SIGTERM)
    assert handled.wait(30) == 10  # the worker's handler ran and chose its exit code
    assert plain.wait(30) == -signal.SIGTERM  # killed by the signal: the shim dies of it too
    assert all(_gone(pid) for pid in workers)
    killed = _shim(tmp_path, address, "sleep")
    os.kill(_worker_pid(killed, proc.pid), signal.SIGKILL)  # kill -9 of the worker itself
    assert killed.wait(30) == -signal.SIGKILL  # what torchrun sees is what happened


@pytest.mark.timeout(60)
def test_worker_dies_with_its_shim_and_with_the_zygote(tmp_path, zygote):
    address, proc = zygote
    first, second = _shim(tmp_path, address, "sleep"), _shim(tmp_path, address, "sleep")
    w1 = _worker_pid(first, proc.pid)
    first.kill()  # torchrun's SIGKILL reaches the shim only
    first.wait()
    assert _gone(w1), "the worker outlived its shim"
    w2 = _worker_pid(second, proc.pid)
    proc.kill()  # the zygote dies: its workers get their parent-death SIGKILL
    proc.wait()
    assert _gone(w2), "the worker outlived the zygote"
    second.wait(30)


@pytest.mark.timeout(60)
def test_without_a_zygote_the_shim_starts_the_worker_normally(tmp_path):
    (tmp_path / "w.py").write_text(SCRIPT)
    shim = _shim(tmp_path, f"arc-zygote-none-{uuid.uuid4().hex}", "exit", "3")
    out, _ = shim.communicate(timeout=50)
    _started_normally(shim, out, tmp_path)


def _started_normally(shim: subprocess.Popen, out: str, cwd: Path) -> None:
    """The shim became the worker itself, ran it once, and left nothing in its session."""
    assert shim.returncode == 3 and out.count("argv ") == 1, out
    assert f"argv ['exit', '3'] env from-the-shim cwd {cwd}" in out
    assert f"ppid {os.getpid()}" in out  # exec'd in place of the shim: our child, no zygote
    assert not _in_session(shim.pid), "a process of the shim's session is left"


def _in_session(sid: int) -> list[int]:
    members = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    members.append(int(p))
        except (OSError, ValueError, IndexError):
            pass
    return members


@pytest.mark.timeout(60)
@pytest.mark.parametrize("accepts", [True, False], ids=["accepts", "never-accepts"])
def test_a_zygote_that_never_answers_costs_the_timeout_then_the_worker_starts_normally(
    tmp_path, accepts
):
    (tmp_path / "w.py").write_text(SCRIPT)
    address = f"arc-zygote-silent-{uuid.uuid4().hex}"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind("\0" + address)
    silent.listen(8)
    silent.settimeout(30)
    held = []
    try:
        shim = _shim(tmp_path, address, "exit", "3", warm_timeout=2)
        if accepts:
            held.append(silent.accept()[0])  # takes the connection, reads nothing, says nothing
        assert shim.wait(50) == 3
    finally:
        for s in (*held, silent):  # with them go the stdio copies queued in the request
            s.close()
    out, err = shim.communicate(timeout=30)
    assert "the zygote did not start w.py: starting it normally" in err, err
    _started_normally(shim, out, tmp_path)


@pytest.mark.timeout(90)
def test_a_stalled_zygote_forks_nothing_for_a_shim_that_gave_up(tmp_path, zygote):
    address, proc = zygote
    os.kill(proc.pid, signal.SIGSTOP)  # stalled: the request queues on its socket, unanswered
    try:
        shim = _shim(tmp_path, address, "exit", "3", warm_timeout=2)
        assert shim.wait(50) == 3  # it gave up and started the worker itself
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # end of output: the zygote took the stale request and let go of its copy of the stdio
    out, err = shim.communicate(timeout=50)
    assert "starting it normally" in err, err
    _started_normally(shim, out, tmp_path)  # once: no second copy of the rank printed anything
    assert "the shim of w.py gave up waiting" in (tmp_path / "zygote.err").read_text()
    served = _shim(tmp_path, address, "exit", "0")  # the zygote still serves the next one
    out, _ = served.communicate(timeout=50)
    assert served.returncode == 0 and f"ppid {proc.pid}" in out, out


@pytest.mark.timeout(90)
def test_a_client_that_connects_and_says_nothing_holds_up_no_one(tmp_path, zygote):
    address, proc = zygote
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect("\0" + address)
        served = _shim(tmp_path, address, "exit", "0")  # queued behind the silent connection
        out, _ = served.communicate(timeout=50)
        assert served.returncode == 0 and f"ppid {proc.pid}" in out, out  # forked, not cold
        # ... while the zygote still held the silent connection open, waiting for its request
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.settimeout(REQUEST_WAIT + 30)
        assert silent.recv(1) == b""  # then dropped, and the zygote goes on serving
    assert "nothing sent within" in (tmp_path / "zygote.err").read_text()
    again = _shim(tmp_path, address, "exit", "0")
    out, _ = again.communicate(timeout=50)
    assert again.returncode == 0 and f"ppid {proc.pid}" in out, out


@pytest.mark.timeout(60)
def test_a_child_forked_for_a_shim_that_then_gives_up_never_runs(tmp_path, zygote):
    # the window a check before the fork cannot close: the shim times out just as the answer
    # arrives, closes without the go and starts the worker itself; this client is that shim
    address, proc = zygote
    r, w = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    body = json.dumps({"module": False, "target": "w.py", "args": ["sleep"], "cwd": str(tmp_path),
                       "env": clean_env(tmp_path)}).encode()  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect("\0" + address)
        socket.send_fds(sock, [struct.pack("!I", len(body))], [stdin, w, w])
        sock.sendall(body)
        for fd in (stdin, w):
            os.close(fd)
        pid = json.loads(sock.recv(4096).split(b"\n")[0])["pid"]  # forked
        printed, _, _ = select.select([r], [], [], 3)  # a child that ran would print at once
    with os.fdopen(r, "rb") as f:  # end of output: every copy of the write end is closed
        out = f.read()
    assert not printed and out == b"", out
    assert _gone(pid)
    assert proc.poll() is None


# ------------------------------------------------------------ through the launcher and torchrun


def _zygote_pid(out: str) -> int:
    m = re.search(r"warm start: zygote pid (\d+) forks the workers", out)
    assert m, out[-3000:]
    return int(m.group(1))


def _ended(run: LaunchProc, timeout: float, code: int) -> str:
    """Wait for the launcher's exit code; every worker of the run came from the zygote (no
    shim started one normally). Returns the output."""
    try:
        rc = run.wait(timeout)
    finally:
        run.cleanup()
    out = run.output
    assert rc == code, out[-3000:]
    assert "[arc-zygote] ready in" in out and "[arc-warm]" not in out, out[-3000:]
    running = next(line for line in out.splitlines() if "running: " in line)
    assert SHIM in running, running  # torchrun ran the shim, not the script itself
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "mode, flags, code",
    [
        ("unrecoverable", ["--nproc-per-node=2", "--max-restarts=5"], ExitCode.UNRECOVERABLE),
        ("hardware", ["--max-restarts=5", "--bad-node-after=2"], ExitCode.BAD_NODE),
        ("hardware", ["--max-restarts=0", "--bad-node-after=0"], ExitCode.HARDWARE),
        ("kill", ["--nproc-per-node=2", "--max-restarts=1"], ExitCode.RETRY),
    ],
)
def test_exit_codes_reach_the_launcher_through_the_shim(tmp_path, mode, flags, code):
    markers = tmp_path / "markers"
    markers.mkdir()
    run = LaunchProc(tmp_path, ["--warm-start", *flags], LAUNCH_WORKER, [mode, str(markers)])
    out = _ended(run, 200, code)
    assert _gone(_zygote_pid(out)), "the zygote outlived the launcher"
    starts = sorted(markers.glob("start-*.json"))
    assert starts and not any(alive(int(p.stem.split("-")[-1])) for p in starts)
    if mode == "kill":  # the SIGKILL reached torchrun through the shim, and it restarted
        assert {p.stem.split("-")[1] for p in starts} == {"0", "1"}
        assert "exitcode: -9" in out


def _train(tmp_path, steps: int, *extra: str, restarts: int = 1) -> tuple[LaunchProc, Path]:
    report, ckpt = tmp_path / "run" / "report.jsonl", tmp_path / "run" / "ckpt"
    run = LaunchProc(tmp_path, ["--warm-start", "--nproc-per-node=2", f"--max-restarts={restarts}"],
                     TRAIN_WORKER, example_args(report, ckpt, steps, "--log-every", "1", *extra))  # fmt: skip
    return run, report


def _wait_step(run: LaunchProc, report: Path, step: int) -> list[dict]:
    deadline = time.monotonic() + 180
    while not any(e["event"] == "step" and e["step"] >= step for e in events(report)):
        assert run.proc.poll() is None, run.output[-3000:]
        assert time.monotonic() < deadline, f"training did not reach step {step}"
        run.track()
        time.sleep(0.05)
    return events(report)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_of_a_forked_rank_resumes_and_finishes_with_identical_replicas(tmp_path):
    run, report = _train(tmp_path, 40, "--throttle", "0.05")
    try:
        ev = _wait_step(run, report, 22)
        victim = next(e["pid"] for e in ev if e["event"] == "start" and e["rank"] == 1)
        os.kill(victim, signal.SIGKILL)
    except BaseException:
        run.cleanup()
        raise
    out = _ended(run, 240, ExitCode.OK)
    # the agent saw a worker fail (the SIGKILL, or the survivor's error in the same second:
    # test_exit_codes_reach_the_launcher_through_the_shim checks the SIGKILL itself)
    assert AGENT_SAW_A_FAILURE.search(out), out[-3000:]
    ev = events(report)
    starts = [(e["restart"], e["rank"]) for e in ev if e["event"] == "start"]
    assert sorted(starts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # every start, the restarted ones too, forked by the zygote (not torchrun, not the shim)
    assert {e["ppid"] for e in ev if e["event"] == "start"} == {_zygote_pid(out)}
    resumed = next(e["step"] for e in ev if e["event"] == "start" and e["restart"] == 1)
    assert resumed >= 20  # the newest snapshot/checkpoint before the kill, not a fresh start
    done = [e for e in ev if e["event"] == "done"]
    assert len(done) == 1 and done[0]["step"] == 40 and math.isfinite(done[0]["loss"])
    sums = [e["sum"] for e in ev if e["event"] == "params" and e["restart"] == 1]
    assert len(sums) == 2 and sums[0] == sums[1] and math.isfinite(sums[0])
    assert _gone(_zygote_pid(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_still_writes_the_final_checkpoint_and_exits_retry(tmp_path):
    run, report = _train(tmp_path, 60, "--throttle", "0.15", "--checkpoint-every", "20")
    try:
        _wait_step(run, report, 26)
        run.proc.send_signal(signal.SIGTERM)  # as the kubelet would: to the launcher
    except BaseException:
        run.cleanup()
        raise
    out = _ended(run, 120, ExitCode.RETRY)
    m = re.search(r"SIGTERM on ranks \[[\d, ]+\] at step (\d+): writing a final checkpoint", out)
    assert m and 26 <= int(m.group(1)) < 60, out[-3000:]
    infos = [c for c in scan(Storage(str(tmp_path / "run" / "ckpt"))) if c.committed]
    assert infos[-1].step == int(m.group(1))
    pids = [e["pid"] for e in events(report) if e["event"] == "start"]
    assert not any(alive(p) for p in [*pids, _zygote_pid(out)])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_of_the_launcher_leaves_no_zygote_or_worker_behind(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    # as under a scheduler that gives the launcher rank variables: the zygote must not see them
    run = LaunchProc(tmp_path, ["--warm-start", "--nproc-per-node=2"], LAUNCH_WORKER,
                     ["sleep", str(markers)], env={"RANK": "5", "LOCAL_RANK": "5"})  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while len(list(markers.glob("start-*.json"))) < 2:
            assert run.proc.poll() is None, run.output[-3000:]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        workers = [int(p.stem.split("-")[-1]) for p in markers.glob("start-*.json")]
        zygote = _zygote_pid(run.output)
        assert all(_ppid(w) == zygote for w in workers)
        with open(f"/proc/{zygote}/environ", "rb") as f:
            env = dict(v.decode().split("=", 1) for v in f.read().split(b"\0") if v)
        assert env["TMPDIR"] == str(run.dir)  # the launcher's environment...
        leaked = {"RANK", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE"} & set(env)
        assert not leaked, f"per-worker variables in the zygote: {leaked}"  # ...less these
        tree = _descendants(run.proc.pid)
        run.proc.kill()  # only the launcher: no chance to clean up
        run.proc.wait()
        left = [p for p in [zygote, *workers, *tree] if not _gone(p, timeout=60)]
    finally:
        run.cleanup()
    assert not left, f"left behind: {left}"
