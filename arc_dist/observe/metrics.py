"""Metrics exporters: the event log's records as dashboard series (TensorBoard, W&B).

Owns :class:`TensorBoardExporter` and :class:`WandbExporter`, subscribers of
:class:`~arc_dist.observe.events.EventLog` that run on rank 0 only and turn records into scalars
and text (``SummaryWriter`` scalars, ``wandb`` run history):

* every ``metrics`` record (every ``Arc(metrics_every=N)`` steps): ``arc/loss``,
  ``arc/grad_norm``, ``arc/lr``, ``arc/lr_scale``, ``arc/step_s``;
* running counters at the step they change: ``arc/failures``, ``arc/warnings``, ``arc/forecasts``,
  ``arc/rollbacks``, ``arc/steps_lost``, ``arc/restarts``, ``arc/checkpoints``;
* checkpoint throughput: ``arc/checkpoint_s``, ``arc/checkpoint_MB_per_s``, ``arc/load_s``;
* one line of text under ``arc/events`` per fault, rollback, restart and checkpoint failure.

Per-step values for the user's own logger need no exporter: ``Action.loss``,
``Action.grad_norm`` and ``arc.stats()`` carry them every step.

``torch.utils.tensorboard`` needs the ``tensorboard`` package (``pip install arc-dist[tensorboard]``);
any object with ``add_scalar``/``add_text``/``flush``/``close`` (e.g. ``tensorboardX``) may be
passed as ``writer`` instead. ``WandbExporter`` needs ``pip install wandb`` (imported on rank 0
when it creates the run).
"""

from __future__ import annotations

import math
from typing import Any

from .events import EventLog, number

_SCALARS = ("loss", "grad_norm", "lr", "lr_scale", "step_s")
_COUNTED = {
    "failure": "failures",
    "warning": "warnings",
    "forecast": "forecasts",
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


class _Exporter:
    """The record -> series mapping shared by the exporters; subclasses write one record's
    ``scalars`` (``{tag: value}``) and optional ``text`` line at ``step`` (``_write``)."""

    def __init__(self, source: Any, prefix: str) -> None:
        events = source if isinstance(source, EventLog) else getattr(source, "events", None)
        if not isinstance(events, EventLog):
            raise TypeError(
                f"{type(self).__name__}(source=...) must be an arc_dist.Arc or EventLog, "
                f"got {type(source).__name__}"
            )
        self.prefix = prefix
        self.enabled = events.enabled
        self.counters = dict.fromkeys(_COUNTED.values(), 0)
        self.counters["steps_lost"] = 0
        self._step = 0
        self._events = events

    def _subscribe(self) -> None:
        self._events.subscribe(self)

    def __call__(self, rec: dict) -> None:
        if not self._open():
            return
        kind = rec.get("kind")
        step = rec.get("step")
        if isinstance(step, int):
            self._step = step
        step = self._step
        values = rec.get("values") or {}
        tag = self.prefix
        scalars: dict[str, float] = {}
        if kind == "metrics":
            for key in _SCALARS:
                v = number(values.get(key))
                if math.isfinite(v):
                    scalars[f"{tag}/{key}"] = v
            if scalars:
                self._write(step, scalars, None)
            return
        if kind in _COUNTED:
            name = _COUNTED[kind]
            self.counters[name] += 1
            scalars[f"{tag}/{name}"] = self.counters[name]
        cost = rec.get("cost") or {}
        if cost.get("steps_lost"):
            self.counters["steps_lost"] += int(cost["steps_lost"])
            scalars[f"{tag}/steps_lost"] = self.counters["steps_lost"]
        if kind == "checkpoint_commit":
            for key, name in (("seconds", "checkpoint_s"), ("MB_per_s", "checkpoint_MB_per_s")):
                v = number(values.get(key))
                if math.isfinite(v):
                    scalars[f"{tag}/{name}"] = v
        if kind == "load" and math.isfinite(number(values.get("seconds"))):
            scalars[f"{tag}/load_s"] = number(values.get("seconds"))
        text = None
        if kind in _TEXT:
            ranks = rec.get("ranks") or []
            text = f"{kind} at step {step}: {rec.get('reason') or ''} ranks {ranks}"
        if scalars or text:
            self._write(step, scalars, text)
        if kind == "close":
            self.close()

    def _open(self) -> bool:
        raise NotImplementedError

    def _write(self, step: int, scalars: dict[str, float], text: str | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardExporter(_Exporter):
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
        super().__init__(source, prefix)
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardExporter: pass exactly one of log_dir=... or writer=...")
        self._owns = writer is None
        self.writer = None
        if not self.enabled:  # not rank 0: nothing to write
            return
        self.writer = _summary_writer(log_dir) if writer is None else writer
        self._subscribe()

    def _open(self) -> bool:
        return self.writer is not None

    def _write(self, step: int, scalars: dict[str, float], text: str | None) -> None:
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, step)
        if text is not None:
            self.writer.add_text(f"{self.prefix}/events", text, step)
            self.writer.flush()  # rare records: visible in the dashboard at once

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self._owns:
            self.writer.close()
        self.writer = None


class WandbExporter(_Exporter):
    """Log an Arc run's records to Weights & Biases (rank 0; a no-op object on other ranks).

    The same series as :class:`TensorBoardExporter`, through ``run.log``. A rollback moves
    ``arc.global_step`` back, and W&B drops points logged at a step it has passed, so every
    series is plotted against ``<prefix>/step`` (``define_metric``) and W&B keeps its own
    increasing step. Event lines go to ``<prefix>/events`` as text.

    Args:
        source: an :class:`~arc_dist.Arc` (its ``events``) or an :class:`EventLog`.
        run: an existing ``wandb`` run (``wandb.init(...)``'s result); None: ``wandb.init(**init)``
            on rank 0, finished by ``close()``. A run passed in is not finished.
        prefix: key prefix.
        init: keyword arguments of ``wandb.init`` when ``run`` is None (``project=``, ``dir=``).
    """

    def __init__(self, source: Any, run: Any = None, *, prefix: str = "arc", **init: Any) -> None:
        super().__init__(source, prefix)
        if run is not None and init:
            raise ValueError(
                f"WandbExporter: pass run=... or wandb.init keywords ({sorted(init)}), not both"
            )
        self._owns = run is None
        self.run = None
        if not self.enabled:
            return
        if run is None:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    "arc_dist.observe.metrics.WandbExporter needs the wandb package: "
                    "pip install wandb"
                ) from e
            run = wandb.init(**init)
        self.run = run
        run.define_metric(f"{prefix}/step")
        run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
        self._subscribe()

    def _open(self) -> bool:
        return self.run is not None

    def _write(self, step: int, scalars: dict[str, float], text: str | None) -> None:
        row: dict[str, Any] = {f"{self.prefix}/step": step, **scalars}
        if text is not None:
            row[f"{self.prefix}/events"] = text
        self.run.log(row)

    def close(self) -> None:
        if self.run is None:
            return
        if self._owns:
            self.run.finish()
        self.run = None
