"""Metrics: per-step values for the user's logger, and the TensorBoard exporter read back with
TensorBoard's own event reader."""

from __future__ import annotations

import math

import pytest
import torch

from arc_dist import Arc, ArcConfig
from arc_dist.observe.events import EventLog
from arc_dist.observe.metrics import TensorBoardExporter

from ._workload import Data, make_model


@pytest.mark.timeout(120)
def test_every_step_exposes_health_signals_and_tensorboard_gets_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    tb_dir = str(tmp_path / "tb")
    exporter = TensorBoardExporter(arc, tb_dir)
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
    assert exporter.writer is None  # closed with the run
    assert any(status == "failure" and math.isnan(loss) for _, status, loss in seen)
    assert all(math.isfinite(loss) for _, status, loss in seen if status == "healthy")

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
    loss_steps = [e.step for e in acc.Scalars("arc/loss")]
    # the rollback from 25 to 20 redoes steps 20-24: step 25's point is written again
    assert loss_steps == [5, 10, 15, 20, 25, 25, 30, 35, 40]
    assert [(e.step, e.value) for e in acc.Scalars("arc/failures")] == [(25, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("arc/rollbacks")] == [(20, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("arc/steps_lost")] == [(20, 5.0)]
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
