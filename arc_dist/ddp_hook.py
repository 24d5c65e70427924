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
from .signals import NUM_COLS, Col

log = logging.getLogger("arc_dist")


@dataclass(frozen=True, slots=True)
class Ride:
    """What one backward's all-reduce carried."""

    #: the global gradient squared norm (of the reduced buckets, or the job's), None: unmeasured
    grad_sq: torch.Tensor | None
    #: this rank's own bucket-0 squared norm before averaging (which rank a fault came from)
    local_grad_sq: torch.Tensor
    #: the agreed ``[world_size, NUM_COLS]`` matrix, one row per rank
    matrix: torch.Tensor


def ride_row(
    local_grad_norm: torch.Tensor,
    loss: torch.Tensor | None,
    *,
    lr_ratio: float,
    lr: float,
    busy: float,
    preempt: bool,
    loss_judged: bool = False,
) -> torch.Tensor:
    """The row bucket 0 carries: the previous step's loss (if any; ``loss_judged`` when its own
    step judged it already), this step's LR and SIGTERM flag, the previous step's busy time and
    this rank's own bucket-0 gradient norm."""
    dev = local_grad_norm.device
    row = torch.zeros(NUM_COLS, dtype=torch.float64, device=dev)
    host = [lr_ratio, lr, busy, float(preempt), float(loss is not None), float(loss_judged)]
    cols = [Col.LR_RATIO, Col.LR, Col.STEP_TIME, Col.PREEMPT, Col.LOSS_VALID, Col.LOSS_JUDGED]
    row[cols] = torch.tensor(host, dtype=torch.float64).to(dev, non_blocking=True)
    if loss is not None:
        row[Col.LOSS] = loss.reshape(()).to(dev, torch.float64)
    row[Col.LOCAL_GRAD_SQ] = local_grad_norm.to(torch.float64).square()
    return row


class DDPRide:
    """Carries the step's signals inside DDP's gradient all-reduce (no collective of our own).

    For every bucket the hook divides by the world size and all-reduces as DDP's default hook
    does, then takes the norm of the *reduced* bucket, so the global gradient norm costs one pass
    over contiguous buffers and no extra communication. Bucket 0 (the first reduced, capped at
    1 MiB by DDP) additionally carries a zero ``[world_size, NUM_COLS]`` matrix in which this
    rank filled its own row (see agreement.py): what is known before backward (this step's LR
    ratio, SIGTERM) and what the previous step measured (its loss, busy time), plus the norm of
    this rank's own bucket-0 gradients before averaging (which rank a NaN or an explosion came
    from). Every rank judges from these replicated values and the matrix; only an anomaly, a
    deep-check step or a missing ride costs a collective of its own.

    ``explain`` maps a failed all-reduce's error to the one backward should raise (the error of
    the rank that failed first, see failfast.py).
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, process_group, *,
                 agree: Agreement, policy: HealthPolicy, lr: LRGuard,
                 preemption: PreemptionHandler, amp: bool = False,
                 explain: Callable[[Exception], Exception] | None = None):  # fmt: skip
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._agree, self._policy, self._amp = agree, policy, amp
        self._lr, self._preemption = lr, preemption
        self._post: list[torch.Tensor] = []
        self._local0: torch.Tensor | None = None
        self._matrix: torch.Tensor | None = None
        #: when this rank's last gradient bucket was ready (its own work done, no waiting)
        self.ready_at: float | None = None
        #: take norms of the reduced buckets (off when the job hands Arc its clipping norm)
        self.measure = True
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

        def reduced(fut) -> torch.Tensor:
            t = value(fut)
            if self.measure:
                self._post.append(t.norm())
            return t

        def hook(pg, bucket):
            buf = bucket.buffer()
            self.ready_at = time.monotonic()
            buf.div_(self.world_size)
            if bucket.index() != 0 or buf.dtype not in (torch.float32, torch.float64):
                fut = dist.all_reduce(buf, group=pg, async_op=True).get_future()
                return fut.then(reduced)
            self._local0 = buf.norm() * self.world_size  # undo the division: this rank's own
            # one buffer: the bucket, then the zero matrix with this rank's row filled in
            n, row_at = buf.numel(), buf.numel() + self.rank * NUM_COLS
            both = buf.new_zeros(n + self.world_size * NUM_COLS)
            both[:n] = buf
            both[row_at : row_at + NUM_COLS] = self._row(self._local0)

            def split(fut) -> torch.Tensor:
                out = value(fut)
                buf.copy_(out[:n])
                self._matrix = out[n:].view(self.world_size, NUM_COLS)
                if self.measure:
                    self._post.append(buf.norm())
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

    def _row(self, local_grad_norm: torch.Tensor) -> torch.Tensor:
        """Called from the hook during backward: what bucket 0 carries for this rank."""
        return ride_row(
            local_grad_norm,
            self._loss,
            lr_ratio=self._lr.ratio(),
            lr=max(self._lr.lrs()),
            busy=self._busy,
            preempt=self._preemption.requested,
            loss_judged=self._loss_judged,
        )

    # -- one step ------------------------------------------------------------------------
    def take(self) -> Ride | None:
        """What this step's backward carried, or None when no synchronised backward ran."""
        if self._matrix is None or self._local0 is None:
            self._post.clear()
            return None
        post = torch.stack(self._post).to(torch.float64).square().sum() if self._post else None
        out = Ride(post, self._local0.to(torch.float64).square(), self._matrix.to(torch.float64))
        self._post.clear()
        self._matrix = self._local0 = None
        return out

    def with_grad_norm(
        self, ride: Ride | None, user_sq: torch.Tensor | None, measure: Callable[[], torch.Tensor]
    ) -> Ride | None:
        """``ride`` with its global gradient norm: the job's (``user_sq``) when it passes one,
        else the reduced buckets' (``measure()`` when they were not measured). The hook measures
        from the next backward on exactly when the job passes none."""
        self.measure = user_sq is None
        if ride is None or (user_sq is None and ride.grad_sq is not None):
            return ride
        grad_sq = user_sq if user_sq is not None else measure()
        return Ride(grad_sq, ride.local_grad_sq, ride.matrix)

    def judge(self, ride: Ride) -> tuple[np.ndarray, Verdict] | tuple[None, None]:
        """The agreed matrix and verdict from what rode; ``(None, None)`` sends the step down the
        collective path, which every rank decides identically (replicated inputs only), to
        judge this step's own signals with exact blame, and the previous step's loss that rode
        here as its late loss."""
        ride.matrix[:, Col.GRAD_SQ] = ride.grad_sq  # reduced gradients: the same on every rank
        m = self._agree.to_host(ride.matrix)
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
