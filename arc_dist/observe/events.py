"""The run's event log: what happened, where, and what it cost, as versioned JSON lines.

Owns the log's schema, where it lives, how records are written (rank 0 only, buffered, through
fsspec so it can sit on object storage beside the checkpoints) and read back, (the
adapter through which :class:`~arc_dist.Arc` emits its records is
:class:`~arc_dist.observe.recorder.Recorder`).

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
    "forecast",  # early warning: instability forecast (values: score, threshold, lr_factor, ...)
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

log = logging.getLogger("arc_dist.observe.events")


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
            DEBUG on logger ``arc_dist.observe.events``, and subscribers).
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
        self.flush_records, self.flush_seconds, self.part_bytes = (
            flush_records,
            flush_seconds,
            part_bytes,
        )
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
            fs.makedirs(
                self._root if self.mode == "append" else f"{self._root}/{PARTS_DIR}", exist_ok=True
            )
            self.previous = _last_record(fs, self._root)
            self._fs = fs
        except Exception as e:  # noqa: BLE001 - the log is advisory: it must not stop training
            log.warning(
                "arc_dist: no event log file in %s (%s: %s); events go to logging only",
                log_dir,
                type(e).__name__,
                e,
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
            log.warning(
                "arc_dist: event log %s not written (%s: %s)", self.log_dir, type(e).__name__, e
            )

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
            del self._part_lines[len(self._part_lines) - len(lines) :]
            self._part_size -= size
            raise

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True


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
