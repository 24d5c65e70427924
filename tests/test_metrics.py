"""Metrics: per-step values for the user's logger, and the TensorBoard and W&B exporters read
back with TensorBoard's own event reader and from W&B's offline run file."""

from __future__ import annotations

import math

import pytest
import torch

from arc_dist import Arc, ArcConfig
from arc_dist.observe.events import EventLog
from arc_dist.observe.metrics import TensorBoardExporter, WandbExporter

from ._workload import Data, make_model


def _train_with_a_fault(tmp_path, exporter_for):
    """40 steps with a NaN loss at step 25 (rolled back to 20); ``exporter_for(arc)`` attached."""
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # max_skips=0: the NaN rolls back at once instead of skipping its update
    arc = Arc(
        model,
        opt,
        config=ArcConfig(snapshot_every=10, max_skips=0),
        chaos="nan_loss@25",
        log_dir=str(tmp_path / "run"),
        metrics_every=5,
    )
    exporter = exporter_for(arc)
    data = Data("mlp", 0)
    seen = []
    while arc.global_step < 40:
        loss = data.loss(model, data.next())
        loss.backward()
        action = arc.step(loss)
        stats = arc.stats()
        # the user's own logger gets the agreed signals every step, from the action and stats()
        for key in ("loss", "grad_norm"):
            assert stats[key] == getattr(action, key) or math.isnan(stats[key]) == math.isnan(
                getattr(action, key)
            )
        seen.append((action.step, action.status, action.loss))
        if not action.should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
    arc.close()
    assert any(status == "failure" and math.isnan(loss) for _, status, loss in seen)
    assert all(math.isfinite(loss) for _, status, loss in seen if status == "healthy")
    return exporter, opt


#: the series of that run: the rollback from 25 to 20 redoes steps 20-24, so 25 comes twice
LOSS_STEPS = [5, 10, 15, 20, 25, 25, 30, 35, 40]
COUNTERS = {"failures": [(25, 1.0)], "rollbacks": [(20, 1.0)], "steps_lost": [(20, 5.0)]}


@pytest.mark.timeout(120)
def test_every_step_exposes_health_signals_and_tensorboard_gets_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = str(tmp_path / "tb")
    exporter, opt = _train_with_a_fault(tmp_path, lambda arc: TensorBoardExporter(arc, tb_dir))
    assert exporter.writer is None  # closed with the run
    acc = EventAccumulator(tb_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "arc/loss",
        "arc/grad_norm",
        "arc/lr",
        "arc/failures",
        "arc/rollbacks",
        "arc/steps_lost",
    } <= tags
    assert [e.step for e in acc.Scalars("arc/loss")] == LOSS_STEPS
    for name, points in COUNTERS.items():
        assert [(e.step, e.value) for e in acc.Scalars(f"arc/{name}")] == points
    assert acc.Scalars("arc/lr")[-1].value == pytest.approx(opt.param_groups[0]["lr"])
    assert "arc/events/text_summary" in acc.Tags()["tensors"]


def test_exporter_is_inert_off_rank_zero_and_checks_its_arguments(tmp_path):
    off = EventLog(None, enabled=False)
    exporter = TensorBoardExporter(off, str(tmp_path / "tb"))
    assert exporter.writer is None and not (tmp_path / "tb").exists()
    with pytest.raises(TypeError, match="Arc or EventLog"):
        TensorBoardExporter(object(), str(tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        TensorBoardExporter(off)


def _wandb_records(path: str):
    """The records of a W&B offline run file (``run-<id>.wandb``: a LevelDB-style log of
    ``wandb_internal_pb2.Record`` protobufs in 32 KiB blocks after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of the file
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


@pytest.mark.timeout(180)
def test_wandb_exporter_logs_the_run_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb_dir = tmp_path / "wandb"
    wb_dir.mkdir()
    exporter, opt = _train_with_a_fault(
        tmp_path, lambda arc: WandbExporter(arc, project="arc-test", dir=str(wb_dir))
    )
    assert exporter.run is None  # finished with the run
    (run_file,) = wb_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for rec in _wandb_records(str(run_file)):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    assert [r["arc/step"] for r in rows if "arc/loss" in r] == LOSS_STEPS
    for name, points in COUNTERS.items():
        assert [(r["arc/step"], r[f"arc/{name}"]) for r in rows if f"arc/{name}" in r] == points
    assert [r["arc/lr"] for r in rows if "arc/lr" in r][-1] == pytest.approx(
        opt.param_groups[0]["lr"]
    )
    events = [r["arc/events"] for r in rows if "arc/events" in r]
    assert any(e.startswith("failure at step 25") for e in events), events
    # W&B keeps its own increasing step: the points logged after the rollback are all kept
    assert [r["_step"] for r in rows] == sorted(r["_step"] for r in rows)


def test_wandb_exporter_off_rank_zero_and_its_arguments(monkeypatch):
    off = EventLog(None, enabled=False)
    assert WandbExporter(off).run is None  # no wandb.init, no import, on other ranks
    with pytest.raises(TypeError, match="Arc or EventLog"):
        WandbExporter(object())
    with pytest.raises(ValueError, match="not both"):
        WandbExporter(off, run=object(), project="x")
    on = EventLog(None, enabled=True)
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as when it is not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbExporter(on)
