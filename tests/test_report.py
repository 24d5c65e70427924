"""``arc-dist report``: the summary from known records, the figure and page from a real
single-process run with faults, and the errors a user sees (no log, no matplotlib).

The 2-rank faulty run and its report are tested in test_events.py (one spawned group per module).
"""

from __future__ import annotations

import base64
import sys

import pytest
import torch

from arc_dist import Arc, ArcConfig
from arc_dist.observe.events import EventLog, read_events
from arc_dist.observe.report import DPI, FIG_INCHES, format_summary, plot, report, summarize

from ._workload import Data, make_model, train


def _records(tmp_path) -> list[dict]:
    """A known history: two processes, faults on ranks 1 and 0+2, a crash restart."""
    log = EventLog(str(tmp_path), restart=0, run_id="job")
    log.emit("start")
    for step in (10, 20):
        log.emit("metrics", step, values={"loss": 2.0 - step / 20, "grad_norm": 1.0})
    log.emit("failure", 23, ranks=[1], reason="nonfinite_loss")
    log.emit(
        "rollback",
        20,
        ranks=[1],
        reason="nonfinite_loss",
        values={"failed_step": 23},
        steps_lost=3,
        seconds=0.5,
    )
    log.emit("warning", 27, ranks=[2], reason="loss_spike")
    log.emit("failure", 31, ranks=[0, 2], reason="grad_explosion")
    log.emit(
        "rollback",
        30,
        ranks=[0, 2],
        reason="grad_explosion",
        values={"failed_step": 31},
        steps_lost=1,
        seconds=0.25,
    )
    log.emit("recovered", 41, seconds=2.0)
    log.emit("checkpoint_start", 40)
    log.emit("checkpoint_commit", 40, values={"bytes": 4_000_000, "seconds": 2.0, "MB_per_s": 2.0})
    log.emit("checkpoint_failure", 40, values={"abandoned": False})
    log.emit("metrics", 50, values={"loss": 0.9, "grad_norm": float("nan")})
    log.close()
    log = EventLog(str(tmp_path), restart=1, run_id="job")
    log.emit("start")
    log.emit("load", 40, values={"seconds": 1.0, "bytes": 4_000_000})
    log.emit(
        "restart", 40, values={"previous_step": 50, "clean": False}, steps_lost=10, seconds=30.0
    )
    log.emit("metrics", 60, values={"loss": 0.8, "grad_norm": 0.5})
    log.emit("close", 60)
    log.close()
    return read_events(str(tmp_path))


def test_summary_counts_and_costs(tmp_path):
    recs = _records(tmp_path)
    s = summarize(recs)
    assert (
        s["failures"] == 2 and s["warnings"] == 1 and s["warnings_by_reason"] == {"loss_spike": 1}
    )
    assert s["faults_by_reason"] == {"grad_explosion": {"0": 1, "2": 1}, "nonfinite_loss": {"1": 1}}
    assert s["failures_by_rank"] == {"0": 1, "1": 1, "2": 1}
    assert (s["rollbacks"], s["recovered"], s["restarts"], s["processes"]) == (2, 1, 1, 2)
    assert (s["steps_lost_rollbacks"], s["steps_lost_restarts"], s["steps_lost"]) == (4, 10, 14)
    assert s["seconds_lost"] == pytest.approx(30.75)
    # two failure verdicts and one crash restart
    assert s["mtbf_s"] == pytest.approx(s["wall_s"] / 3)
    c = s["checkpoints"]
    assert (c["started"], c["committed"], c["failed_attempts"], c["mean_MB_per_s"]) == (
        1,
        1,
        1,
        2.0,
    )
    assert s["runs"] == ["job"] and s["final_step"] == 60

    text = format_summary(s)
    assert "Faults by kind and rank" in text
    lines = text.splitlines()
    header = next(x for x in lines if x.startswith("fault "))
    assert header.split() == ["fault", "rank", "0", "rank", "1", "rank", "2", "total"]
    assert next(x for x in lines if x.startswith("grad_explosion")).split() == [
        "grad_explosion",
        "1",
        "0",
        "1",
        "2",
    ]
    assert "steps lost (rollbacks + restarts)      14 (4 + 10)" in text


def test_a_clean_run_has_no_mtbf(tmp_path):
    log = EventLog(str(tmp_path))
    log.emit("start")
    log.emit("metrics", 10, values={"loss": 1.0, "grad_norm": 1.0})
    log.emit("close", 10)
    log.close()
    s = summarize(read_events(str(tmp_path)))
    assert s["failures"] == 0 and s["mtbf_s"] is None
    assert "no failures" in format_summary(s)


@pytest.mark.timeout(120)
def test_report_of_a_real_run_draws_and_embeds_the_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    run = str(tmp_path / "run")
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # max_skips=0: the NaN rolls back at once; the LR spike is evidence against a scheduler
    config = ArcConfig(
        snapshot_every=10, checkpoint_every=20, confirm_after=3, async_checkpoint=False, max_skips=0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    chaos = "nan_loss@35 lr_spike@50"
    with Arc(model, opt, sched, checkpoint_dir=run, config=config, chaos=chaos) as arc:
        arc.resume()
        train(model, opt, arc, Data("mlp", 0), 60, sched=sched)
        stats = arc.stats()
    out = tmp_path / "out"
    s = report(run, str(out))
    assert s["failures"] == stats["failures"] == 2 and s["rollbacks"] == stats["rollbacks"] == 2
    assert s["faults_by_reason"] == {"lr_spike": {"0": 1}, "nonfinite_loss": {"0": 1}}
    assert s["checkpoints"]["committed"] == stats["checkpoints"]
    on_storage = s["checkpoints"]["on_storage"]
    assert (
        set(on_storage) <= {"confirmed", "committed", "partial"}
        and on_storage.get("confirmed", 0) >= 1
    )
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(out / "report.png"))
    assert img.shape[:2] == (round(FIG_INCHES[1] * DPI), round(FIG_INCHES[0] * DPI))
    page = (out / "report.html").read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "nonfinite_loss" in page and "&lt;" not in page.split("<h2>Summary</h2>")[0]

    from arc_dist.observe.report import main

    assert main([run, "--out", str(out)]) == 0
    assert "Faults by kind and rank" in capsys.readouterr().out


def test_missing_log_is_a_clear_error(tmp_path, capsys):
    from arc_dist.observe.report import main

    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no event log" in err and "events.jsonl" in err
    with pytest.raises(ValueError, match="no event log"):
        report(str(tmp_path))


def test_missing_matplotlib_names_the_report_extra(tmp_path, monkeypatch):
    recs = _records(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it sees
    with pytest.raises(ImportError, match=r"arc-dist\[report\]"):
        plot(recs, str(tmp_path / "x.png"))
    assert summarize(recs)["failures"] == 2  # the summary needs no matplotlib


def test_json_summary_needs_no_matplotlib_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import json

    from arc_dist.observe.report import main

    _records(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it sees
    assert main([str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failures"] == 2 and "png" not in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no pictures in the cwd
    # asking for pictures too still needs matplotlib, and says so
    assert main([str(tmp_path / "run"), "--json", "--out", str(tmp_path / "out")]) == 2
    assert "arc-dist[report]" in capsys.readouterr().err
