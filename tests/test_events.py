"""The event log: storage (append file, part files, memory://, a real S3 server), the schema, and
what a faulty 2-rank run and its restart actually write.

The 2-rank group is spawned once for the module (real gloo ranks, DDP, chaos faults on rank 1,
file checkpoints); it trains with three faults, closes, then constructs a second ``Arc`` on the
same directory with ``TORCHELASTIC_RESTART_COUNT=1`` (a restarted job) and trains on. The tests
compare the log with what the ranks saw, and run ``arc-dist report`` on it.
"""

from __future__ import annotations

import json
import math
import os
import uuid

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.observe.events import (
    FILE_NAME,
    KINDS,
    PARTS_DIR,
    SCHEMA_VERSION,
    EventLog,
    read_events,
)

from ._dist import run_ranks
from ._workload import Data, make_model, train

KEYS = {"v", "time", "kind", "step", "restart", "run", "rank", "ranks", "reason", "values", "cost"}


def _check_schema(records: list[dict]) -> None:
    for r in records:
        assert set(r) == KEYS, r
        assert r["v"] == SCHEMA_VERSION and r["kind"] in KINDS and r["rank"] == 0
        assert r["step"] is None or isinstance(r["step"], int)
        assert isinstance(r["ranks"], list) and isinstance(r["values"], dict)
        assert r["cost"] is None or set(r["cost"]) == {"steps_lost", "seconds"}


# -- storage ---------------------------------------------------------------------------------
def test_append_mode_survives_a_restart_and_reads_in_order(tmp_path):
    log = EventLog(str(tmp_path), restart=0, run_id="job-1", flush_records=1000, flush_seconds=1e9)
    assert log.mode == "append" and log.previous is None
    log.emit("metrics", 10, values={"loss": 1.5, "grad_norm": float("nan")})
    assert not (tmp_path / FILE_NAME).exists(), "a metrics record must wait for the batch"
    log.emit("failure", 12, ranks=[1], reason="nonfinite_loss", values={"loss": float("inf")})
    lines = (tmp_path / FILE_NAME).read_text().splitlines()
    assert len(lines) == 2, "a failure flushes at once, with the batch before it"
    log.emit("metrics", 20, values={"loss": 1.2})
    log.close()

    again = EventLog(str(tmp_path), restart=1, run_id="job-1")
    assert again.previous["kind"] == "metrics" and again.previous["step"] == 20
    again.emit("restart", 10, steps_lost=10, seconds=3.5)
    again.close()
    recs = read_events(str(tmp_path))
    _check_schema(recs)
    assert [(r["kind"], r["step"], r["restart"]) for r in recs] == [
        ("metrics", 10, 0),
        ("failure", 12, 0),
        ("metrics", 20, 0),
        ("restart", 10, 1),
    ]
    assert recs[0]["values"]["grad_norm"] == "nan"  # JSON has no NaN: strict parsers read the log
    assert recs[1]["values"]["loss"] == "inf" and recs[1]["ranks"] == [1]
    assert recs[3]["cost"] == {"steps_lost": 10, "seconds": 3.5}
    for line in (tmp_path / FILE_NAME).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_part_files_roll_over_and_a_cut_line_is_skipped(tmp_path):
    log = EventLog(str(tmp_path), mode="parts", flush_records=1, part_bytes=600)
    for step in range(12):
        log.emit("metrics", step, values={"loss": 1.0 / (step + 1)})
    log.close()
    parts = sorted((tmp_path / PARTS_DIR).iterdir())
    assert len(parts) > 2 and not (tmp_path / FILE_NAME).exists()
    with open(parts[-1], "a") as f:
        f.write('{"v":1,"time":')  # a crash in the middle of a write
    later = EventLog(str(tmp_path), mode="parts", restart=1)
    assert later.previous["step"] == 11
    later.emit("start")
    later.close()
    recs = read_events(str(tmp_path))
    assert [r["step"] for r in recs] == [*range(12), None]


def test_memory_url_and_disabled_log(tmp_path):
    url = f"memory://events-{uuid.uuid4().hex}"
    log = EventLog(url)
    assert log.mode == "append"
    log.emit("start", flush=True)
    log.close()
    assert [r["kind"] for r in read_events(url)] == ["start"]

    off = EventLog(str(tmp_path), enabled=False)
    assert off.emit("failure", 3) is None
    off.close()
    assert list(tmp_path.iterdir()) == []


def test_environment_supplies_restart_and_run_id_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv-42")
    rec = EventLog(None).emit("start")
    assert (rec["restart"], rec["run"]) == (3, "rdzv-42")
    rec = EventLog(None, restart=0, run_id="mine").emit("start")  # explicit arguments win
    assert (rec["restart"], rec["run"]) == (0, "mine")


def test_unwritable_log_dir_does_not_stop_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = EventLog(str(blocker / "run"))
    assert log.emit("failure", 1) is not None  # still reaches logging and subscribers
    log.close()


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import MotoServer

    server = MotoServer(
        os.path.join(os.environ.get("TMPDIR", "/tmp"), f"moto-{uuid.uuid4().hex}.log")
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.timeout(120)
def test_object_store_gets_part_files(s3):
    import s3fs

    opts = s3.storage_options()
    bucket = f"ev-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    url = f"s3://{bucket}/run-1"
    log = EventLog(url, storage_options=opts, restart=0)
    assert log.mode == "parts"
    log.emit("start")
    log.emit("failure", 5, ranks=[1], reason="nonfinite_loss")
    log.close()
    again = EventLog(url, storage_options=opts, restart=1)
    assert again.previous["kind"] == "failure"
    again.emit("restart", 0, steps_lost=5, seconds=1.0)
    again.close()
    recs = read_events(url, opts)
    _check_schema(recs)
    assert [(r["kind"], r["restart"]) for r in recs] == [
        ("start", 0),
        ("failure", 0),
        ("restart", 1),
    ]
    fs = s3fs.S3FileSystem(**opts)
    assert len(fs.ls(f"{bucket}/run-1/{PARTS_DIR}")) == 2  # one part per process


# -- a crash and restart in one process ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_restart_after_a_crash_records_steps_and_time_lost(tmp_path, monkeypatch):
    d = str(tmp_path)
    config = ArcConfig(
        snapshot_every=10, checkpoint_every=10, confirm_after=2, async_checkpoint=False
    )
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    arc = Arc(model, opt, checkpoint_dir=d, config=config, metrics_every=5)
    assert arc.resume() == 0
    train(model, opt, arc, Data("mlp", 0), 37)
    # what reached storage before the process died (no close()): the event log, and step_30's
    # confirmation, which the manager writes in the background
    arc.events.flush()
    arc._durability.manager.wait()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    model2 = make_model("mlp", seed=1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=3e-3)
    arc2 = Arc(model2, opt2, checkpoint_dir=d, config=config, metrics_every=5)
    assert arc2.resume() == 30
    arc2.close()
    recs = read_events(d)
    _check_schema(recs)
    assert [r["kind"] for r in recs].count("start") == 2
    load = next(r for r in recs if r["kind"] == "load")
    assert load["step"] == 30 and load["values"]["bytes"] > 0 and load["values"]["seconds"] > 0
    restart = next(r for r in recs if r["kind"] == "restart")
    assert restart["restart"] == 1 and restart["step"] == 30
    assert restart["values"]["previous_step"] == 35  # the last metrics record that was written
    assert restart["cost"]["steps_lost"] == 5 and restart["cost"]["seconds"] > 0
    arc._durability.manager.close()


# -- a faulty 2-rank run and its restart ---------------------------------------------------------
CHAOS = "nan_loss@25/1 lr_spike@45/1 grad_explosion@70/1"
#: (step judged, reason, restored step)
EXPECTED = [(25, "nonfinite_loss", 20), (45, "lr_spike", 40), (70, "grad_explosion", 60)]
STEPS, MORE_STEPS = 90, 100


def _make(rank, run_dir):
    model = DDP(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # max_skips=0: every fault rolls back at once (a one-step NaN would otherwise be a skip), so
    # the log holds a failure, a rollback and a recovery for each
    config = ArcConfig(
        snapshot_every=10,
        deep_check_every=10,
        max_rollbacks=2,
        recovery_steps=10,
        checkpoint_every=20,
        confirm_after=5,
        max_skips=0,
    )
    return model, opt, config


def _faulty_then_restarted(rank, world, run_dir):
    model, opt, config = _make(rank, run_dir)
    arc = Arc(model, opt, checkpoint_dir=run_dir, config=config, chaos=CHAOS)
    arc.resume()
    data = Data("mlp", rank)
    actions = train(model, opt, arc, data, STEPS, max_calls=400)
    arc.close()
    first = dict(actions=actions, stats=arc.stats(), fired=list(arc.chaos.fired))

    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"  # what torchrun sets in a restarted worker
    model, opt, config = _make(rank, run_dir)
    arc = Arc(model, opt, checkpoint_dir=run_dir, config=config, chaos="")
    resumed = arc.resume()
    more = train(model, opt, arc, data, MORE_STEPS, max_calls=100)
    arc.close()
    return dict(first=first, resumed=resumed, more=more, stats2=arc.stats())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("faulty-run"))
    results = run_ranks(_faulty_then_restarted, 2, run_dir, timeout=240)
    return run_dir, results


@pytest.mark.timeout(300)
def test_log_records_match_what_happened(run):
    run_dir, results = run
    assert not os.path.exists(os.path.join(run_dir, PARTS_DIR))
    recs = read_events(run_dir)
    _check_schema(recs)
    first = results[0]["first"]
    assert results[1]["first"]["fired"] == [
        (k, s, 1) for k, s in [("nan_loss", 25), ("lr_spike", 45), ("grad_explosion", 70)]
    ]
    assert results[0]["first"]["fired"] == []

    failures = [r for r in recs if r["kind"] == "failure"]
    assert [(r["step"], r["reason"], r["ranks"]) for r in failures] == [
        (s, why, [1]) for s, why, _ in EXPECTED
    ]
    assert all(r["values"]["decision"] == "rollback" for r in failures)
    assert math.isnan(float(failures[0]["values"]["loss"]))
    # the same faults the training loop saw on every rank
    seen = [(a[2], a[3]) for a in first["actions"] if a[1] == "failure"]
    assert seen == [(why, (1,)) for _, why, _ in EXPECTED]

    rollbacks = [r for r in recs if r["kind"] == "rollback"]
    assert [
        (r["values"]["failed_step"], r["step"], r["cost"]["steps_lost"]) for r in rollbacks
    ] == [(s, back, s - back) for s, _, back in EXPECTED]
    assert all(r["cost"]["seconds"] > 0 and r["ranks"] == [1] for r in rollbacks)
    recovered = [r for r in recs if r["kind"] == "recovered" and r["restart"] == 0]
    assert [r["step"] for r in recovered] == [s + 10 for s, _, _ in EXPECTED]  # recovery_steps=10
    assert all(r["cost"]["seconds"] > 0 for r in recovered)
    assert first["stats"]["rollbacks"] == len(rollbacks) == 3

    # every rank's record is on rank 0's log only once: one writer
    assert [r["kind"] for r in recs].count("start") == 2
    assert {r["rank"] for r in recs} == {0}

    # metrics every 10 steps, with finite loss and grad norm
    metrics = [r for r in recs if r["kind"] == "metrics" and r["restart"] == 0]
    assert {r["step"] for r in metrics} == set(range(10, STEPS + 1, 10))
    assert all(math.isfinite(r["values"]["loss"]) and r["values"]["grad_norm"] > 0 for r in metrics)

    # checkpoints: what the manager counted, and each commit says how big and how fast
    commits = [r for r in recs if r["kind"] == "checkpoint_commit" and r["restart"] == 0]
    assert len(commits) == first["stats"]["checkpoints"] > 0
    assert all(r["values"]["bytes"] > 0 and r["values"]["MB_per_s"] > 0 for r in commits)
    skips = [r for r in recs if r["kind"] == "checkpoint_skip" and r["restart"] == 0]
    assert len(skips) == first["stats"]["checkpoints_skipped"]
    assert any(r["kind"] == "checkpoint_confirm" for r in recs)


@pytest.mark.timeout(300)
def test_restarted_job_appends_to_the_same_log(run):
    run_dir, results = run
    recs = read_events(run_dir)
    kinds = [r["kind"] for r in recs]
    close_at = kinds.index("close")
    assert all(r["restart"] == 0 for r in recs[: close_at + 1])
    later = recs[close_at + 1 :]
    assert later and all(r["restart"] == 1 for r in later)
    assert [r["kind"] for r in later][:3] == ["start", "load", "restart"]
    restart = later[2]
    resumed = results[0]["resumed"]
    assert restart["step"] == resumed and restart["values"]["resumed_step"] == resumed
    assert restart["values"]["clean"] is True and restart["cost"]["steps_lost"] == 0
    assert later[1]["step"] == resumed and later[1]["values"]["bytes"] > 0
    assert kinds[-1] == "close" and recs[-1]["step"] == MORE_STEPS
    assert [r["step"] for r in later if r["kind"] == "metrics"] == list(
        range((resumed // 10 + 1) * 10, MORE_STEPS + 1, 10)
    )


@pytest.mark.timeout(300)
def test_report_on_the_faulty_run(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    from arc_dist.cli import main
    from arc_dist.observe.report import _NOTABLE, DPI, FIG_INCHES

    run_dir, results = run
    recs = read_events(run_dir)
    out = tmp_path / "report"
    assert main(["report", run_dir, "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["failures"] == 3 and s["rollbacks"] == 3 and s["escalations"] == 0
    assert s["faults_by_reason"] == {why: {"1": 1} for _, why, _ in EXPECTED}
    assert s["failures_by_rank"] == {"1": 3}
    assert s["restarts"] == 1 and s["processes"] == 2 and s["unrecoverable"] == 0
    assert s["recovered"] == sum(r["kind"] == "recovered" for r in recs)
    assert s["steps_lost_rollbacks"] == sum(s_ - back for s_, _, back in EXPECTED)
    assert s["steps_lost_restarts"] == 0  # the first process closed cleanly
    assert s["seconds_lost"] > 0
    assert s["mtbf_s"] == pytest.approx(s["wall_s"] / 3)
    first, second = results[0]["first"]["stats"], results[0]["stats2"]
    c = s["checkpoints"]
    assert c["committed"] == first["checkpoints"] + second["checkpoints"]
    assert c["skipped"] == first["checkpoints_skipped"] + second["checkpoints_skipped"]
    assert c["newest_on_storage"] >= results[0]["resumed"] and sum(c["on_storage"].values()) >= 1
    assert s["final_step"] == MORE_STEPS

    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(png))
    assert img.shape[:2] == (round(FIG_INCHES[1] * DPI), round(FIG_INCHES[0] * DPI))
    assert img[..., :3].std() > 0.05  # not a blank canvas
    page = (out / "report.html").read_text()
    import base64

    assert base64.b64encode(png.read_bytes()).decode() in page
    notable = [r for r in recs if r["kind"] in _NOTABLE]
    assert {"failure", "rollback", "recovered", "restart", "load"} <= {r["kind"] for r in notable}
    assert page.count("<tr>") == 1 + len(notable)

    assert main(["report", run_dir, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Faults by kind and rank" in table
    for _, why, _ in EXPECTED:
        assert f"\n{why} " in table
    assert "rollbacks / escalations" in table and " 3 / 0" in table
