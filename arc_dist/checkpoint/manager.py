"""``CheckpointManager``: durable, sharded, healthy-confirmed checkpoints through DCP and fsspec.

Who calls what (every method marked *collective* must be called by every rank of the process
group, in the same order; the controller does this):

* ``save(step, app_state, blocking=...)`` (collective). Blocking: wait for any save in flight, then
  write and commit before returning. Non-blocking: ``dcp.async_save`` stages a CPU copy (the only
  training stall) and a background thread writes it, then commits. **At most one save is in
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
rules, the same on every rank); this class carries its decisions out on storage.

Commit protocol per save: DCP data files (each rank its own), DCP ``.metadata`` (rank 0, via temp
name + rename), then rank 0 writes ``arc_manifest.json`` with every file's size and checksum. The
checksums are computed while writing (``dcp_io.HashingWriter``), gathered to rank 0, so committing
costs no re-read. Re-saving an existing step (training reached it again after a rollback) first
uncommits the old directory (manifest first), so a crash never leaves a mix of both.

Background work runs on one worker thread per rank; DCP's collectives use a dedicated gloo group
(``dcp.async_save`` on the default group deadlocks against DDP's all-reduces) and the skip
agreement another one, so no two threads ever share a group. A failed background write is logged,
counted, retried ``max_retries`` times with exponential backoff (all ranks in lockstep: DCP
reports a failure to every rank) and never touches older checkpoints.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions

from ..errors import ArcError, CheckpointError, ExitCode, ReshardError
from . import retention
from .catalog import CheckpointInfo, scan, verify
from .dcp_io import FaultHook, HashingWriter, SafeLoadPlanner, SafeReader
from .lifecycle import Entry, Lifecycle, Outcome, healthy_verdict, resume_order, trusted
from .manifest import (
    CHECKSUM_ALGORITHMS,
    CONFIRMED_NAME,
    MANIFEST_NAME,
    confirmation_json,
    default_algorithm,
    make_manifest,
)
from .storage import Storage, describe_options, storage_fault

# DCP warns on every call without an initialized process group; world size 1 is a supported mode
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable")


class CheckpointStorageError(ArcError):
    """Checkpoint storage could not be written, listed or read; older checkpoints are untouched.

    Restarting can help (an outage ends, space is freed), so the exit code is ``RETRY``;
    except for a ``checkpoint_dir`` that cannot work as configured (permission denied, a file
    where the directory should be, a bucket that does not exist), which is ``UNRECOVERABLE``.
    """

    exit_code = ExitCode.RETRY

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class _CommitFailed(Exception):
    """Rank 0 could not write the manifest; every rank raises it, with rank 0's error kind."""

    def __init__(self, detail: str, kind: str | None) -> None:
        super().__init__(detail)
        self.kind = kind


def _kind(e: BaseException) -> str | None:
    """What class of storage fault ``e`` is, for the retry decision and the fix hint."""
    if isinstance(e, _CommitFailed):
        return e.kind
    if isinstance(e, PermissionError):
        return "permission"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "nospace"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return "toolarge"
    return None


def _flatten_failures(e: BaseException) -> list[BaseException]:
    """The underlying exceptions, also those DCP wrapped per rank in a ``CheckpointException``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        out = []
        for v in failures.values():
            out.append(
                v[0] if isinstance(v, tuple) and v and isinstance(v[0], BaseException) else v
            )
        return out
    return [e]


def _describe(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        parts = []
        for rank, v in sorted(failures.items()):
            exc = v[0] if isinstance(v, tuple) else v
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    if isinstance(e, _CommitFailed):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _fix_hint(e: BaseException) -> str:
    kinds = {_kind(x) for x in _flatten_failures(e)}
    if "permission" in kinds:
        return "make checkpoint_dir writable by this user (or pass another checkpoint_dir)"
    if "nospace" in kinds:
        return "free space on the checkpoint file system or lower keep_checkpoints"
    if "toolarge" in kinds:
        return "raise the file size limit (ulimit -f) or use a file system that allows larger files"
    return "check that the checkpoint storage is reachable and storage_options are right"


def _config_fault(e: BaseException) -> str | None:
    """The fix, when a ``checkpoint_dir`` that failed its start-up probe cannot work as
    configured (a restart would fail the same way); None for faults that may pass."""
    if isinstance(e, PermissionError):
        return "make checkpoint_dir writable by this user (or pass another checkpoint_dir)"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return "checkpoint_dir (or a folder above it) is a file: pass a directory path"
    if isinstance(e, FileNotFoundError):
        return "create the bucket (arc-dist never creates one) or fix the URL's bucket name"
    return None


def _retriable(e: BaseException) -> bool:
    # a permission problem does not go away by waiting; everything else may (outage, full disk
    # that retention or an operator frees)
    return "permission" not in {_kind(x) for x in _flatten_failures(e)}


class _Stager(DefaultStager):
    """DCP's stager, reused so its CPU buffers are too; staging is synchronous (no future)."""

    _synchronize_after_execute = False

    def __init__(self, cuda: bool) -> None:
        super().__init__(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
        )


class _Staged(AsyncStager):
    """Hands ``dcp.async_save`` a state already staged, once every rank agreed to save it."""

    _synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclasses.dataclass(eq=False)
class _SaveJob:
    step: int
    verdict: dict
    blocking: bool
    state: dict | None = None
    future: Any = None
    writer: HashingWriter | None = None
    rejected: bool = False
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


def _rebuild(key: str, fqns: list[str], loaded: dict, md, current: Any) -> Any:
    """The nested state of a dynamic object from its flat checkpoint values.

    DCP drops empty dicts when it flattens (they have no leaves), so containers that exist in the
    object's current state but not in the checkpoint come back empty rather than missing.
    """
    planner_data = md.planner_data or {}
    root: dict = {}
    for fqn in fqns:
        set_element(root, planner_data.get(fqn, (key, fqn[len(key) + 1 :])), loaded[fqn])
    value = root.get(key, {})
    _fill_empty(value, current)
    return value


def _fill_empty(value: Any, template: Any) -> None:
    if isinstance(value, dict) and isinstance(template, dict):
        for k, t in template.items():
            if k not in value and isinstance(t, dict):
                value[k] = {}
            if k in value:
                _fill_empty(value[k], t)


class CheckpointManager:
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
            checkpoint_write_s=0.0,
            checkpoint_bytes=0,
        )
        self._lifecycle = Lifecycle(keep, confirm_after)
        self._current: _SaveJob | None = None
        self._in_flight = False
        self._known_steps: set[int] = set()  # rank 0: step dirs that exist (any state)
        self._unwritten_confirms: list[tuple[int, int, int]] = []  # rank 0: sidecars to retry
        self._closed = False
        self._loaded_step: int | None = None
        self._stager = _Stager(cuda=torch.cuda.is_available())

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
                error = (f"{type(e).__name__}: {e}", _config_fault(e))
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
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._io_group)
        return out

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
                self.log.error("arc_dist: checkpoint worker: %s", _describe(e), exc_info=True)
            finally:
                self._queue.task_done()

    def _submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CheckpointManager is closed; create a new one")

    # -- save ----------------------------------------------------------------------------
    def _writer(self, step: int) -> HashingWriter:
        return HashingWriter(
            self.storage.to_url(self.storage.step_path(step)),
            algorithm=self.checksum,
            storage_options=self.storage.options,
            sync_files=self.storage.is_local,
            thread_count=self.io_threads,
            fault_hook=self.fault_hook,
        )

    def _dcp_kwargs(self) -> dict:
        return dict(process_group=self._io_group, no_dist=not self._distributed)

    @staticmethod
    def _state_dict(app_state: dict) -> dict:
        return {
            k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in app_state.items()
        }

    def save(
        self,
        step: int,
        app_state: dict,
        *,
        verdict: dict | None = None,
        blocking: bool | None = True,
    ) -> None:
        """Collective: checkpoint ``app_state`` as ``step_<step>``.

        ``blocking=False`` writes in the background; ``None`` uses the constructor's
        ``async_save``. A blocking save raises
        :class:`CheckpointStorageError` when every attempt failed; a background save logs and
        counts its failure instead, and training goes on.
        """
        self._check_open()
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"save(step={step!r}) is invalid: use the integer global step >= 0")
        if not isinstance(app_state, dict) or not app_state:
            raise TypeError("save(app_state=...) must be a non-empty dict of Stateful objects")
        if blocking is None:
            blocking = not self.async_save
        verdict = dict(verdict or {})
        if step == self._loaded_step:
            # the state just resumed from is already committed (the controller's first step
            # after a resume falls on a checkpoint step): writing it again would only replace
            # a confirmed checkpoint with an unconfirmed copy. Every rank loaded the same step.
            self.log.debug("arc_dist: step_%d is the checkpoint just loaded; not saved again", step)
            return
        self._loaded_step = None
        if blocking:
            self.wait()
            error: BaseException | None = None
            try:
                state = self._state_dict(app_state)
            except Exception as e:
                error = e
            if self._any_rank(error is not None):  # nobody enters DCP without the others
                if error is not None:
                    raise error
                raise CheckpointStorageError(
                    f"arc_dist: checkpoint step_{step} not written: another rank could not "
                    "prepare its state (its own error says why)"
                )
            job = _SaveJob(step, verdict, True, state=state)
            self._start(job)
            self._submit(lambda: self._run_save(job))
            job.done.wait()
            if job.error is not None:
                raise CheckpointStorageError(self._failure_message(job.step, job.error)) from None
            return

        with self._lock:
            busy = self._in_flight
        if self._any_rank(busy):
            self._stats["checkpoints_skipped"] += 1
            if self.rank == 0:
                self.log.info(
                    "arc_dist: checkpoint at step %d skipped: the previous save is still writing "
                    "(raise checkpoint_every if this repeats)",
                    step,
                )
            return
        t0 = time.perf_counter()
        job = _SaveJob(step, verdict, False)
        self._start(job)
        # everything that can fail on one rank alone (staging: a pinned allocation, host memory,
        # a user object's state_dict) happens before DCP, and every rank agrees on the outcome:
        # a rank that skipped DCP would leave the others in its collectives until they time out
        error: BaseException | None = None
        try:
            job.state = self._stager.stage(self._state_dict(app_state))
            job.writer = self._writer(step)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            error = e
        if self._any_rank(error is not None):  # training goes on; no rank enters DCP
            with self._lock:
                self._in_flight, self._current = False, None
                self._lifecycle.abandoned(job.step)
            job.state = None
            self._stats["checkpoint_failures"] += 1
            self._stats["checkpoints_abandoned"] += 1
            why = error if error is not None else RuntimeError("another rank could not stage")
            self.log.error("[rank %d] %s", self.rank, self._failure_message(step, why))
            return
        if self.rank == 0 and step in self._known_steps:
            self._queue.join()  # only rank-0 bookkeeping can be queued: no save is in flight
            self._clear_step_dir(step, job.writer, quiet=False)
        job.future = dcp.async_save(
            job.state, storage_writer=job.writer, async_stager=_Staged(), **self._dcp_kwargs()
        )
        self._stats["checkpoint_stall_s"] = time.perf_counter() - t0
        self._submit(lambda: self._run_save(job))

    def _start(self, job: _SaveJob) -> None:
        with self._lock:
            self._in_flight, self._current = True, job
            self._lifecycle.saving(job.step)

    def _clear_step_dir(self, step: int, writer: HashingWriter, *, quiet: bool) -> None:
        """Rank 0, before ``step`` is written: remove what is there (old or partial).

        If that fails (storage down), the writer is poisoned so that DCP's first collective fails
        this attempt on every rank alike; a failure on rank 0 alone would leave the other ranks
        waiting in a collective that rank 0 never joins.
        """
        try:
            if step in self._known_steps:
                if quiet:
                    retention.uncommit(self.storage, self.storage.step_path(step))
                else:
                    self._replace_dir(step)
            self._known_steps.add(step)
        except Exception as e:
            writer.poison = e

    def _replace_dir(self, step: int) -> None:
        """Rank 0: uncommit and delete an existing ``step_<step>`` before it is written again."""
        path = self.storage.step_path(step)
        self.log.info("arc_dist: step_%d exists in %s; replacing it", step, self.storage.display)
        retention.uncommit(self.storage, path)
        self._known_steps.discard(step)

    def _failure_message(self, step: int, e: BaseException, attempts: int | None = None) -> str:
        tries = f" after {attempts} attempt(s)" if attempts else ""
        return (
            f"arc_dist: checkpoint step_{step} could not be written to {self.storage.display}"
            f"{tries}: {_describe(e)}. Earlier checkpoints are untouched. Fix: {_fix_hint(e)}"
        )

    def _run_save(self, job: _SaveJob) -> None:
        """Worker thread, every rank: finish (or redo) the DCP write, then commit."""
        t0 = time.perf_counter()
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    if job.future is not None and attempt == 1:
                        job.future.result()
                        writer = job.writer
                    else:
                        writer = self._writer(job.step)
                        if self.rank == 0:
                            # a retry, or a blocking save of a step that exists: start clean
                            # (DCP's planning collective below keeps the others from writing first)
                            self._clear_step_dir(job.step, writer, quiet=attempt > 1)
                        dcp.save(job.state, storage_writer=writer, **self._dcp_kwargs())
                    if self.rank == 0:
                        self._known_steps.add(job.step)
                    status, nbytes = self._commit(job, writer)
                    break
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:
                    self._stats["checkpoint_failures"] += 1
                    if attempt > self.max_retries or not _retriable(e):
                        job.error = e
                        self._stats["checkpoints_abandoned"] += 1
                        with self._lock:
                            self._lifecycle.abandoned(job.step)
                        if self.rank == 0:
                            self.log.error("%s", self._failure_message(job.step, e, attempt))
                            self._try_cleanup(job.step)
                        return
                    delay = self.retry_backoff * 2 ** (attempt - 1)
                    self._stats["checkpoint_retries"] += 1
                    if self.rank == 0:
                        self.log.warning(
                            "arc_dist: checkpoint step_%d attempt %d failed (%s); retrying in %.1fs",
                            job.step,
                            attempt,
                            _describe(e),
                            delay,
                        )
                    time.sleep(delay)
            elapsed = time.perf_counter() - t0
            self._after_commit(job, status, nbytes, elapsed)
        finally:
            with self._lock:
                self._in_flight, self._current = False, None
            job.state = None
            job.done.set()

    def _commit(self, job: _SaveJob, writer: HashingWriter) -> tuple[str, int]:
        """Gather every rank's file checksums; rank 0 writes the manifest; all learn the outcome."""
        records = self._all_gather(writer.records)
        outcome: tuple[str, str | None, int, str | None] = ("committed", None, 0, None)
        if self.rank == 0:
            try:
                files = {}
                for r in records:
                    files.update(r)
                if ".metadata" not in files:
                    raise RuntimeError("DCP finished without writing .metadata")
                with self._lock:
                    rejected = job.rejected
                if rejected:
                    outcome = ("rejected", None, 0, None)
                else:
                    if self.fault_hook is not None:
                        self.fault_hook("before_manifest", job.step)
                    manifest = make_manifest(
                        job.step,
                        self.world_size,
                        files,
                        checksum_algorithm=self.checksum,
                        config_digest=self.config_digest,
                        verdict=job.verdict,
                    )
                    self.storage.write_bytes_atomic(
                        f"{self.storage.step_path(job.step)}/{MANIFEST_NAME}", manifest.to_json()
                    )
                    if self.fault_hook is not None:
                        self.fault_hook("after_manifest", job.step)
                    outcome = ("committed", None, manifest.total_bytes, None)
            except Exception as e:
                outcome = ("failed", f"manifest not written: {type(e).__name__}: {e}", 0, _kind(e))
        status, detail, nbytes, kind = self._broadcast(outcome, self._io_group)
        if status == "failed":
            raise _CommitFailed(detail, kind)
        return status, nbytes

    def _try_cleanup(self, step: int) -> None:
        try:
            retention.uncommit(self.storage, self.storage.step_path(step))
            self._known_steps.discard(step)
        except Exception as e:  # storage still down: retention removes it after a later commit
            self.log.info("arc_dist: partial step_%d left in place (%s)", step, type(e).__name__)

    def _after_commit(self, job: _SaveJob, status: str, nbytes: int, elapsed: float) -> None:
        # on_rollback already counted a rejected save and told the lifecycle
        if status == "rejected":
            if self.rank == 0:
                self.log.info(
                    "arc_dist: checkpoint step_%d not committed: training rolled back past it",
                    job.step,
                )
                self._submit(lambda: self._try_cleanup(job.step))
            return
        with self._lock:
            self._stats["checkpoints"] += 1
            self._stats["last_committed_step"] = job.step
            self._stats["checkpoint_write_s"] = elapsed
            self._stats["checkpoint_bytes"] = nbytes
            # a rollback between the manifest and here makes the lifecycle retract it
            outcome = self._lifecycle.committed(job.step, healthy_verdict(job.verdict))
        if self.rank == 0:
            self.log.info(
                "arc_dist: checkpoint step_%d committed to %s (%.1f MB in %.2fs)",
                job.step,
                self.storage.display,
                nbytes / 1e6,
                elapsed,
            )
        # bookkeeping I/O after the save itself has returned (queued behind this job)
        self._carry_out(outcome, at=None)

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

    def _carry_out(self, outcome: Outcome, at: int | None) -> None:
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

    # -- load ----------------------------------------------------------------------------
    def load(self, app_state: dict) -> int | None:
        """Collective: load the newest usable checkpoint into ``app_state``; its step, or None."""
        self._check_open()
        self.wait()
        wire: Any = None
        if self.rank == 0:
            try:
                wire = [i.to_wire() for i in scan(self.storage)]
            except Exception as e:
                wire = f"{type(e).__name__}: {e}"
        wire = self._broadcast(wire, self._io_group)
        if isinstance(wire, str):
            raise CheckpointStorageError(
                f"arc_dist: cannot list checkpoints in {self.storage.display}: {wire}. Fix: check "
                "that the storage is reachable and storage_options are right"
            )
        infos = [CheckpointInfo.from_wire(w) for w in wire]
        committed = [i for i in infos if i.committed]
        if not committed:
            if self.rank == 0:
                partial = len(infos)
                self.log.info(
                    "arc_dist: no checkpoint in %s%s; starting fresh",
                    self.storage.display,
                    f" ({partial} incomplete step directories ignored)" if partial else "",
                )
            return None
        order = resume_order(infos)
        if not trusted(order[0]) and self.rank == 0:
            self.log.warning(
                "arc_dist: no checkpoint in %s was saved under a healthy verdict or confirmed; "
                "loading the newest committed one",
                self.storage.display,
            )
        tried = []
        for info in order:
            t0 = time.perf_counter()
            why = self._try_load(info, app_state)
            if why is None:
                self._after_load(info, infos, time.perf_counter() - t0)
                return info.step
            tried.append(f"step_{info.step} ({info.state}): {why}")
            if self.rank == 0:
                self.log.warning(
                    "arc_dist: checkpoint step_%d in %s is unusable: %s; trying an older one",
                    info.step,
                    self.storage.display,
                    why,
                )
        raise CheckpointError(
            f"arc_dist: no usable checkpoint in {self.storage.display}; tried {len(tried)}:\n  "
            + "\n  ".join(tried)
            + "\nFix: point checkpoint_dir at this model's checkpoints, or move damaged ones away "
            "(`arc-dist verify URL` lists what is wrong with each)"
        )

    def _try_load(self, info: CheckpointInfo, app_state: dict) -> str | None:
        """Every rank: None on success, else why ``info`` is unusable (the same on every rank).

        A checkpoint that is damaged or does not fit is skipped (the caller tries an older one);
        one that any rank could not *read* (``storage_fault``: an outage, expired credentials,
        a node without access) raises ``CheckpointStorageError`` on every rank: nothing says it
        is damaged, and falling back would silently lose the newest progress.
        """
        if info.manifest is None:
            if info.read_error is not None:
                self._unreadable(info, [f"rank 0: {info.read_error}"])
            return info.manifest_error or "manifest missing"
        names = sorted(info.manifest.files)
        why = fault = None
        if self.verify_on_load:
            try:
                why = "; ".join(verify(self.storage, info, names[self.rank :: self.world_size]))
            except Exception as e:  # every rank must still reach the gather below
                why, fault = self._classify(e, "verification failed")
        why = self._agree_on(info, why or None, fault)
        if why:
            return why

        url = self.storage.to_url(info.path)
        why = fault = None
        try:
            md = SafeReader(url, storage_options=self.storage.options).read_metadata()
            load_sd, dynamic, why = self._load_template(app_state, md)
        except ReshardError:
            raise  # the job must choose; every rank raises it here (same keys), nothing loaded
        except Exception as e:
            why, fault = self._classify(e, "DCP metadata unusable")
        why = self._agree_on(info, why, fault)
        if why:
            return why
        if info.manifest.world_size != self.world_size and self.rank == 0:
            self.log.info(
                "arc_dist: resharding step_%d from world size %d to %d",
                info.step,
                info.manifest.world_size,
                self.world_size,
            )
        why = fault = None
        try:
            # tensors load in place into the templates (the model's own parameters where
            # get_state_dict returns them); other values are set into the nested templates
            dcp.load(
                load_sd,
                storage_reader=SafeReader(url, storage_options=self.storage.options),
                planner=SafeLoadPlanner(flatten_sharded_tensors=False),
                **self._dcp_kwargs(),
            )
            for key, obj in app_state.items():
                if key in dynamic:
                    obj.load_state_dict(_rebuild(key, dynamic[key], load_sd, md, obj.state_dict()))
                elif hasattr(obj, "load_state_dict"):
                    obj.load_state_dict(load_sd[key])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            why, fault = self._classify(e, "loading failed")
        return self._agree_on(info, why, fault)

    def _classify(self, e: BaseException, what: str) -> tuple[str | None, str | None]:
        """(why the checkpoint is unusable, None) or (None, the storage fault that hid it)."""
        if any(storage_fault(x) for x in _flatten_failures(e)):
            return None, _describe(e)
        return f"{what}: {_describe(e)}", None

    def _agree_on(self, info: CheckpointInfo, why: str | None, fault: str | None) -> str | None:
        """Every rank: share each rank's outcome; raise on all when any rank could not read."""
        gathered = self._all_gather((why, fault))
        faults = [f"rank {r}: {f}" for r, (_, f) in enumerate(gathered) if f]
        if faults:
            self._unreadable(info, faults)
        return next((w for w, _ in gathered if w), None)

    def _unreadable(self, info: CheckpointInfo, faults: list[str]) -> None:
        raise CheckpointStorageError(
            f"arc_dist: checkpoint step_{info.step} in {self.storage.display} could not be read "
            f"({'; '.join(faults)}). It was not skipped for an older one: nothing says it is "
            "damaged. Fix: check that every node reaches the storage with valid credentials and "
            "read access; a restart (exit code 10) tries it again"
        )

    def _load_template(self, app_state: dict, md) -> tuple[dict, dict[str, list[str]], str | None]:
        """What DCP loads into, the checkpoint keys of each dynamic object, and what does not match.

        Objects with ``state_dict_for_load`` (``TrainState``, ``PerRank``) and plain values have a
        known structure: their current state is the template, compared key by key and shape by
        shape. Other ``Stateful`` objects (the controller's statistics, user objects) hold state
        whose shape is not known in advance; it is rebuilt from the checkpoint's own metadata.
        """
        saved = md.state_dict_metadata
        templates: dict[str, Any] = {}
        dynamic: dict[str, list[str]] = {}
        missing_objects = []
        strict: list[str] = []
        for key, obj in app_state.items():
            prefix = f"{key}."
            if hasattr(obj, "state_dict_for_load"):
                rel = {k[len(prefix) :] for k in saved if k.startswith(prefix)}
                templates[key] = obj.state_dict_for_load(rel)
                strict += [prefix + p for p in getattr(obj, "strict_prefixes", ())]
            elif hasattr(obj, "state_dict"):
                dynamic[key] = [k for k in saved if k == key or k.startswith(prefix)]
                if not dynamic[key]:
                    missing_objects.append(key)
            else:
                templates[key] = obj
        flat, _ = flatten_state_dict(templates)
        missing = [k for k in flat if k not in saved]
        mismatched = []
        for k, v in flat.items():
            m = saved.get(k)
            if m is None:
                continue
            if isinstance(v, torch.Tensor):
                if not isinstance(m, TensorStorageMetadata):
                    mismatched.append(f"{k}: a tensor here, not a tensor in the checkpoint")
                elif tuple(m.size) != tuple(v.size()):
                    mismatched.append(f"{k}: checkpoint {list(m.size)} vs model {list(v.size())}")
            elif isinstance(m, TensorStorageMetadata):
                mismatched.append(f"{k}: a tensor in the checkpoint, not here")
        unexpected = [k for k in saved if k not in flat and any(k.startswith(p) for p in strict)]
        reasons = []
        if missing_objects:
            reasons.append(f"no state for {missing_objects} in the checkpoint")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (
                    f", ... ({len(keys) - 8} more)" if len(keys) > 8 else ""
                )
                reasons.append(f"{label}: {shown}")
        load_sd = dict(templates)
        for keys in dynamic.values():
            for k in keys:
                m = saved[k]
                # a top-level key that is the flat FQN itself: DCP's flattening maps it to itself
                load_sd[k] = (
                    torch.empty(m.size, dtype=m.properties.dtype)
                    if isinstance(m, TensorStorageMetadata)
                    else None
                )
        why = "does not match the model: " + "; ".join(reasons) if reasons else None
        return load_sd, dynamic, why

    def _after_load(
        self, info: CheckpointInfo, infos: list[CheckpointInfo], elapsed: float
    ) -> None:
        self._loaded_step = info.step
        with self._lock:
            self._lifecycle.loaded(infos, info.step)
            self._stats["last_committed_step"] = info.step
            if info.confirmed:
                self._stats["last_confirmed_step"] = info.step
        if self.rank == 0:
            newer = [f"step_{i.step}" for i in infos if i.committed and i.step > info.step]
            self.log.info(
                "arc_dist: resumed from step_%d (%s%s, saved at world size %d) in %.2fs%s",
                info.step,
                info.state,
                "" if trusted(info) else f", verdict {info.manifest.verdict.get('status')}",
                info.manifest.world_size if info.manifest else -1,
                elapsed,
                f"; newer {', '.join(newer)} left in place" if newer else "",
            )

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
