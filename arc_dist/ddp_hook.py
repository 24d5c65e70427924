"""The DDP hook: the step's health signals ride on DDP's own gradient all-reduce.

:class:`DDPRide` is installed as DDP's communication hook and owns everything that riding
takes: the hook, what it carries from one step to the next (the previous step's loss and busy
time) and the count of steps judged from it alone. The controller asks it one question per
step, :meth:`DDPRide.judge`: the agreed matrix and verdict when the step can be judged from what
rode, or ``(None, None)`` to take the collective path (agreement.py). A job that registered its
own comm hook keeps it, and every step takes the collective path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .agreement import Agreement
from .layout import uncompiled
from .lr import LRGuard
from .policy import HealthPolicy, Status, Verdict
from .preemption import PreemptionHandler
from .signals import DEEP_COLS, NUM_COLS, Col, sq_norm

log = logging.getLogger("arc_dist")

#: the squared norms that lead DEEP_COLS (the state flags follow)
_NORMS = 4


@dataclass(frozen=True, slots=True)
class Ride:
    """What one backward's all-reduce carried (its tensors are reused by the next backward)."""

    #: the global gradient squared norm (of the reduced buckets, or the job's), None: unmeasured
    grad_sq: torch.Tensor | None
    #: this rank's own bucket-0 norm before averaging (which rank a fault came from)
    local_grad_norm: torch.Tensor
    #: the agreed ``[world_size, NUM_COLS]`` float64 matrix, one row per rank
    matrix: torch.Tensor
    #: this step's deep check was to ride (every rank agrees; :meth:`DDPRide.judge` checks that
    #: every row carries it, ``Col.DEEP``)
    deep: bool = False

    @property
    def local_grad_sq(self) -> torch.Tensor:
        """The squared ``local_grad_norm`` in float64 (only the collective path needs it)."""
        return self.local_grad_norm.to(torch.float64).square()


class DDPRide:
    """Carries the step's signals inside DDP's gradient all-reduce (no collective of our own).

    For every bucket the hook divides by the world size and all-reduces as DDP's default hook
    does, and keeps a reference to the bucket; after backward one ``_foreach_norm`` over the
    *reduced* buckets' flat buffers gives the global gradient norm, with no extra communication
    and no Python callback per bucket beyond the one that hands DDP its tensor. Bucket 0 (the
    first reduced, capped at 1 MiB by DDP) additionally carries a zero
    ``[world_size, NUM_COLS]`` matrix in which this rank filled its own row (see agreement.py):
    what is known before backward (this step's LR ratio, SIGTERM) and what the previous step
    measured (its loss, busy time), plus the norm of this rank's own bucket-0 gradients before
    averaging (which rank a NaN or an explosion came from). On a deep-check step the row also
    carries the deep check (``deep()``, see signals.py: the weights and optimizer state, which
    backward does not change), so that step needs no collective of its own either. Every rank
    judges from these replicated values and the matrix; only an anomaly, a snapshot or
    divergence-check step, the step after a skip or a missing ride costs a collective of its own.

    Nothing is allocated per step once the buffers exist: bucket 0 and the matrix share one
    buffer, the host-known columns one host row, the float64 matrix one tensor, all reused
    (reallocated only when DDP rebuilds its buckets). Under ``gradient_as_bucket_view=True``
    the buckets are the gradients, so the norm is of the gradients as ``Arc.step`` finds them
    (after any in-place clipping or unscaling by the loop, as on the collective path).

    ``explain`` maps a failed all-reduce's error to the one backward should raise (the error of
    the rank that failed first, see failfast.py).
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, process_group, *,
                 agree: Agreement, policy: HealthPolicy, lr: LRGuard,
                 preemption: PreemptionHandler, amp: bool = False,
                 explain: Callable[[Exception], Exception] | None = None,
                 deep: Callable[[], list[torch.Tensor] | None] | None = None):  # fmt: skip
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._agree, self._policy, self._amp = agree, policy, amp
        self._lr, self._preemption = lr, preemption
        #: during backward: this step's deep-check values when they ride (DEEP_COLS), else None
        self._deep = deep
        self._deep_rode = False  # this backward's row carries the deep check
        self._deep_due = False  # ... was to carry it (the same on every rank)
        #: the buckets of the current backward, reduced once it ends (their norms: the global one)
        self._bufs: list[torch.Tensor] = []
        # reused every step: bucket 0 followed by the matrix (one all-reduce), this rank's own
        # bucket-0 norm, the host-known columns of its row, the matrix in float64
        self._both: torch.Tensor | None = None
        self._local0: torch.Tensor | None = None
        self._host = torch.zeros(NUM_COLS, dtype=torch.float64)
        self._host_np = self._host.numpy()
        self._m64: torch.Tensor | None = None
        self._deep_idx: torch.Tensor | None = None  # DEEP_COLS, and its squared norms' part
        self._sq_idx: torch.Tensor | None = None
        self._arrived = False  # this backward's matrix came back reduced
        #: when this rank's last gradient bucket was ready (its own work done, no waiting)
        self.ready_at: float | None = None
        #: steps judged from the ride alone (no collective of our own)
        self.fast_steps = 0
        # carried to the next backward: this step's loss (None after a skip or a restore),
        # whether this step judged it already (the collective path), and its busy time
        self._loss: torch.Tensor | None = None
        self._loss_judged = True
        self._busy = 0.0

        def value(fut) -> torch.Tensor:
            try:
                return fut.value()[0]
            except Exception as e:
                better = explain(e) if explain is not None else e
                if better is e:
                    raise
                raise better from e

        def hook(pg, bucket):
            buf = bucket.buffer()
            self.ready_at = time.monotonic()
            first = bucket.index() == 0
            if first:  # DDP reduces bucket 0 first: a new backward
                self._bufs.clear()
            self._bufs.append(buf)
            if not first or buf.dtype not in (torch.float32, torch.float64):
                buf.div_(self.world_size)
                return dist.all_reduce(buf, group=pg, async_op=True).get_future().then(value)
            n = buf.numel()
            both, local = self._bucket0(buf)
            torch.linalg.vector_norm(buf, out=local)  # this rank's own, before averaging
            torch.div(buf, self.world_size, out=both[:n])
            mat = both[n:]
            mat.zero_()
            try:
                deep = self._deep() if self._deep is not None else None
                due = deep is not None
            except Exception:  # noqa: BLE001 - raised again inside Arc.step, where every rank
                deep, due = None, True  # learns of it (failfast.py); here the others would wait
            self._fill_row(mat[self.rank * NUM_COLS : (self.rank + 1) * NUM_COLS], local, deep)
            self._deep_rode, self._deep_due = deep is not None, due

            def split(fut) -> torch.Tensor:
                buf.copy_(value(fut)[:n])
                self._arrived = True
                return buf

            return dist.all_reduce(both, group=pg, async_op=True).get_future().then(split)

        ddp.register_comm_hook(process_group, hook)

    @classmethod
    def attach(cls, model: nn.Module, *, rank: int, world_size: int, **kwargs) -> DDPRide | None:
        """The ride on ``model``'s DDP all-reduce, or None when the signals cannot ride there:
        no DDP, one rank, DDP over another group than Arc's, or a comm hook of the job's own."""
        ddp = uncompiled(model)
        if not (
            isinstance(ddp, nn.parallel.DistributedDataParallel)
            and world_size > 1
            # the ride's matrix has a row per rank of DDP's group: it must be Arc's group
            and dist.get_world_size(ddp.process_group) == world_size
            and dist.get_rank(ddp.process_group) == rank
        ):
            return None
        try:
            return cls(ddp, ddp.process_group, **kwargs)
        except RuntimeError as e:  # the job registered its own comm hook
            log.info("arc_dist: keeping the job's DDP comm hook (%s); one collective per step", e)
            return None

    def _bucket0(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reused buffer for bucket 0 and the matrix, and the one for this rank's own norm
        (reallocated when DDP rebuilt its buckets)."""
        size = buf.numel() + self.world_size * NUM_COLS
        both = self._both
        if (
            both is None
            or both.numel() != size
            or both.dtype != buf.dtype
            or both.device != buf.device
        ):
            self._both = both = buf.new_zeros(size)
            self._local0 = buf.new_zeros(())
            self._m64 = torch.zeros(
                self.world_size, NUM_COLS, dtype=torch.float64, device=buf.device
            )
            # index tensors on the device once: a Python list index would build one every step
            self._deep_idx = torch.tensor(DEEP_COLS, device=buf.device)
            self._sq_idx = self._deep_idx[:_NORMS]
        return both, self._local0

    def _fill_row(
        self, row: torch.Tensor, local: torch.Tensor, deep: list[torch.Tensor] | None
    ) -> None:
        """Called from the hook during backward: this rank's row of what bucket 0 carries, the
        previous step's loss (if any; ``LOSS_JUDGED`` when its own step judged it already),
        this step's LR and SIGTERM flag, the previous step's busy time, this rank's own
        bucket-0 gradient norm, squared, and on a deep-check step the deep check. Its squared
        norms travel as norms (squared back in float64 by :meth:`take`): the bucket's float32
        would overflow on squares that float64 holds."""
        h = self._host_np
        h[:] = 0.0
        h[Col.DEEP] = float(deep is not None)
        h[Col.LR_RATIO], h[Col.LR] = self._lr.ratio(), max(self._lr.lrs())
        h[Col.STEP_TIME], h[Col.PREEMPT] = self._busy, float(self._preemption.requested)
        h[Col.LOSS_VALID], h[Col.LOSS_JUDGED] = float(self._loss is not None), self._loss_judged
        # non-blocking: no stream sync inside backward; a pageable source is staged before the
        # call returns, so the host row can be refilled next step
        row.copy_(self._host, non_blocking=True)
        if self._loss is not None:
            row[Col.LOSS].copy_(self._loss.reshape(()))
        torch.square(local, out=row[Col.LOCAL_GRAD_SQ])
        if deep is not None:
            vals = torch.stack([v.to(torch.float64) for v in deep])
            vals[:_NORMS] = vals[:_NORMS].sqrt()
            row[self._deep_idx] = vals.to(row)

    # -- one step ------------------------------------------------------------------------
    def take(self) -> Ride | None:
        """What this step's backward carried, or None when no synchronised backward ran."""
        if not self._arrived:
            self._bufs.clear()
            return None
        self._arrived = False
        n = self._both.numel() - self.world_size * NUM_COLS
        self._m64.copy_(self._both[n:].view(self.world_size, NUM_COLS))
        if self._deep_rode:
            sq = self._sq_idx
            self._m64[:, sq] = self._m64[:, sq].square()
        return Ride(None, self._local0, self._m64, self._deep_due)

    def with_grad_norm(self, ride: Ride | None, user_sq: torch.Tensor | None) -> Ride | None:
        """``ride`` with its global gradient norm: the job's (``user_sq``) when it passes one,
        else one ``_foreach_norm`` over the reduced buckets."""
        if ride is None:
            return None
        grad_sq = user_sq if user_sq is not None else sq_norm(self._bufs, self._m64.device)
        return Ride(grad_sq, ride.local_grad_norm, ride.matrix, ride.deep)

    def judge(self, ride: Ride) -> tuple[np.ndarray, Verdict] | tuple[None, None]:
        """The agreed matrix and verdict from what rode; ``(None, None)`` sends the step down the
        collective path, which every rank decides identically (replicated inputs only), to
        judge this step's own signals with exact blame, and the previous step's loss that rode
        here as its late loss."""
        ride.matrix[:, Col.GRAD_SQ] = ride.grad_sq  # reduced gradients: the same on every rank
        m = self._agree.to_host(ride.matrix)
        if ride.deep and not m[:, Col.DEEP].all():  # a rank could not take its deep check
            return None, None
        verdict = self._policy.judge(m, amp=self._amp)
        if verdict.status != Status.HEALTHY or m[:, Col.PREEMPT].any():
            return None, None
        return m, verdict

    def late_loss(self) -> torch.Tensor | None:
        """The previous step's loss when it rode here and nothing judged it yet: the collective
        path judges it (never dropped)."""
        return None if self._loss_judged else self._loss

    def judged(self, *, fast: bool, busy: float) -> None:
        """Every rank holds the step's verdict; ``fast``: judged from the ride alone."""
        self.fast_steps += fast
        self._busy = busy

    def carry(self, loss: torch.Tensor | None, *, judged: bool) -> None:
        """The loss the next backward carries (None: none, after a skip); ``judged`` when this
        step judged it (on the fast path nothing has: the next step does)."""
        self._loss = loss
        self._loss_judged = judged

    def forget(self) -> None:
        """After a restore: the carried loss belongs to another trajectory."""
        self._loss = None

    def work_end(self, start: float, last_end: float) -> float:
        """When this rank's own work on the step ended: its last gradient bucket was ready
        (waiting for other ranks in the all-reduce excluded), else ``start``."""
        ready = self.ready_at
        return ready if ready is not None and ready > last_end else start
