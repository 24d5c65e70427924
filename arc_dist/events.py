"""The run's event log: what happened, where, and what it cost, as versioned JSON lines.

Owns the log's schema, where it lives, how records are written (rank 0 only, buffered, through
fsspec so it can sit on object storage beside the checkpoints) and read back, and
:class:`Recorder`, the small adapter through which :class:`~arc_dist.Arc` emits its records.

Location: ``<log_dir>/events.jsonl``. A restarted job opens the same file and appends, so one log
tells the whole story of a job across restarts. File systems that cannot append (object stores:
``s3://``, ``gs://``, ...) get numbered part files instead, ``<log_dir>/events.jsonl.d/
part-<session>-<seq>.jsonl``: each flush rewrites the current part whole (an object PUT is
atomic, so a reader never sees half a line) and a part rolls over at ``part_bytes``.
:func:`read_events` reads the file and the parts, in time order.

Schema, version 1 (every key on every record; see ``docs/observability.md``)::

    {"v": 1, "time": 1767225600.123, "kind": "rollback", "step": 40, "restart": 0,
     "run": "job-7", "rank": 0, "ranks": [1], "reason": "nonfinite_loss",
     "values": {"failed_step": 41, ...}, "cost": {"steps_lost": 1, "seconds": 0.02}}

``time`` is Unix seconds; ``step`` the global step the record is about (null when none);
``restart`` the launcher's restart count (``TORCHELASTIC_RESTART_COUNT``) and ``run`` its run id
(``TORCHELASTIC_RUN_ID``); ``rank`` the writer (always 0), ``ranks`` the ranks the record is
about (bad ranks of a verdict); ``cost`` is null for records that cost nothing.

Hot path: rank 0 appends a dict to a list every ``metrics_every`` healthy steps and flushes when
the buffer is large or old; faults, rollbacks, restarts and checkpoint outcomes flush at once (they
are rare, and the record must survive the crash that may follow). No record ever needs a
collective: every rank reaches the same verdict, so rank 0 alone knows everything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

SCHEMA_VERSION = 1
FILE_NAME = "events.jsonl"
PARTS_DIR = FILE_NAME + ".d"

#: every kind a version-1 log may hold (readers must skip kinds they do not know)
KINDS = (
    "start",  # an Arc was constructed (values: world_size, layout, host, pid, checkpoint_dir)
    "restart",  # resume() in a process that continues an earlier one (cost: steps and time lost)
    "load",  # a checkpoint was loaded (values: seconds, bytes, MB_per_s)
    "metrics",  # every metrics_every steps: means of loss and grad_norm over the period, lr, ...
    "warning",  # a verdict with no damage: update applied or skipped (values: decision, ...)
    "failure",  # evidence of damage (reason, ranks, values: decision: rollback or raise, ...)
    "rollback",  # state restored (step: the restored step; cost: steps lost, seconds)
    "escalation",  # a rollback that discarded snapshots to reach an older state
    "recovered",  # training got past the failure (cost.seconds: time since the first failure)
    "unrecoverable",  # UnrecoverableError was raised
    "straggler",  # a rank became (reason slow_rank) or stopped being (slow_rank_cleared) a straggler
    "snapshot",  # an in-memory rollback target (sampled: at most one per metrics period)
    "checkpoint_start",  # a durable save was requested
    "checkpoint_commit",  # committed (values: bytes, seconds, MB_per_s, stall_s)
    "checkpoint_confirm",  # confirmed healthy
    "checkpoint_failure",  # a write attempt failed (values: abandoned: retries ran out)
    "checkpoint_skip",  # skipped: the previous save was still writing
    "checkpoint_reject",  # uncommitted: training rolled back past it before it was confirmed
    "close",  # Arc.close() (values: the final stats())
)
#: kinds written to storage at once instead of with the next batch
URGENT = frozenset(KINDS) - {"metrics", "snapshot", "warning", "checkpoint_start"}

log = logging.getLogger("arc_dist.events")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/Inf become strings (JSON has no such numbers), numpy scalars plain."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "item"):  # numpy / torch scalars
        return _clean(x.item())
    return str(x)


def number(x: Any) -> float:
    """A value from a record as a float (``"nan"``/``"inf"`` strings back to floats)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


class EventLog:
    """Writes event records as JSON lines under ``log_dir`` (rank 0), and to ``logging``.

    Args:
        log_dir: an fsspec URL or local path; None: no file (records still reach ``logging`` at
            DEBUG on logger ``arc_dist.events``, and subscribers).
        storage_options: passed to fsspec.
        enabled: False on ranks other than 0: every call is a no-op.
        restart, run_id: default from ``TORCHELASTIC_RESTART_COUNT`` / ``TORCHELASTIC_RUN_ID``.
        mode: ``"append"`` (one file), ``"parts"`` (part files) or ``"auto"``: append on local and
            in-memory file systems, parts elsewhere.
        flush_records, flush_seconds: batch limits for non-urgent records.
        part_bytes: size at which a part file rolls over.
    """

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        storage_options: dict | None = None,
        enabled: bool = True,
        restart: int | None = None,
        run_id: str | None = None,
        mode: str = "auto",
        flush_records: int = 100,
        flush_seconds: float = 30.0,
        part_bytes: int = 1 << 20,
    ) -> None:
        if mode not in ("auto", "append", "parts"):
            raise ValueError(f"EventLog(mode={mode!r}) is invalid: use 'auto', 'append' or 'parts'")
        self.enabled = enabled
        self.restart = _env_int("TORCHELASTIC_RESTART_COUNT") if restart is None else int(restart)
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID") if run_id is None else run_id
        self.log_dir = log_dir
        self.flush_records, self.flush_seconds, self.part_bytes = flush_records, flush_seconds, part_bytes
        self.records_written = 0
        #: the newest record an earlier process left in this log (None: a fresh log)
        self.previous: dict | None = None
        self._subscribers: list[Callable[[dict], None]] = []
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()
        self._fs = None
        self._closed = False
        self._part_lines: list[str] = []
        self._part_size = 0
        self._part_seq = 0
        self._session = f"{int(time.time() * 1e6):017d}-{os.getpid()}"
        if not enabled or log_dir is None:
            return
        from fsspec.core import url_to_fs

        try:
            fs, root = url_to_fs(log_dir, **(storage_options or {}))
            self._root = root.rstrip("/")
            protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
            appendable = bool({"file", "local", "memory"} & set(protocols))
            self.mode = ("append" if appendable else "parts") if mode == "auto" else mode
            self.path = f"{self._root}/{FILE_NAME}"
            fs.makedirs(self._root if self.mode == "append" else f"{self._root}/{PARTS_DIR}", exist_ok=True)
            self.previous = _last_record(fs, self._root)
            self._fs = fs
        except Exception as e:  # noqa: BLE001 - the log is advisory: it must not stop training
            log.warning(
                "arc_dist: no event log file in %s (%s: %s); events go to logging only",
                log_dir, type(e).__name__, e,
            )

    # -- writing -------------------------------------------------------------------------
    def subscribe(self, fn: Callable[[dict], None]) -> None:
        """Call ``fn(record)`` for every record (rank 0), e.g. a metrics exporter."""
        self._subscribers.append(fn)

    def emit(
        self,
        kind: str,
        step: int | None = None,
        *,
        ranks: Iterable[int] = (),
        reason: str | None = None,
        values: dict | None = None,
        steps_lost: int | None = None,
        seconds: float | None = None,
        flush: bool | None = None,
    ) -> dict | None:
        """Record one event; returns the record (None when disabled)."""
        if not self.enabled:
            return None
        cost = None
        if steps_lost is not None or seconds is not None:
            cost = {"steps_lost": int(steps_lost or 0), "seconds": round(float(seconds or 0.0), 6)}
        rec = {
            "v": SCHEMA_VERSION,
            "time": round(time.time(), 6),
            "kind": kind,
            "step": None if step is None else int(step),
            "restart": self.restart,
            "run": self.run_id,
            "rank": 0,
            "ranks": [int(r) for r in ranks],
            "reason": reason,
            "values": _clean(values or {}),
            "cost": cost,
        }
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event %s", rec)
        for fn in self._subscribers:
            try:
                fn(rec)
            except Exception as e:  # noqa: BLE001 - an exporter must never break training
                log.warning("arc_dist: event subscriber %r failed: %s", fn, e)
        if self._fs is not None and not self._closed:
            self._buffer.append(json.dumps(rec, separators=(",", ":"), allow_nan=False))
            urgent = kind in URGENT if flush is None else flush
            if (
                urgent
                or len(self._buffer) >= self.flush_records
                or time.monotonic() - self._last_flush >= self.flush_seconds
            ):
                self.flush()
        return rec

    def flush(self) -> None:
        """Write buffered records. Storage errors are logged, never raised: the log is advisory."""
        if self._fs is None or not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        try:
            if self.mode == "append":
                with self._fs.open(self.path, "ab") as f:
                    f.write(("\n".join(lines) + "\n").encode())
            else:
                self._write_part(lines)
            self.records_written += len(lines)
        except Exception as e:  # noqa: BLE001
            self._buffer = lines + self._buffer  # retried with the next flush
            if len(self._buffer) > 10 * self.flush_records:
                del self._buffer[: len(self._buffer) - 10 * self.flush_records]
            log.warning("arc_dist: event log %s not written (%s: %s)", self.log_dir, type(e).__name__, e)

    def _write_part(self, lines: list[str]) -> None:
        size = sum(len(x) + 1 for x in lines)
        if self._part_lines and self._part_size + size > self.part_bytes:
            self._part_seq += 1
            self._part_lines, self._part_size = [], 0
        self._part_lines.extend(lines)
        self._part_size += size
        name = f"{self._root}/{PARTS_DIR}/part-{self._session}-{self._part_seq:05d}.jsonl"
        try:
            self._fs.pipe_file(name, ("\n".join(self._part_lines) + "\n").encode())
        except Exception:
            del self._part_lines[len(self._part_lines) - len(lines):]
            self._part_size -= size
            raise

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True


def _checkpoint_bytes(manager: Any, step: int) -> int | None:
    """Size of checkpoint ``step`` from one listing of the checkpoint root (rank 0, at resume)."""
    try:
        from .checkpoint.catalog import scan

        return next((i.nbytes for i in scan(manager.storage, read_manifests=False) if i.step == step), None)
    except Exception:  # noqa: BLE001 - a size is nice to have, never worth failing a resume
        return None


def _last_record(fs, root: str) -> dict | None:
    """The newest record in the log under ``root``: the tail of the file and the newest part."""
    best = None
    path = f"{root}/{FILE_NAME}"
    if fs.exists(path):
        size = fs.size(path)
        tail = fs.cat_file(path, start=max(0, size - 65536)) if size else b""
        best = _newest(tail.decode(errors="replace").splitlines())
    parts = sorted(fs.glob(f"{root}/{PARTS_DIR}/part-*.jsonl"))
    if parts:
        rec = _newest(fs.cat_file(parts[-1]).decode(errors="replace").splitlines())
        if rec is not None and (best is None or number(rec.get("time")) > number(best.get("time"))):
            best = rec
    return best


def _parse(lines: Iterable[str]) -> list[dict]:
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if isinstance(rec, dict) and "kind" in rec:
            out.append(rec)
    return out


def _newest(lines: list[str]) -> dict | None:
    recs = _parse(lines)
    return max(recs, key=lambda r: number(r.get("time"))) if recs else None


def read_events(url: str, storage_options: dict | None = None) -> list[dict]:
    """Every record of the log under ``url`` (the run directory), oldest first.

    Reads ``events.jsonl`` and any part files. Records of a newer schema version are kept (their
    known keys mean the same); lines that do not parse (cut by a crash) are skipped.
    """
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if root.endswith(FILE_NAME):  # the file itself was named
        root = root[: -len(FILE_NAME)].rstrip("/")
    records: list[dict] = []
    path = f"{root}/{FILE_NAME}"
    if fs.exists(path):
        records += _parse(fs.cat_file(path).decode(errors="replace").splitlines())
    for part in sorted(fs.glob(f"{root}/{PARTS_DIR}/part-*.jsonl")):
        records += _parse(fs.cat_file(part).decode(errors="replace").splitlines())
    records.sort(key=lambda r: number(r.get("time")))  # stable: equal times keep file order
    return records


class Recorder:
    """What :class:`~arc_dist.Arc` records, and when. Every method is a no-op off rank 0.

    Keeps the small state the records need (step time, the checkpoint manager's counters last
    seen) so the controller makes one call per occurrence and no call does I/O on a healthy
    step beyond :meth:`EventLog.emit`'s buffered append.
    """

    def __init__(self, events: EventLog, *, metrics_every: int = 10, checkpoints: Any = None,
                 context: Callable[[], dict] | None = None) -> None:
        """``checkpoints``: the run's ``CheckpointManager`` (its ``stats()`` counters are watched);
        ``context()``: extra values for each ``metrics`` record (called on those steps only)."""
        if not isinstance(metrics_every, int) or metrics_every < 0:
            raise ValueError(f"metrics_every={metrics_every!r} is invalid: use an integer >= 0 (0 = off)")
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
            loss_last=self._loss_last, loss_steps=n_loss, step_s=self.step_s,
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
            self.events.emit("straggler", step, ranks=new, reason="slow_rank",
                             values={"ratios": ratios, "cleared": False})
        if cleared:
            self.events.emit("straggler", step, ranks=cleared, reason="slow_rank_cleared",
                             values={"ratios": ratios, "cleared": True})

    def verdict(self, step: int, verdict, decision: str) -> None:
        if not self.on or verdict.healthy:
            return
        if verdict.status == "failure" and self._episode_start is None:
            self._episode_start = time.monotonic()
        values = dict(loss=verdict.loss, grad_norm=verdict.grad_norm, decision=decision, **verdict.details)
        self.events.emit(verdict.status, step, ranks=verdict.bad_ranks, reason=verdict.reason, values=values)

    def rollback(self, failed_step: int, restored_step: int, reason: str | None, ranks, seconds: float,
                 dropped: int, lr_scale: float) -> None:
        if not self.on:
            return
        lost = max(0, failed_step - restored_step)
        wasted = lost * self.step_s if math.isfinite(self.step_s) else 0.0
        self._mark_step, self._mark_time = restored_step, time.monotonic()
        self._sums = [0.0, 0, 0.0, 0]
        if dropped:
            self.events.emit("escalation", restored_step, ranks=ranks, reason=reason,
                             values={"failed_step": failed_step, "dropped_snapshots": dropped})
        self.events.emit(
            "rollback", restored_step, ranks=ranks, reason=reason,
            values={"failed_step": failed_step, "restored_step": restored_step, "restore_s": seconds,
                    "lr_scale": lr_scale, "escalated": bool(dropped)},
            steps_lost=lost, seconds=seconds + wasted,
        )

    def recovered(self, step: int) -> None:
        if not self.on:
            return
        seconds = time.monotonic() - self._episode_start if self._episode_start is not None else 0.0
        self._episode_start = None
        self.events.emit("recovered", step, seconds=seconds)

    def unrecoverable(self, step: int, verdict, message: str) -> None:
        if self.on:
            self.events.emit("unrecoverable", step, ranks=verdict.bad_ranks, reason=verdict.reason,
                             values={"message": message})

    def snapshot(self, step: int, nbytes: int, seconds: float) -> None:
        if not self.on:
            return
        last = self._last_snapshot_event
        if last is not None and self.metrics_every and step - last < self.metrics_every and step > last:
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
                "checkpoint_failure", self._ckpt_step,
                values={"attempts_failed": grew("checkpoint_failures"),
                        "abandoned": grew("checkpoints_abandoned") > 0},
            )
        if grew("checkpoints") > 0:
            nbytes = int(now.get("checkpoint_bytes") or 0)
            secs = float(now.get("checkpoint_write_s") or 0.0)
            self.events.emit(
                "checkpoint_commit", now.get("last_committed_step"),
                values={"bytes": nbytes, "seconds": secs, "stall_s": now.get("checkpoint_stall_s"),
                        "MB_per_s": nbytes / 1e6 / secs if secs > 0 else None},
            )
        if grew("checkpoints_confirmed") > 0:
            self.events.emit("checkpoint_confirm", now.get("last_confirmed_step"))
        if grew("checkpoints_skipped") > 0:
            self.events.emit("checkpoint_skip", self._ckpt_step)
        if grew("checkpoints_rejected") > 0:
            self.events.emit("checkpoint_reject", None, values={"count": grew("checkpoints_rejected")})

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
            self.events.emit("load", step, values={
                "source": source, "seconds": seconds, "bytes": nbytes,
                "MB_per_s": nbytes / 1e6 / seconds if nbytes and seconds > 0 else None,
            })
        prev = self.events.previous
        if self.events.restart > 0 or prev is not None:
            last_step = prev.get("step") if prev else None
            clean = prev is not None and prev.get("kind") == "close"  # a finished job continued
            lost = max(0, int(last_step) - (step or 0)) if isinstance(last_step, int) and not clean else 0
            down = time.time() - number(prev.get("time")) if prev and not clean else 0.0
            self.events.emit(
                "restart", step if step is not None else 0,
                values={"previous_step": last_step, "previous_kind": prev.get("kind") if prev else None,
                        "resumed_step": step, "clean": clean},
                steps_lost=lost, seconds=down if math.isfinite(down) else 0.0,
            )
        self._mark_step, self._mark_time = step, time.monotonic()
        self._sums = [0.0, 0, 0.0, 0]

    def close(self, stats: dict) -> None:
        if self.on:
            self.poll_checkpoints()
            self.events.emit("close", stats.get("steps"), values=stats)
            self.events.close()
