"""Run ``python -m arc_dist.launch`` (or the training worker under it) as a test subprocess.

Each run gets its own session, TMPDIR and log folder; :meth:`LaunchProc.cleanup` SIGKILLs the
launcher's whole tree (torchrun and the workers live in sessions of their own), so a failing
test leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from arc_dist.elastic.launcher import _descendants, sigkill_all

REPO = Path(__file__).resolve().parent.parent
#: examples/train_ddp.py's run with the events tests read (``--report``) and ``--throttle``
TRAIN_WORKER = REPO / "tests" / "workers" / "train_worker.py"
#: torchrun's agent logging the first failure of a worker group (any exit code, any rank)
AGENT_SAW_A_FAILURE = re.compile(r"failed \(exitcode: -?\d+\) local_rank: \d+")


def clean_env(tmp: Path, **extra: str) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ARC_", "PET_", "TORCHELASTIC_"))
    }
    env.update(TMPDIR=str(tmp), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


class LaunchProc:
    def __init__(self, tmp: Path, launcher_flags: list[str], script: str | Path, script_args: list[str],
                 name: str = "run", env: dict[str, str] | None = None):  # fmt: skip
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out_path = self.dir / "out.txt"
        self._out = open(self.out_path, "w")  # noqa: SIM115 - closed in cleanup()
        cmd = [sys.executable, "-m", "arc_dist.launch", f"--log-dir={self.dir / 'logs'}",
               *launcher_flags, str(script), *script_args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=self.dir, env=clean_env(self.dir, **(env or {})), stdout=self._out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._tree: set[int] = set()

    @property
    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def track(self) -> None:
        """Remember the launcher's current descendants (they may be re-parented later)."""
        if self.proc.poll() is None:
            self._tree.update(_descendants(self.proc.pid))

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.track()
            if time.monotonic() > deadline:
                self.cleanup()
                raise TimeoutError(
                    f"launcher did not finish within {timeout}s:\n{self.output[-4000:]}"
                )
            time.sleep(0.5)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.track()
        sigkill_all([self.proc.pid, *self._tree])
        self.proc.wait()
        self._out.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # the latter: reaped between open and read
        return False


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def example_args(report: Path, ckpt: Path, steps: int, *extra: str) -> list[str]:
    """Flags for ``TRAIN_WORKER``: small, fast, checkpoints every 10 steps."""
    return [
        "--steps", str(steps), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10",
        "--confirm-after", "5", "--snapshot-every", "5", "--report", str(report),
        "--log-every", "10", "--corpus-bytes", "300000", *extra,
    ]  # fmt: skip


def write_record(folder: Path, attempt: int, rank: int, err: BaseException | None, **arc) -> None:
    """What worker ``rank`` of ``attempt`` leaves in the launcher's error folder: the start
    marker, then (unless ``err`` is None: killed) its record, written by the real writer under
    the environment the launcher and torchrun give it; ``arc`` overrides fields of the record."""
    from arc_dist.elastic.exitcodes import ERROR_DIR_ENV, mark_started, write_error_file

    env = {ERROR_DIR_ENV: str(folder), "TORCHELASTIC_RESTART_COUNT": str(attempt),
           "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
    saved = {k: os.environ.get(k) for k in (*env, "TORCHELASTIC_ERROR_FILE")}
    os.environ.update(env)
    os.environ.pop("TORCHELASTIC_ERROR_FILE", None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mark_started()
        path = None if err is None else write_error_file(err, int(getattr(err, "exit_code", 1)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if path is not None and arc:
        data = json.loads(Path(path).read_text())
        data["message"]["arc"].update(arc)
        Path(path).write_text(json.dumps(data))
