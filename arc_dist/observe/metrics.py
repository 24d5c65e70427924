"""Metrics exporters: the event log's records as dashboard series (TensorBoard).

Owns :class:`TensorBoardExporter`, a subscriber of :class:`~arc_dist.observe.events.EventLog` that runs
on rank 0 only and turns records into ``SummaryWriter`` scalars and text:

* every ``metrics`` record (every ``Arc(metrics_every=N)`` steps): ``arc/loss``,
  ``arc/grad_norm``, ``arc/lr``, ``arc/lr_scale``, ``arc/step_s``;
* running counters at the step they change: ``arc/failures``, ``arc/warnings``,
  ``arc/rollbacks``, ``arc/steps_lost``, ``arc/restarts``, ``arc/checkpoints``;
* checkpoint throughput: ``arc/checkpoint_s``, ``arc/checkpoint_MB_per_s``, ``arc/load_s``;
* one line of text under ``arc/events`` per fault, rollback, restart and checkpoint failure.

Per-step values for the user's own logger need no exporter: ``Action.loss``,
``Action.grad_norm`` and ``arc.stats()`` carry them every step.

``torch.utils.tensorboard`` needs the ``tensorboard`` package (``pip install arc-dist[tensorboard]``);
any object with ``add_scalar``/``add_text``/``flush``/``close`` (e.g. ``tensorboardX``) may be
passed as ``writer`` instead.
"""

from __future__ import annotations

import math
from typing import Any

from .events import EventLog, number

_SCALARS = ("loss", "grad_norm", "lr", "lr_scale", "step_s")
_COUNTED = {
    "failure": "failures",
    "warning": "warnings",
    "rollback": "rollbacks",
    "restart": "restarts",
    "checkpoint_commit": "checkpoints",
    "checkpoint_failure": "checkpoint_failures",
}
_TEXT = {
    "failure",
    "rollback",
    "escalation",
    "restart",
    "unrecoverable",
    "straggler",
    "checkpoint_failure",
}


def _summary_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "arc_dist.observe.metrics.TensorBoardExporter needs the tensorboard package: "
            "pip install 'arc-dist[tensorboard]' (or pass writer=tensorboardX.SummaryWriter(...))"
        ) from e
    return SummaryWriter(log_dir)


class TensorBoardExporter:
    """Write an Arc run's records to TensorBoard (rank 0; a no-op object on other ranks).

    Args:
        source: an :class:`~arc_dist.Arc` (its ``events``) or an :class:`EventLog`.
        log_dir: TensorBoard directory; the writer is created on rank 0 only.
        writer: an existing ``SummaryWriter``-like object instead of ``log_dir``.
        prefix: tag prefix.

    ``close()`` (also called on the run's ``close`` record) flushes and closes a writer this
    exporter created; a writer passed in is flushed, not closed.
    """

    def __init__(
        self, source: Any, log_dir: str | None = None, *, writer: Any = None, prefix: str = "arc"
    ) -> None:
        events = source if isinstance(source, EventLog) else getattr(source, "events", None)
        if not isinstance(events, EventLog):
            raise TypeError(
                f"TensorBoardExporter(source=...) must be an arc_dist.Arc or EventLog, got {type(source).__name__}"
            )
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardExporter: pass exactly one of log_dir=... or writer=...")
        self.prefix = prefix
        self.enabled = events.enabled
        self._owns = writer is None
        self.writer = None
        self.counters = dict.fromkeys(_COUNTED.values(), 0)
        self.counters["steps_lost"] = 0
        self._step = 0
        if not self.enabled:  # not rank 0: nothing to write
            return
        self.writer = _summary_writer(log_dir) if writer is None else writer
        events.subscribe(self)

    def __call__(self, rec: dict) -> None:
        w = self.writer
        if w is None:
            return
        kind = rec.get("kind")
        step = rec.get("step")
        if isinstance(step, int):
            self._step = step
        step = self._step
        values = rec.get("values") or {}
        tag = self.prefix
        if kind == "metrics":
            for key in _SCALARS:
                v = number(values.get(key))
                if math.isfinite(v):
                    w.add_scalar(f"{tag}/{key}", v, step)
            return
        if kind in _COUNTED:
            name = _COUNTED[kind]
            self.counters[name] += 1
            w.add_scalar(f"{tag}/{name}", self.counters[name], step)
        cost = rec.get("cost") or {}
        if cost.get("steps_lost"):
            self.counters["steps_lost"] += int(cost["steps_lost"])
            w.add_scalar(f"{tag}/steps_lost", self.counters["steps_lost"], step)
        if kind == "checkpoint_commit":
            for key, name in (("seconds", "checkpoint_s"), ("MB_per_s", "checkpoint_MB_per_s")):
                v = number(values.get(key))
                if math.isfinite(v):
                    w.add_scalar(f"{tag}/{name}", v, step)
        if kind == "load" and math.isfinite(number(values.get("seconds"))):
            w.add_scalar(f"{tag}/load_s", number(values.get("seconds")), step)
        if kind in _TEXT:
            ranks = rec.get("ranks") or []
            w.add_text(
                f"{tag}/events",
                f"{kind} at step {step}: {rec.get('reason') or ''} ranks {ranks}",
                step,
            )
            w.flush()  # rare records: visible in the dashboard at once
        if kind == "close":
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self._owns:
            self.writer.close()
        self.writer = None
