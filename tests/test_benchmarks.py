"""The quick benchmarks still run: the step-overhead, checkpoint and world-size ones, each in
its cheapest mode for a few steps, its table printed.

Their figures are not checked (no timing assertion belongs in a test); what is checked is that
they run to the end on the current code and report every row they promise. The crash soak and
the early-warning harness have tests of their own; the recovery, Ray and false-positive
benchmarks take minutes and are not run here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ._launchproc import clean_env

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.timeout(240)


def _run(tmp_path, *args: str) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=200,
                          cwd=tmp_path, env=clean_env(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_overhead_rounds_and_paired_modes_report_every_row(tmp_path):
    out = _run(tmp_path, str(BENCH / "overhead.py"), "--sizes", "1M", "--rounds", "1",
               "--steps", "3")  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("| 1M |"))
    assert len(row.split("|")) == 12, row  # every column, the rollback's latency included
    out = _run(tmp_path, str(BENCH / "overhead.py"), "--sizes", "1M", "--paired", "6")
    twins = [line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| 1M |")]
    assert twins == ["arc", "arc, ride_ddp=False", "naive", "floor", "overlap"], out


def test_checkpoint_benchmark_reports_its_ratios(tmp_path):
    out = _run(tmp_path, str(BENCH / "checkpoint.py"), "--sizes", "5M", "--rounds", "1",
               "--dir", str(tmp_path))  # fmt: skip
    row = next(line for line in out.splitlines() if line.split()[:1] == ["5M"])
    assert "%" in row and len(row.split()) == 14, row


def test_world_scale_benchmark_reports_every_world_size(tmp_path):
    out = _run(tmp_path, str(BENCH / "world_scale.py"), "--worlds", "2,64", "--steps", "5")
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["2", "64"], out  # the header, then one row per world size
