"""Saving a durable checkpoint: stage, write through DCP, commit with retries, off the training
thread.

``Saving`` is the save half of :class:`~arc_dist.checkpoint.manager.CheckpointManager` (a mixin:
it uses the manager's storage, rank, groups, lifecycle, worker thread and counters). The commit
protocol and the one-save-in-flight rule are described in the manager's docstring.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.utils._pytree import tree_map

from ..layout import is_dtensor, local_tensor
from . import retention
from .dcp_io import HashingWriter
from .errors import CheckpointStorageError, CommitFailed, describe, error_kind, fix_hint, retriable
from .lifecycle import healthy_verdict
from .manifest import MANIFEST_NAME, make_manifest


class Stager(DefaultStager):
    """DCP's stager, reused so its CPU buffers are too (cached per source storage); staging is
    synchronous (no future)."""

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


class _Lent:
    """Stands for a borrowed host tensor while the rest of the state is staged."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __deepcopy__(self, memo: dict) -> _Lent:
        return self


@dataclasses.dataclass(eq=False)
class SaveJob:
    step: int
    verdict: dict
    blocking: bool
    state: dict | None = None
    #: the snapshot loan the staged state borrows from (``snapshot.Loan``); released when done
    loan: Any = None
    writer: HashingWriter | None = None  # the first attempt's, made before the ranks agree
    rejected: bool = False
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class Saving:
    """The manager's save path (see the module docstring)."""

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
        loan: Any = None,
    ) -> None:
        """Collective: checkpoint ``app_state`` as ``step_<step>``.

        ``blocking=False`` writes in the background; ``None`` uses the constructor's
        ``async_save``. A blocking save raises
        :class:`CheckpointStorageError` when every attempt failed; a background save logs and
        counts its failure instead, and training goes on.

        ``loan``: host copies of this very state (``SnapshotStore.lend``: an in-memory snapshot
        taken at this step boundary); a background save writes them instead of copying the
        tensors again. Released (on every path) once the save no longer reads them.
        """
        handed = False
        try:
            handed = self._save(step, app_state, verdict, blocking, loan)
        finally:
            if loan is not None and not handed:
                loan.release()

    def _save(self, step, app_state, verdict, blocking, loan) -> bool:
        """``save``; True when a background write took ``loan`` over."""
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
            return False
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
            job = SaveJob(step, verdict, True, state=state)
            self._start(job)
            self._submit(lambda: self._run_save(job))
            job.done.wait()
            if job.error is not None:
                raise CheckpointStorageError(self._failure_message(job.step, job.error)) from None
            return False

        with self._lock:
            busy = self._in_flight
        if self._any_rank(busy):
            self._stats["checkpoints_skipped"] += 1
            self._emit("checkpoint_skip", step)
            if self.rank == 0:
                self.log.info(
                    "arc_dist: checkpoint at step %d skipped: the previous save is still writing "
                    "(raise checkpoint_every if this repeats)",
                    step,
                )
            return False
        t0 = time.perf_counter()
        job = SaveJob(step, verdict, False, loan=loan)
        self._start(job)
        # everything that can fail on one rank alone (staging: a pinned allocation, host memory,
        # a user object's state_dict) happens before DCP, and every rank agrees on the outcome:
        # a rank that skipped DCP would leave the others in its collectives until they time out
        error: BaseException | None = None
        try:
            job.state = self._stage(self._state_dict(app_state), loan)
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
            self._emit("checkpoint_failure", step, attempts_failed=1, abandoned=True)
            why = error if error is not None else RuntimeError("another rank could not stage")
            self.log.error("[rank %d] %s", self.rank, self._failure_message(step, why))
            return False
        self._stats["checkpoint_stall_s"] = time.perf_counter() - t0
        self._submit(lambda: self._run_save(job))
        return True

    def _stage(self, state: dict, loan: Any) -> dict:
        """Training thread: a host copy of ``state`` that the write reads while training goes on.
        Tensors ``loan`` holds copies of are borrowed; the rest are copied into the stager's
        reused buffers (pinned on CUDA)."""
        lent: list = []
        copied = 0

        def pick(obj: Any) -> Any:
            nonlocal copied
            if not isinstance(obj, torch.Tensor):
                return obj
            host = loan.host(obj) if loan is not None and not is_dtensor(obj) else None
            if host is None:
                local = local_tensor(obj)
                copied += local.numel() * local.element_size()
                return obj
            lent.append(host)
            return _Lent(len(lent) - 1)

        staged = self._stager.stage(tree_map(pick, state))
        self._stats["checkpoint_staged_bytes"] = copied
        if not lent:
            return staged
        return tree_map(lambda v: lent[v.index] if isinstance(v, _Lent) else v, staged)

    def _start(self, job: SaveJob) -> None:
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
            f"{tries}: {describe(e)}. Earlier checkpoints are untouched. Fix: {fix_hint(e)}"
        )

    def _run_save(self, job: SaveJob) -> None:
        """Worker thread, every rank: finish (or redo) the DCP write, then commit."""
        t0 = time.perf_counter()
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    writer = (
                        job.writer
                        if attempt == 1 and job.writer is not None
                        else self._writer(job.step)
                    )
                    if self.rank == 0:
                        # a retry, or a save of a step that exists: start clean (DCP's planning
                        # collective below keeps the others from writing first)
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
                    final = attempt > self.max_retries or not retriable(e)
                    self._emit("checkpoint_failure", job.step, attempts_failed=1, abandoned=final)
                    # said before it is counted: whoever sees the count can read why
                    if final:
                        job.error = e
                        if self.rank == 0:
                            self.log.error("%s", self._failure_message(job.step, e, attempt))
                        self._stats["checkpoints_abandoned"] += 1
                        with self._lock:
                            self._lifecycle.abandoned(job.step)
                        if self.rank == 0:
                            self._try_cleanup(job.step)
                        return
                    delay = self.retry_backoff * 2 ** (attempt - 1)
                    if self.rank == 0:
                        self.log.warning(
                            "arc_dist: checkpoint step_%d attempt %d failed (%s); retrying in %.1fs",
                            job.step,
                            attempt,
                            describe(e),
                            delay,
                        )
                    self._stats["checkpoint_retries"] += 1
                    time.sleep(delay)
            elapsed = time.perf_counter() - t0
            self._after_commit(job, status, nbytes, elapsed)
        finally:
            with self._lock:
                self._in_flight, self._current = False, None
            job.state = None
            if job.loan is not None:
                job.loan.release()
            job.done.set()

    def _commit(self, job: SaveJob, writer: HashingWriter) -> tuple[str, int]:
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
                outcome = (
                    "failed",
                    f"manifest not written: {type(e).__name__}: {e}",
                    0,
                    error_kind(e),
                )
        status, detail, nbytes, kind = self._broadcast(outcome, self._io_group)
        if status == "failed":
            raise CommitFailed(detail, kind)
        return status, nbytes

    def _try_cleanup(self, step: int) -> None:
        try:
            retention.uncommit(self.storage, self.storage.step_path(step))
            self._known_steps.discard(step)
        except Exception as e:  # storage still down: retention removes it after a later commit
            self.log.info("arc_dist: partial step_%d left in place (%s)", step, type(e).__name__)

    def _after_commit(self, job: SaveJob, status: str, nbytes: int, elapsed: float) -> None:
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
            stall = self._stats["checkpoint_stall_s"]
        self._emit("checkpoint_commit", job.step, bytes=nbytes, seconds=elapsed, stall_s=stall)
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
