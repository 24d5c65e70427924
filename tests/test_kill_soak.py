"""A short run of the crash-consistency soak (benchmarks/kill_soak.py): one trial per kill phase.

Each trial is a real 2-rank torchrun job under ``python -m arc_dist.launch``, SIGKILLed in a
step, while a checkpoint is written, at the commit (rank 0 right before or after its manifest)
and during the restart's resume; it must finish, and every restart must resume from the newest
checkpoint committed before it, with no damaged or lost committed checkpoint. The long run
(100+ trials) and its figures are in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_soak.py"


@pytest.mark.timeout(900)
def test_kill_soak_one_trial_per_phase(tmp_path):
    out = tmp_path / "soak.json"
    p = subprocess.run(
        [sys.executable, str(SOAK), "--trials", "4", "--seed", "3", "--json", str(out),
         "--root", str(tmp_path / "trials")],
        capture_output=True, text=True, timeout=880,
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(r["phase"] for r in results) == ["commit", "resume", "save", "step"]
    for r in results:
        assert r["anomalies"] == [] and r["rc"] == 0, r
        assert r["kills"], f"the {r['phase']} kill did not land: {r}"
        assert len(r["resumes"]) >= 2  # the first start and at least one restart were checked
