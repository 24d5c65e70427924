"""The launcher's pure parts: error files, the exit-code decision, flags and the command line."""

from __future__ import annotations

import json
import os
import shlex
import sys

import pytest

from arc_dist.elastic.exitcodes import (
    classify_error_data,
    decide,
    hardware_streak,
    no_progress_streak,
    read_error_file,
    root_cause,
    scan_error_dir,
    track_progress,
    write_error_file,
)
from arc_dist.elastic.launcher import build_command, format_command, main, parse_args
from arc_dist.errors import ExitCode, HangError, HardwareError, UnrecoverableError

from ._launchproc import write_record


def _torch_record(message: str, **extra) -> dict:
    """The JSON that torch's @record writes (without arc's object)."""
    msg = {"message": message, "extraInfo": {"py_callstack": "", "timestamp": "1700000000"}}
    msg.update(extra)
    return {"message": msg}


@pytest.mark.parametrize(
    "data, code",
    [
        (_torch_record("UnrecoverableError: nan at step 9"), ExitCode.UNRECOVERABLE),
        (_torch_record("CheckpointError: every checkpoint corrupt"), ExitCode.UNRECOVERABLE),
        (_torch_record("HardwareError: ECC"), ExitCode.HARDWARE),
        (_torch_record("RuntimeError: Connection reset by peer"), ExitCode.RETRY),
        # the agent's copy of a root cause carries the worker's exit status
        (_torch_record("SystemExit: 13", errorCode=13), ExitCode.BAD_NODE),
        (_torch_record("RuntimeError: boom", errorCode=1), ExitCode.RETRY),
        # arc's own field wins over the class name
        (_torch_record("HangError: stuck", arc={"exitCode": 10}), ExitCode.RETRY),
        (_torch_record("Whatever", arc={"exitCode": 12}), ExitCode.HARDWARE),
        ({"message": "new string format"}, ExitCode.RETRY),
        ({}, ExitCode.RETRY),
    ],
)
def test_classify_error_data(data, code):
    assert classify_error_data(data) == code


def test_error_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    try:
        raise UnrecoverableError("step 12: nonfinite_loss on ranks (1,)")
    except UnrecoverableError as e:
        path = write_error_file(e, e.exit_code)
    assert path == str(tmp_path / "error.json")
    data = json.loads((tmp_path / "error.json").read_text())
    # torch's own reader keys stay intact
    assert int(data["message"]["extraInfo"]["timestamp"]) > 0
    assert "raise UnrecoverableError" in data["message"]["extraInfo"]["py_callstack"]
    f = read_error_file(path, attempt=2, local_rank=1)
    assert f.exit_code == ExitCode.UNRECOVERABLE and f.rank == 5 and f.attempt == 2
    assert f.message == "UnrecoverableError: step 12: nonfinite_loss on ranks (1,)"
    assert "rank 5" in f.describe() and "exit 11" in f.describe()
    # without a destination nothing is written, and nothing raises
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    assert write_error_file("x", 10) is None
    assert read_error_file(str(tmp_path / "missing.json")) is None
    (tmp_path / "half.json").write_text('{"message": ')
    assert read_error_file(str(tmp_path / "half.json")) is None


def _layout(root, errors: dict[tuple[int, int], tuple[BaseException, float]], attempts: int):
    """The launcher's error folder after ``attempts`` attempts of 2 ranks with ``errors``."""
    for a in range(attempts):
        for r in range(2):
            err, t = errors.get((a, r), (None, 0.0))
            write_record(root, a, r, err, time=t)
    return str(root)


def test_scan_and_decide_restarts_exhausted(tmp_path):
    runs = _layout(
        tmp_path,
        {
            (0, 0): (HardwareError("ECC"), 10.0),
            # last attempt: a peer's generic error came first, the deliberate one a bit later
            (1, 0): (RuntimeError("Connection reset by peer"), 20.0),
            (1, 1): (HardwareError("illegal memory access"), 20.5),
        },
        attempts=2,
    )
    last, failures = scan_error_dir(runs)
    assert last == 1 and len(failures) == 3
    cause = root_cause([f for f in failures if f.attempt == 1])
    assert cause.local_rank == 1 and cause.exit_code == ExitCode.HARDWARE
    assert hardware_streak(failures, last) == 2
    out = decide(1, failures, last)
    assert out.exit_code == ExitCode.HARDWARE and "illegal memory access" in out.reason
    # the same host failing on a device error twice in a row: replace the node
    out = decide(1, failures, last, bad_node_after=2)
    assert out.exit_code == ExitCode.BAD_NODE and "replace the node" in out.reason
    assert decide(1, failures, last, bad_node_after=3).exit_code == ExitCode.HARDWARE


def test_decide_orders_stop_codes_preemption_success_and_signals(tmp_path):
    runs = _layout(
        tmp_path,
        {(0, 0): (UnrecoverableError("nan"), 1.0), (0, 1): (HangError("stuck"), 0.5)},
        attempts=2,
    )
    last, failures = scan_error_dir(runs)
    # a stop code anywhere ends the job with it, even if a later attempt died otherwise
    out = decide(1, failures, last, signalled="SIGTERM")
    assert out.exit_code == ExitCode.UNRECOVERABLE and "do not retry" in out.reason
    assert decide(1, [], 0, signalled="SIGTERM").exit_code == ExitCode.RETRY
    assert decide(0, [], 3).exit_code == ExitCode.OK
    # an attempt that left no error file (SIGKILL, OOM killer): retry, saying so
    retry = [f for f in failures if f.exit_code == ExitCode.RETRY]
    out = decide(1, retry, last, agent_message="RendezvousTimeoutError: x")
    assert out.exit_code == ExitCode.RETRY
    assert "no error file" in out.reason and "RendezvousTimeoutError" in out.reason
    # the hang in attempt 0 is the root cause if attempt 0 was the last
    assert decide(1, retry, 0).exit_code == ExitCode.RETRY


class _Trainer:
    def __init__(self, step: int) -> None:
        self.global_step = step


def _attempts(root, attempts: list[tuple[BaseException, int, int] | None]) -> str:
    """attempts[a] = (error, resumed from, step reached) on rank 0; None: no error file."""
    for a, spec in enumerate(attempts):
        if spec is None:
            write_record(root, a, 0, None)
            continue
        err, resumed, reached = spec
        trainer = _Trainer(resumed)
        track_progress(trainer, resumed)
        trainer.global_step = reached
        write_record(root, a, 0, err, time=float(a))
    return str(root)


def _bug(step: int = 0) -> BaseException:
    return KeyError(f"'labels' (batch {step})")


@pytest.mark.parametrize(
    "attempts, streak",
    [
        # the same bug before the first step after every resume: a restart cannot help
        ([(_bug(), 0, 0), (_bug(), 0, 0), (_bug(), 0, 0)], 3),
        ([(_bug(40), 40, 40), (_bug(40), 40, 40), (_bug(40), 40, 40)], 3),  # numbers aside
        # a crash that moves on (the step reached passes the resume step) breaks the streak
        ([(_bug(), 0, 0), (_bug(), 40, 57), (_bug(), 50, 50)], 1),
        # another error breaks it
        ([(_bug(), 0, 0), (ValueError("bad shape"), 0, 0), (_bug(), 0, 0)], 1),
        # an attempt without an error file (SIGKILL, OOM killer) breaks it
        ([(_bug(), 0, 0), None, (_bug(), 0, 0)], 1),
        # peers, the network, storage, hangs, preemption: never "the same bug"
        ([(RuntimeError("Connection closed by peer [10.0.0.2]:3921"), 0, 0)] * 3, 0),
        ([(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Gloo error"), 0, 0)] * 3, 0),
        ([(HangError("rank 1 made no progress for 300 s"), 0, 0)] * 3, 0),
        ([(TimeoutError("store"), 0, 0)] * 3, 0),
        # device errors have their own rule
        ([(HardwareError("CUDA error: illegal memory access"), 0, 0)] * 3, 0),
    ],
)
def test_no_progress_streak(tmp_path, attempts, streak):
    last, failures = scan_error_dir(_attempts(tmp_path, attempts))
    assert no_progress_streak(failures, last) == streak
    out = decide(1, failures, last, no_progress_after=3)
    if streak >= 3:
        assert out.exit_code == ExitCode.UNRECOVERABLE, out.reason
        assert "before passing the step they resumed from" in out.reason
        assert "KeyError: \"'labels' (batch" in out.reason  # names the repeated error
    else:
        assert out.exit_code != ExitCode.UNRECOVERABLE, out.reason
    assert decide(1, failures, last, no_progress_after=0).exit_code != ExitCode.UNRECOVERABLE


def test_no_progress_needs_arc_dists_record(tmp_path):
    """A file from torch's plain @record says nothing about progress: it never counts."""
    for a in range(3):
        (tmp_path / f"{a}-0-1.json").write_text(json.dumps(_torch_record("KeyError: 'labels'")))
    last, failures = scan_error_dir(str(tmp_path))
    assert [f.made_progress for f in failures] == [None] * 3
    assert no_progress_streak(failures, last) == 0


def test_flags_env_defaults_and_command(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("")
    monkeypatch.setenv("ARC_MAX_RESTARTS", "7")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "4")
    monkeypatch.setenv("ARC_RDZV_ID", "job-42")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    spec, dry = parse_args(
        ["--nnodes=1:2", "--rdzv-endpoint=10.0.0.1:29400", "--max-restarts=2",
         "--torchrun-arg=--tee=3", str(script), "--lr", "3e-4"]
    )  # fmt: skip
    assert not dry
    assert spec.max_restarts == 2  # an explicit flag beats the environment
    assert spec.nproc_per_node == "4" and spec.rdzv_id == "job-42"
    cmd, env = build_command(spec, agent_error_file="/logs/agent.json")
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    for arg in ("--nnodes=1:2", "--nproc-per-node=4", "--max-restarts=2",
                "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=job-42",
                "--tee=3"):  # fmt: skip
        assert arg in cmd
    assert cmd[-3:] == [str(script), "--lr", "3e-4"]
    line = format_command(cmd, env)
    assert line.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")
    assert shlex.split(line)[len(env) :] == cmd
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "20"  # inside the launcher's own 30 s
    assert env["ARC_ERROR_DIR"] == os.path.join(spec.log_dir, "arc-errors")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--nnodes=1:2", "--rdzv-id=x"], ["--rdzv-endpoint", "every node"]),
        (["--nnodes=1:2", "--rdzv-endpoint=h:1"], ["--rdzv-id"]),
        (["--nnodes=3:2"], ["--nnodes='3:2'", "MIN <= MAX"]),
        (["--nproc-per-node=0"], ["--nproc-per-node='0'"]),
        (["--max-restarts=-1"], ["--max-restarts=-1"]),
    ],
)
def test_bad_flags_exit_unrecoverable_naming_the_flag(argv, words, tmp_path, capsys, monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ARC_", "PET_")):
            monkeypatch.delenv(k)
    script = tmp_path / "train.py"
    script.write_text("")
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, str(script)])
    assert e.value.code == ExitCode.UNRECOVERABLE
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_missing_script_and_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([str(tmp_path / "nope.py")])
    assert e.value.code == ExitCode.UNRECOVERABLE
    assert "does not exist" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["--dry-run", "--nproc-per-node=2", str(script)]) == 0
    out = capsys.readouterr().out
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out and "--rdzv-endpoint=localhost:0" in out


def test_torchrun_sh_wraps_the_launcher(tmp_path):
    import subprocess

    script = tmp_path / "train.py"
    script.write_text("")
    wrapper = os.path.join(os.path.dirname(__file__), "..", "launch", "torchrun.sh")
    p = subprocess.run(
        ["bash", wrapper, "--dry-run", "--nproc-per-node=2", str(script), "--steps", "5"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "--nproc-per-node=2" in p.stdout and p.stdout.strip().endswith("--steps 5")


@pytest.mark.parametrize(
    "raise_, code, message",
    [
        (UnrecoverableError("step 3: nonfinite_loss"), 11, "UnrecoverableError: step 3"),
        # (a HardwareError ends the process with os._exit: tests/test_launch_torchrun.py)
        (SystemExit(13), 13, "SystemExit: 13"),
        (SystemExit(10), 10, "SystemExit: 10"),
    ],
)
def test_main_entry_records_the_exit_code(raise_, code, message, tmp_path, monkeypatch):
    from arc_dist.launch import main_entry

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    @main_entry
    def main():
        raise raise_

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == code
    f = read_error_file(str(tmp_path / "error.json"))
    assert f.exit_code == code and f.message.startswith(message)


def _bad_config():
    from arc_dist import ArcConfig

    ArcConfig(confirm_after=-1)


def _implicit_type_error_in_arc_dist():
    from arc_dist.checkpoint.storage import Storage

    Storage("/tmp").join(None)  # a TypeError inside arc-dist that no validation raised: 10


def _script_value_error():
    int("not a number")  # a bug in the script: may depend on its data, so a restart is allowed


def _unwritable_checkpoint_dir(tmp_path):
    from arc_dist.checkpoint import CheckpointManager
    from tests import faultfs

    CheckpointManager(
        faultfs.url(tmp_path / "ck"), storage_options={"write_error": "PermissionError"}
    )


def _unreachable_checkpoint_dir(tmp_path):
    from arc_dist.checkpoint import CheckpointManager
    from tests import faultfs

    CheckpointManager(
        faultfs.url(tmp_path / "ck"), storage_options={"write_error": "ConnectionError"}
    )


@pytest.mark.parametrize(
    "body, code, message",
    [
        (lambda tmp: _bad_config(), 11, "ValueError: ArcConfig.confirm_after=-1"),
        (lambda tmp: _script_value_error(), 10, "ValueError: invalid literal"),
        (lambda tmp: _implicit_type_error_in_arc_dist(), 10, "TypeError: sequence item 1"),
        (lambda tmp: (_ for _ in ()).throw(RuntimeError("Connection reset by peer")), 10,
         "RuntimeError: Connection reset"),
        (_unwritable_checkpoint_dir, 11, "CheckpointStorageError: arc_dist: checkpoint_dir="),
        (_unreachable_checkpoint_dir, 10, "CheckpointStorageError: arc_dist: checkpoint_dir="),
    ],
)  # fmt: skip
def test_main_entry_classifies_usage_errors_and_records_progress(body, code, message, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    from arc_dist.elastic.exitcodes import track_progress
    from arc_dist.launch import main_entry

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    class Trainer:
        global_step = 7

    trainer = Trainer()
    track_progress(trainer, 7)  # resumed from step 7, then failed before passing it

    @main_entry
    def main():
        body(tmp_path)

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == code
    f = read_error_file(str(tmp_path / "error.json"))
    assert f.exit_code == code and f.message.startswith(message), f.message
    assert f.made_progress is False and f.error_type == message.split(":")[0]
    trainer.global_step = 8  # one step past the resume step: progress
    (tmp_path / "error.json").unlink()  # torchrun gives every attempt a fresh error file
    with pytest.raises(SystemExit):
        main()
    assert read_error_file(str(tmp_path / "error.json")).made_progress is True


def test_main_entry_without_errors_writes_nothing(tmp_path, monkeypatch):
    from arc_dist.launch import main_entry

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    @main_entry
    def ok():
        return 42

    assert ok() == 42 and not (tmp_path / "error.json").exists()


@pytest.mark.parametrize("later", [RuntimeError("Connection closed by peer"), HangError("late")])
def test_main_entry_keeps_the_record_arc_step_wrote_first(later, tmp_path, monkeypatch):
    """Arc.step records a rank-local error before the process ends; that record carries the
    time that makes it the root cause, so neither main_entry nor @record overwrites it."""
    from arc_dist.launch import main_entry

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    @main_entry
    def main():
        write_error_file(ValueError("rank 1 passed a non-scalar loss"), int(ExitCode.RETRY))
        raise later

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == (
        int(later.exit_code) if isinstance(later, HangError) else int(ExitCode.RETRY)
    )
    f = read_error_file(str(path))
    assert f.message == "ValueError: rank 1 passed a non-scalar loss"


def test_main_entry_writes_into_the_launchers_error_folder(tmp_path, monkeypatch):
    """The launcher reads a folder it owns ($ARC_ERROR_DIR), not torchrun's log layout: the
    worker marks its start and writes its record there (atomically), beside torch's file."""
    from arc_dist.launch import main_entry

    folder = tmp_path / "errors"
    folder.mkdir()
    (folder / "0-0-1.json").write_text(json.dumps(_torch_record("HardwareError: old run")))
    earlier = set(os.listdir(folder))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "torch" / "error.json"))
    monkeypatch.setenv("ARC_ERROR_DIR", str(folder))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")

    @main_entry
    def main():
        raise UnrecoverableError("nan at step 9")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == ExitCode.UNRECOVERABLE
    pid = os.getpid()
    assert sorted(set(os.listdir(folder)) - earlier) == [f"2-5-{pid}.json", f"2-5-{pid}.started"]
    last, failures = scan_error_dir(str(folder), ignore=earlier)
    (f,) = failures
    assert (last, f.attempt, f.rank, f.local_rank) == (2, 2, 5, 1)
    assert (
        f.exit_code == ExitCode.UNRECOVERABLE and f.message == "UnrecoverableError: nan at step 9"
    )
    # torch's own file is not written (its folder is missing), the launcher's record still is
    assert not (tmp_path / "torch").exists()
    # a later attempt that was killed before writing anything is still the newest
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")

    @main_entry
    def killed():
        return None

    killed()
    last, failures = scan_error_dir(str(folder), ignore=earlier)
    assert last == 3 and [f.attempt for f in failures] == [2]
    assert decide(1, failures, last).exit_code == ExitCode.UNRECOVERABLE  # a stop code stays
    # the earlier run's file counts when not ignored
    assert len(scan_error_dir(str(folder))[1]) == 2


def test_arc_reports_its_progress_in_error_files(tmp_path):
    import torch

    from arc_dist import Arc, ArcConfig

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    arc = Arc(model, opt, config=ArcConfig(hang_timeout=None))
    path = str(tmp_path / "error.json")
    assert arc.resume() == 0
    write_error_file(RuntimeError("x"), 10, path=path)
    assert read_error_file(path).made_progress is False  # failed before its first step
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    arc.step(loss)
    opt.step()
    write_error_file(RuntimeError("x"), 10, path=path)
    assert read_error_file(path).made_progress is True
    arc.close()
