"""``CheckpointManager``: durable, sharded, healthy-confirmed checkpoints through DCP and fsspec.

Who calls what (every method marked *collective* must be called by every rank of the process
group, in the same order; the controller does this):

* ``save(step, app_state, blocking=...)`` (collective). Blocking: wait for any save in flight, then
  write and commit before returning. Non-blocking: the state is staged to host memory (the only
  training stall: a copy into reused buffers; tensors an in-memory snapshot of the same state
  already holds are borrowed, ``loan=``) and the worker thread writes it, then commits. **At most one save is in
  flight**: when a periodic save is due while the previous one is still writing (or retrying), the
  new one is *skipped and counted* (``stats()["checkpoints_skipped"]``); ranks agree on that with
  one tiny all-reduce, so they never diverge. Training never waits for slow storage. Every
  rank stages its copy *before* DCP and the ranks agree (another tiny all-reduce) that all of
  them could: a rank whose staging failed (a pinned allocation, host memory) would otherwise
  skip DCP while the others wait in its collectives; now the save is abandoned on every rank.
* ``on_healthy_step(global_step, rollback_targets=...)`` (every rank, no communication): counts
  healthy steps after each checkpoint; after ``confirm_after`` of them rank 0 writes the
  confirmation sidecar.
* ``on_rollback(restored_step)`` (every rank, no communication): unconfirmed checkpoints newer than
  the restored state are retracted (they hold the failed trajectory) and a save in flight for
  such a step will not commit.
* ``load(app_state)`` (collective): the newest checkpoint saved under a healthy verdict (or
  confirmed); checksums are verified, the model's keys and shapes compared, and a damaged or
  incompatible checkpoint is skipped for the next older one. ``CheckpointError`` names every
  checkpoint tried and why, only when none is usable. A checkpoint that cannot be *read* (an
  outage, expired credentials, one node without access) is not skipped: every rank raises
  ``CheckpointStorageError`` (exit code 10, restart).
* ``wait()``, ``close()`` (every rank): wait for the save in flight; ``close`` also stops the thread.

What is resumed, confirmed, retracted and pruned is decided by ``lifecycle.Lifecycle`` (pure
rules, the same on every rank); this class carries its decisions out on storage and reports each
outcome (commit, confirmation, failed attempt, skip, retraction) to ``on_event``. The work is
split by protocol half: ``loading.Loading`` and ``saving.Saving``; ``errors`` classifies faults.

Commit protocol per save: DCP data files (each rank its own), DCP ``.metadata`` (rank 0, via temp
name + rename), then rank 0 writes ``arc_manifest.json`` with every file's size and checksum. The
checksums are computed while writing (``dcp_io.HashingWriter``), gathered to rank 0, so committing
costs no re-read. Re-saving an existing step (training reached it again after a rollback) first
uncommits the old directory (manifest first), so a crash never leaves a mix of both.

Background work runs on one worker thread per rank; DCP's collectives use a dedicated gloo group
(DCP's collectives off the training thread on the default group deadlock against DDP's
all-reduces) and the skip
agreement another one, so no two threads ever share a group. A failed background write is logged,
counted, retried ``max_retries`` times with exponential backoff (all ranks in lockstep: DCP
reports a failure to every rank) and never touches older checkpoints.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ExitCode
from . import retention
from .catalog import scan
from .dcp_io import FaultHook
from .errors import CheckpointStorageError, config_fault, describe
from .lifecycle import Actions, Entry, Lifecycle
from .loading import Loading
from .manifest import (
    CHECKSUM_ALGORITHMS,
    CONFIRMED_NAME,
    MANIFEST_NAME,
    confirmation_json,
    default_algorithm,
)
from .saving import SaveJob, Saving, Stager
from .storage import Storage, describe_options

#: ``on_event(kind, step, values)``: what the manager reports at each outcome
EventSink = Callable[[str, "int | None", dict], None]

# DCP warns on every call without an initialized process group; world size 1 is a supported mode
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable")


def gather_objects(obj: Any, group: Any, world_size: int) -> list:
    """Every rank's ``obj`` (``all_gather_object``; no communication at world size 1)."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


class CheckpointManager(Saving, Loading):
    """Durable checkpoints of a dict of DCP ``Stateful`` objects under ``url``.

    Args:
        url: any fsspec URL or local path; ``memory://`` only at world size 1.
        storage_options: passed to fsspec (e.g. ``endpoint_url``, ``key``, ``secret``); never logged.
        keep: committed checkpoints kept; a few more are kept when they must be (the newest
            confirmed, the newest healthy, the one resumed from; see ``lifecycle``).
        confirm_after: healthy steps after a checkpoint before it counts as confirmed (0: at once).
        async_save: what ``save(..., blocking=None)`` does (the controller passes ``blocking``).
        process_group: the ranks that save together (default: the default group). Constructing
            the manager creates two gloo groups with ``dist.new_group``: every rank of the default
            group must construct it, in the same order as other group creations.
        config_digest: recorded in the manifest.
        checksum: ``"xxh3_64"`` (default when ``xxhash`` is installed), ``"crc32"`` (the default
            otherwise) or ``"sha256"``.
        max_retries: background retries of a failed save (with backoff ``retry_backoff * 2**i`` s).
        verify_on_load: re-read and check every file's checksum before loading it.
        io_threads: threads (and files) per rank that write a checkpoint; 2 saturates a local
            disk here where 1 reaches ~75%, and parallelises uploads to object stores.
        timeout: timeout of the checkpoint process groups' collectives.
        check_writable: rank 0 writes a probe file at construction, so a read-only or unreachable
            ``url`` fails now with a clear error rather than at the first save.
        on_event: ``on_event(kind, step, values)`` at each outcome, on every rank, from the
            thread that reached it (the worker thread for commits and write failures):
            ``checkpoint_commit`` (values: ``bytes``, ``seconds``, ``stall_s``),
            ``checkpoint_confirm``, ``checkpoint_failure`` (``attempts_failed``, ``abandoned``),
            ``checkpoint_skip`` and ``checkpoint_reject`` (step None; ``count``). It must not
            block; an exception it raises is logged and dropped.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        keep: int = 3,
        confirm_after: int = 20,
        async_save: bool = True,
        process_group: Any = None,
        config_digest: str = "",
        logger: logging.Logger | None = None,
        checksum: str | None = None,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
        verify_on_load: bool = True,
        io_threads: int = 2,
        timeout: timedelta = timedelta(minutes=10),
        check_writable: bool = True,
        on_event: EventSink | None = None,
    ) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(
                f"CheckpointManager(keep={keep!r}) is invalid: keep at least 1 checkpoint"
            )
        if not isinstance(confirm_after, int) or confirm_after < 0:
            raise ValueError(
                f"CheckpointManager(confirm_after={confirm_after!r}) is invalid: use an integer >= 0"
            )
        checksum = checksum or default_algorithm()
        if checksum not in CHECKSUM_ALGORITHMS:
            raise ValueError(
                f"CheckpointManager(checksum={checksum!r}) is invalid: use one of {CHECKSUM_ALGORITHMS}"
            )
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(
                f"CheckpointManager(max_retries={max_retries!r}) is invalid: use an integer >= 0"
            )
        if retry_backoff < 0:
            raise ValueError(
                f"CheckpointManager(retry_backoff={retry_backoff!r}) is invalid: use seconds >= 0"
            )
        self.log = logger or logging.getLogger("arc_dist")
        self.storage = Storage(url, storage_options)
        self.keep, self.confirm_after, self.async_save = keep, confirm_after, async_save
        self.config_digest, self.checksum = config_digest, checksum
        self.max_retries, self.retry_backoff = max_retries, retry_backoff
        self.verify_on_load = verify_on_load
        if not isinstance(io_threads, int) or io_threads < 1:
            raise ValueError(
                f"CheckpointManager(io_threads={io_threads!r}) is invalid: use an integer >= 1"
            )
        self.io_threads = io_threads
        #: test-only fault injector: ``hook(point, detail)`` at "write" (file, bytes so far),
        #: "before_manifest" and "after_manifest" (step); tests kill the process from it
        self.fault_hook: FaultHook | None = None
        self.on_event = on_event

        self._distributed = dist.is_available() and dist.is_initialized()
        if self._distributed:
            pg = process_group if process_group is not None else dist.group.WORLD
            self.rank, self.world_size = dist.get_rank(pg), dist.get_world_size(pg)
            ranks = None if pg is dist.group.WORLD else dist.get_process_group_ranks(pg)
            # DCP's collectives (background thread) and the skip agreement (training thread)
            # each get their own gloo group: two threads must never share one.
            self._io_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
            self._ctrl_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
        else:
            if process_group is not None:
                raise ValueError(
                    "CheckpointManager(process_group=...) needs torch.distributed to be initialized"
                )
            self.rank, self.world_size = 0, 1
            self._io_group = self._ctrl_group = None
        if self.world_size > 1 and self.storage.protocol == "memory":
            raise ValueError(
                f"checkpoint_dir={self.storage.display!r}: memory:// is private to each process, so "
                f"ranks cannot share a checkpoint (world size {self.world_size}); use a shared "
                "file system path or an object store URL (s3://, gs://)"
            )

        self._lock = threading.Lock()
        self._stats: dict[str, Any] = dict(
            checkpoints=0,
            checkpoint_failures=0,
            checkpoint_retries=0,
            checkpoints_abandoned=0,
            checkpoints_skipped=0,
            checkpoints_rejected=0,
            checkpoints_confirmed=0,
            last_committed_step=None,
            last_confirmed_step=None,
            checkpoint_stall_s=0.0,
            checkpoint_staged_bytes=0,
            checkpoint_write_s=0.0,
            checkpoint_bytes=0,
        )
        self._lifecycle = Lifecycle(keep, confirm_after)
        self._current: SaveJob | None = None
        self._in_flight = False
        self._known_steps: set[int] = set()  # rank 0: step dirs that exist (any state)
        self._unwritten_confirms: list[tuple[int, int, int]] = []  # rank 0: sidecars to retry
        self._closed = False
        self._loaded_step: int | None = None
        #: size of the checkpoint the last ``load`` read
        self.loaded_bytes = 0
        self._stager = Stager(cuda=torch.cuda.is_available())

        error = None
        listing: list[tuple[int, bool]] = []  # (step, confirmed) of every committed checkpoint
        if self.rank == 0:
            try:
                if check_writable:
                    self.storage.probe_writable()
                infos = scan(self.storage, read_manifests=False)
                self._known_steps = {i.step for i in infos}
                listing = [(i.step, i.confirmed) for i in infos if i.committed]
            except Exception as e:  # OSError, botocore errors, ...
                error = (f"{type(e).__name__}: {e}", config_fault(e))
            if error is None:
                opts = describe_options(self.storage.options)
                self.log.info(
                    "arc_dist: checkpoints in %s%s (%d step directories found)",
                    self.storage.display,
                    f" with {opts}" if opts else "",
                    len(self._known_steps),
                )
        error, listing = self._broadcast((error, listing), self._ctrl_group)
        # health is not known before a resume reads the manifests: count them as healthy, so
        # retention keeps more rather than less
        self._lifecycle.known(Entry(step, True, confirmed) for step, confirmed in listing)
        if error is not None:
            what, fix = error
            raise CheckpointStorageError(
                f"arc_dist: checkpoint_dir={self.storage.display!r} is not usable: {what}. Fix: "
                + (fix or "check that the storage is reachable and that storage_options are right"),
                exit_code=ExitCode.UNRECOVERABLE if fix else None,
            )
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="arc-checkpoint", daemon=True)
        self._thread.start()

    # -- collectives ---------------------------------------------------------------------
    def _broadcast(self, obj: Any, group: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=group, group_src=0)
        return box[0]

    def _all_gather(self, obj: Any) -> list:
        return gather_objects(obj, self._io_group, self.world_size)

    def _any_rank(self, flag: bool) -> bool:
        """Training thread: True on every rank when ``flag`` is True on any (one tiny all-reduce
        on the checkpoint control group), so a save is made or skipped by all ranks alike."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl_group)
        return bool(t.item())

    # -- worker thread -------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except BaseException as e:  # the thread must survive anything a job does
                self.log.error("arc_dist: checkpoint worker: %s", describe(e), exc_info=True)
            finally:
                self._queue.task_done()

    def _submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _emit(self, kind: str, step: int | None, **values: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, step, values)
        except Exception as e:  # noqa: BLE001 - a listener must never break a save
            self.log.warning("arc_dist: checkpoint event listener failed on %s: %s", kind, e)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CheckpointManager is closed; create a new one")

    # -- confirmation, rollback, retention --------------------------------------------------
    def on_healthy_step(
        self, global_step: int, rollback_targets: Sequence[int] | None = None
    ) -> None:
        """Every rank, after every healthy step; no communication (rank 0 writes sidecars).

        ``rollback_targets``: the steps of the states a rollback can restore now (``Arc``'s
        in-memory snapshots); retention keeps the newest checkpoint at or before each of them.
        """
        with self._lock:
            if rollback_targets is not None:
                self._lifecycle.rollback_targets = tuple(rollback_targets)
            outcome = self._lifecycle.healthy_step(global_step)
        if outcome.confirmed:
            self._carry_out(outcome, at=global_step)

    def _carry_out(self, outcome: Actions, at: int | None) -> None:
        """Every rank counts what the lifecycle decided; rank 0 queues the storage work.

        ``at``: the step at which confirmations happened (None: at a commit).
        """
        for step, _ in outcome.confirmed:
            self._mark_confirmed(step)
        if self.rank != 0:
            return
        for step in outcome.retract:
            self._submit(lambda s=step: self._uncommit_rejected(s))
        for step, healthy in outcome.confirmed:
            when = step + healthy if at is None else at
            self._submit(lambda s=step, a=when, h=healthy: self._write_confirmation(s, a, h))
        self._submit(self._apply_retention)

    def _mark_confirmed(self, step: int) -> None:
        with self._lock:
            self._stats["checkpoints_confirmed"] += 1
            last = self._stats["last_confirmed_step"]
            self._stats["last_confirmed_step"] = step if last is None else max(last, step)
        self._emit("checkpoint_confirm", step)

    def _write_confirmation(self, step: int, at: int, healthy: int) -> None:
        """Rank 0, worker thread: the sidecar, plus any that failed to write earlier."""
        todo, self._unwritten_confirms = [*self._unwritten_confirms, (step, at, healthy)], []
        for s, a, h in todo:
            path = self.storage.step_path(s)
            try:
                if not self.storage.fs.exists(f"{path}/{MANIFEST_NAME}"):
                    self.log.warning(
                        "arc_dist: checkpoint step_%d was confirmed healthy but is no longer in "
                        "%s (removed by something else than this job?)",
                        s,
                        self.storage.display,
                    )
                    continue
                self.storage.write_bytes_atomic(
                    f"{path}/{CONFIRMED_NAME}", confirmation_json(s, a, h)
                )
                self.log.info(
                    "arc_dist: checkpoint step_%d confirmed healthy (%d healthy steps)", s, h
                )
            except Exception as e:
                self._unwritten_confirms.append((s, a, h))
                self.log.warning(
                    "arc_dist: could not mark step_%d confirmed (%s: %s); will retry",
                    s,
                    type(e).__name__,
                    e,
                )

    def on_rollback(self, restored_step: int) -> None:
        """Every rank, after a rollback to ``restored_step``; no communication."""
        with self._lock:
            outcome = self._lifecycle.rolled_back(restored_step)
            doomed = outcome.retract + outcome.reject
            if self._current is not None and self._current.step in doomed:
                self._current.rejected = True  # still writing: it will not commit
            self._stats["checkpoints_rejected"] += len(doomed)
        if doomed:
            self._emit("checkpoint_reject", None, count=len(doomed))
        if self.rank == 0:
            for step in outcome.retract:
                self._submit(lambda s=step: self._uncommit_rejected(s))

    def _uncommit_rejected(self, step: int) -> None:
        self.log.info(
            "arc_dist: retracting checkpoint step_%d: training rolled back past it before it was "
            "confirmed healthy",
            step,
        )
        self._try_cleanup(step)

    def _apply_retention(self) -> None:
        """Rank 0, worker thread."""
        try:
            infos = scan(self.storage, read_manifests=False)
            with self._lock:
                protect = self._lifecycle.protected()
                if self._current is not None:
                    protect.add(self._current.step)
            victims = retention.plan_retention(infos, self.keep, protect=protect)
            removed = retention.delete(self.storage, victims, self.log)
            self._known_steps = {i.step for i in infos} - set(removed)
        except Exception as e:
            self.log.warning("arc_dist: retention skipped (%s: %s)", type(e).__name__, e)

    # -- lifecycle -----------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the save in flight (and queued bookkeeping) is done."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        """Wait for the last write, then stop the worker thread. Idempotent."""
        if self._closed:
            return
        self.wait()
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._stager.close()

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
