"""What :class:`~arc_dist.Arc` records in the event log (:mod:`arc_dist.observe.events`), and when."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .events import EventLog, number

log = logging.getLogger("arc_dist")


class Recorder:
    """What :class:`~arc_dist.Arc` records, and when. Every method is a no-op off rank 0.

    Keeps the small state the records need (step time, checkpoint outcomes reported from writer
    threads) so the controller makes one call per occurrence and no call does I/O on a healthy
    step beyond :meth:`EventLog.emit`'s buffered append.
    """

    def __init__(
        self,
        events: EventLog,
        *,
        metrics_every: int = 10,
        context: Callable[[], dict] | None = None,
        speak: bool = True,
    ) -> None:
        """``context()``: extra values for each ``metrics`` record (called on those steps only);
        checkpoint outcomes arrive through :meth:`checkpoint_event`. ``speak``: this process
        logs verdicts and rollbacks (rank 0: every rank reaches the same verdict)."""
        if not isinstance(metrics_every, int) or metrics_every < 0:
            raise ValueError(
                f"metrics_every={metrics_every!r} is invalid: use an integer >= 0 (0 = off)"
            )
        self.events = events
        self.on = events.enabled
        self.speak = speak
        self.metrics_every = metrics_every
        self._context = context
        self._owner = threading.get_ident()  # the training thread: the only one that emits
        self._pending: deque = deque()  # checkpoint records reported from other threads
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
        if self._pending:
            self.drain()
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
        if verdict.healthy:
            return
        if self.speak and decision != "rollback":  # a rollback says what it cost instead
            log.warning(
                "arc_dist: %s at step %d: %s on ranks %s (loss=%.4g, grad_norm=%.4g) %s",
                verdict.status, step, verdict.reason, list(verdict.bad_ranks), verdict.loss,
                verdict.grad_norm, verdict.details or "",
            )  # fmt: skip
        if not self.on:
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
        verdict,
        seconds: float,
        dropped: int,
        lr_scale: float,
        backoff: float,
    ) -> None:
        """``backoff``: the LR factor this rollback applied (1.0: none); ``lr_scale``: all of
        them together."""
        reason, ranks = verdict.reason, verdict.bad_ranks
        if self.speak:
            log.warning(
                "arc_dist: failure at step %d (%s, ranks %s, loss=%.4g, grad_norm=%.4g)%s: rolled "
                "back to step %d in %.3fs, lr x%.3g (cumulative %.3g)",
                failed_step, reason, list(ranks), verdict.loss, verdict.grad_norm,
                " escalated to an older snapshot" if dropped else "", restored_step, seconds,
                backoff, lr_scale,
            )  # fmt: skip
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

    def forecast(self, step: int, values: dict) -> None:
        """An instability forecast at ``step`` (forecast.py); ``values``: its score and what Arc
        did about it."""
        if self.speak:
            log.warning("arc_dist: instability forecast at step %d: %s", step, values)
        if self.on:
            self.events.emit("forecast", step, reason="instability_forecast", values=values)

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
    def checkpoint_event(self, kind: str, step: int | None, values: dict) -> None:
        """The checkpoint components' ``on_event`` sink (every rank, any thread). Records are
        written from the training thread only: one reported from a writer thread waits for
        the next call there (:meth:`drain`, each step, ``close``)."""
        if not self.on:
            return
        self._pending.append((kind, step, values))
        if threading.get_ident() == self._owner:
            self.drain()

    def drain(self) -> None:
        """Training thread: write the checkpoint records reported since the last call."""
        while self._pending:
            kind, step, values = self._pending.popleft()
            if kind == "checkpoint_commit":
                nbytes, secs = int(values.get("bytes") or 0), float(values.get("seconds") or 0.0)
                values = {**values, "MB_per_s": nbytes / 1e6 / secs if secs > 0 else None}
            self.events.emit(kind, step, values=values)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, **values: Any) -> None:
        if self.on:
            values.setdefault("host", socket.gethostname())
            values.setdefault("pid", os.getpid())
            self.events.emit("start", None, values=values, flush=True)

    def resumed(
        self, step: int | None, seconds: float, source: str = "durable", nbytes: int = 0
    ) -> None:
        """After ``resume()``: a ``load`` record when a checkpoint was loaded (``source``:
        ``"durable"`` or ``"local"``, the node-local snapshot tier; ``nbytes`` read from durable
        storage), and a ``restart`` record when this process continues an earlier one (restart
        count > 0 or an older log)."""
        if not self.on:
            return
        if step is not None:
            nbytes = nbytes or None
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
            self.drain()
            self.events.emit("close", stats.get("steps"), values=stats)
            self.events.close()
