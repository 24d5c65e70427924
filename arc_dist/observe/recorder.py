"""What :class:`~arc_dist.Arc` records in the event log (:mod:`arc_dist.observe.events`), and when."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .events import EventLog, number


def _checkpoint_bytes(manager: Any, step: int) -> int | None:
    """Size of checkpoint ``step`` from one listing of the checkpoint root (rank 0, at resume)."""
    try:
        from ..checkpoint.catalog import scan

        return next(
            (i.nbytes for i in scan(manager.storage, read_manifests=False) if i.step == step), None
        )
    except Exception:  # noqa: BLE001 - a size is nice to have, never worth failing a resume
        return None


class Recorder:
    """What :class:`~arc_dist.Arc` records, and when. Every method is a no-op off rank 0.

    Keeps the small state the records need (step time, the checkpoint manager's counters last
    seen) so the controller makes one call per occurrence and no call does I/O on a healthy
    step beyond :meth:`EventLog.emit`'s buffered append.
    """

    def __init__(
        self,
        events: EventLog,
        *,
        metrics_every: int = 10,
        checkpoints: Any = None,
        context: Callable[[], dict] | None = None,
    ) -> None:
        """``checkpoints``: the run's ``CheckpointManager`` (its ``stats()`` counters are watched);
        ``context()``: extra values for each ``metrics`` record (called on those steps only)."""
        if not isinstance(metrics_every, int) or metrics_every < 0:
            raise ValueError(
                f"metrics_every={metrics_every!r} is invalid: use an integer >= 0 (0 = off)"
            )
        self.events = events
        self.on = events.enabled
        self.metrics_every = metrics_every
        self._checkpoints = checkpoints
        self._context = context
        self._ckpt_stats = checkpoints.stats if checkpoints is not None else None
        self._ckpt_seen: dict = self._ckpt_stats() if (self._ckpt_stats and self.on) else {}
        self._ckpt_step: int | None = None
        self._mark_time = time.monotonic()
        self._mark_step: int | None = None
        self.step_s = math.nan  # mean seconds per step over the last metrics period
        self._last_snapshot_event: int | None = None
        self._episode_start: float | None = None  # time of the first failure not yet recovered
        # since the last metrics record: sum and count of finite losses, of finite grad norms
        self._sums: list = [0.0, 0, 0.0, 0]
        self._loss_last = math.nan

    # -- steps ---------------------------------------------------------------------------
    def on_step(self, action) -> None:
        """After every step: a ``metrics`` record every ``metrics_every`` steps; checkpoint news."""
        if not self.on:
            return
        if self._ckpt_stats is not None:
            self.poll_checkpoints()
        if action.should_skip or not self.metrics_every:
            return
        # means over the period's applied updates (one sampled step is too noisy to plot), of
        # the values that were measured: a step judged from DDP's all-reduce alone carries the
        # loss of the step before it, or none (NaN)
        sums = self._sums
        if math.isfinite(action.loss):
            sums[0] += action.loss
            sums[1] += 1
            self._loss_last = action.loss
        if math.isfinite(action.grad_norm):
            sums[2] += action.grad_norm
            sums[3] += 1
        if action.step % self.metrics_every:
            return
        now = time.monotonic()
        if self._mark_step is not None and action.step > self._mark_step:
            self.step_s = (now - self._mark_time) / (action.step - self._mark_step)
        self._mark_time, self._mark_step = now, action.step
        loss, n_loss, grad, n_grad = sums
        self._sums = [0.0, 0, 0.0, 0]
        values = dict(
            loss=loss / n_loss if n_loss else math.nan,
            grad_norm=grad / n_grad if n_grad else math.nan,
            loss_last=self._loss_last,
            loss_steps=n_loss,
            step_s=self.step_s,
        )
        if self._context is not None:
            values.update(self._context())
        self.events.emit("metrics", action.step, values=values)

    def straggler(self, step: int, new: Iterable[int], cleared: Iterable[int], ratios: Any) -> None:
        """Ranks that became (``new``) or stopped being (``cleared``) stragglers."""
        if not self.on:
            return
        ratios = dict(ratios) if isinstance(ratios, dict) else ratios
        new, cleared = list(new), list(cleared)
        if new:
            self.events.emit(
                "straggler",
                step,
                ranks=new,
                reason="slow_rank",
                values={"ratios": ratios, "cleared": False},
            )
        if cleared:
            self.events.emit(
                "straggler",
                step,
                ranks=cleared,
                reason="slow_rank_cleared",
                values={"ratios": ratios, "cleared": True},
            )

    def verdict(self, step: int, verdict, decision: str) -> None:
        if not self.on or verdict.healthy:
            return
        if verdict.status == "failure" and self._episode_start is None:
            self._episode_start = time.monotonic()
        values = dict(
            loss=verdict.loss, grad_norm=verdict.grad_norm, decision=decision, **verdict.details
        )
        self.events.emit(
            verdict.status, step, ranks=verdict.bad_ranks, reason=verdict.reason, values=values
        )

    def rollback(
        self,
        failed_step: int,
        restored_step: int,
        reason: str | None,
        ranks,
        seconds: float,
        dropped: int,
        lr_scale: float,
    ) -> None:
        if not self.on:
            return
        lost = max(0, failed_step - restored_step)
        wasted = lost * self.step_s if math.isfinite(self.step_s) else 0.0
        self._mark_step, self._mark_time = restored_step, time.monotonic()
        self._sums = [0.0, 0, 0.0, 0]
        if dropped:
            self.events.emit(
                "escalation",
                restored_step,
                ranks=ranks,
                reason=reason,
                values={"failed_step": failed_step, "dropped_snapshots": dropped},
            )
        self.events.emit(
            "rollback",
            restored_step,
            ranks=ranks,
            reason=reason,
            values={
                "failed_step": failed_step,
                "restored_step": restored_step,
                "restore_s": seconds,
                "lr_scale": lr_scale,
                "escalated": bool(dropped),
            },
            steps_lost=lost,
            seconds=seconds + wasted,
        )

    def recovered(self, step: int) -> None:
        if not self.on:
            return
        seconds = time.monotonic() - self._episode_start if self._episode_start is not None else 0.0
        self._episode_start = None
        self.events.emit("recovered", step, seconds=seconds)

    def unrecoverable(self, step: int, verdict, message: str) -> None:
        if self.on:
            self.events.emit(
                "unrecoverable",
                step,
                ranks=verdict.bad_ranks,
                reason=verdict.reason,
                values={"message": message},
            )

    def snapshot(self, step: int, nbytes: int, seconds: float) -> None:
        if not self.on:
            return
        last = self._last_snapshot_event
        if (
            last is not None
            and self.metrics_every
            and step - last < self.metrics_every
            and step > last
        ):
            return  # sampled: the log stays small when snapshot_every is small
        self._last_snapshot_event = step
        self.events.emit("snapshot", step, values={"bytes": nbytes, "seconds": seconds})

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_start(self, step: int, blocking: bool) -> None:
        if self.on:
            self._ckpt_step = step
            self.events.emit("checkpoint_start", step, values={"blocking": blocking})

    def poll_checkpoints(self) -> None:
        """Turn changes of the checkpoint manager's counters into records (rank 0, no I/O)."""
        if not self.on or self._ckpt_stats is None:
            return
        now = self._ckpt_stats()
        seen, self._ckpt_seen = self._ckpt_seen, now

        def grew(key: str) -> int:
            return int(now.get(key, 0) or 0) - int(seen.get(key, 0) or 0)

        if grew("checkpoint_failures") > 0:
            self.events.emit(
                "checkpoint_failure",
                self._ckpt_step,
                values={
                    "attempts_failed": grew("checkpoint_failures"),
                    "abandoned": grew("checkpoints_abandoned") > 0,
                },
            )
        if grew("checkpoints") > 0:
            nbytes = int(now.get("checkpoint_bytes") or 0)
            secs = float(now.get("checkpoint_write_s") or 0.0)
            self.events.emit(
                "checkpoint_commit",
                now.get("last_committed_step"),
                values={
                    "bytes": nbytes,
                    "seconds": secs,
                    "stall_s": now.get("checkpoint_stall_s"),
                    "MB_per_s": nbytes / 1e6 / secs if secs > 0 else None,
                },
            )
        if grew("checkpoints_confirmed") > 0:
            self.events.emit("checkpoint_confirm", now.get("last_confirmed_step"))
        if grew("checkpoints_skipped") > 0:
            self.events.emit("checkpoint_skip", self._ckpt_step)
        if grew("checkpoints_rejected") > 0:
            self.events.emit(
                "checkpoint_reject", None, values={"count": grew("checkpoints_rejected")}
            )

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, **values: Any) -> None:
        if self.on:
            values.setdefault("host", socket.gethostname())
            values.setdefault("pid", os.getpid())
            self.events.emit("start", None, values=values, flush=True)

    def resumed(self, step: int | None, seconds: float, source: str = "durable") -> None:
        """After ``resume()``: a ``load`` record when a checkpoint was loaded (``source``:
        ``"durable"`` or ``"local"``, the node-local snapshot tier), and a ``restart`` record when
        this process continues an earlier one (restart count > 0 or an older log)."""
        if not self.on:
            return
        if step is not None:
            nbytes = _checkpoint_bytes(self._checkpoints, step) if source == "durable" else None
            self.events.emit(
                "load",
                step,
                values={
                    "source": source,
                    "seconds": seconds,
                    "bytes": nbytes,
                    "MB_per_s": nbytes / 1e6 / seconds if nbytes and seconds > 0 else None,
                },
            )
        prev = self.events.previous
        if self.events.restart > 0 or prev is not None:
            last_step = prev.get("step") if prev else None
            clean = prev is not None and prev.get("kind") == "close"  # a finished job continued
            lost = (
                max(0, int(last_step) - (step or 0))
                if isinstance(last_step, int) and not clean
                else 0
            )
            down = time.time() - number(prev.get("time")) if prev and not clean else 0.0
            self.events.emit(
                "restart",
                step if step is not None else 0,
                values={
                    "previous_step": last_step,
                    "previous_kind": prev.get("kind") if prev else None,
                    "resumed_step": step,
                    "clean": clean,
                },
                steps_lost=lost,
                seconds=down if math.isfinite(down) else 0.0,
            )
        self._mark_step, self._mark_time = step, time.monotonic()
        self._sums = [0.0, 0, 0.0, 0]

    def close(self, stats: dict) -> None:
        if self.on:
            self.poll_checkpoints()
            self.events.emit("close", stats.get("steps"), values=stats)
            self.events.close()
