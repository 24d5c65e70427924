"""The main job (examples/demo.py) under real torchrun, shortened: it must keep recovering."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_recovers_from_each_injected_fault(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env.update(
        ARC_DEMO_STEPS="150",
        ARC_CHAOS="nan_loss@40/1 grad_explosion@80/1 lr_spike@110/1",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        TMPDIR=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         f"--log-dir={tmp_path / 'logs'}", str(REPO / "examples" / "demo.py")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    line = r"verdict (\w+)\s+(\w+)\s+ranks \[1\] -> (rolled back|update skipped)"
    verdicts = re.findall(line, text)
    # one-step anomalies skip their update; an LR the scheduler does not explain rolls back
    assert verdicts == [
        ("warning", "nonfinite_loss", "update skipped"),
        ("warning", "grad_explosion", "update skipped"),
        ("failure", "lr_spike", "rolled back"),
    ], text[-3000:]
    faulty = re.search(r"^faulty\s+([\d.]+)\s+1\s+2\s+150$", text, re.M)
    clean = re.search(r"^fault-free\s+([\d.]+)\s+0\s+0\s+150$", text, re.M)
    assert faulty and clean, text[-3000:]
    assert "recovered: final loss within 15% of the fault-free run" in text
