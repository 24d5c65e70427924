"""Local health signals: what one rank measures about its own step, packed into one row.

Everything here runs on the device with ``torch._foreach_*`` ops and returns tensors; nothing
syncs with the host. The row layout (:class:`Col`) is shared by every rank, so after the
agreement step every rank holds the same ``[world_size, NUM_COLS]`` matrix.

Which ranks hold which part of the model decides how a column is combined across ranks:

* ``replicated`` (DDP, or a single process): gradients after backward and weights are the same
  on every rank, so each rank's norm is already the global one;
* ``sharded`` (FSDP2, ``DTensor`` parameters): each rank holds a disjoint shard, so squared norms
  add up across ranks (with HSDP the replicas repeat shards; see docs/design.md);
* ``independent`` (a plain module on several ranks without DDP): each rank trains its own
  replica and the worst rank decides.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .silent import fingerprint as param_fingerprint

try:  # DTensor is public from torch 2.4 on; FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = ()  # type: ignore[assignment,misc]


class Col(enum.IntEnum):
    """Columns of a rank's signal row (float64)."""

    LOSS = 0  # this rank's loss (NaN/Inf kept as is)
    GRAD_SQ = 1  # squared L2 norm of the gradients this rank holds
    WEIGHT_SQ = 2  # squared L2 norm of the weights (deep-check steps only, else 0)
    STATE_SQ = 3  # squared norm of the optimizer's floating state (deep-check steps only)
    STATE_FLAGS = 4  # OptimizerStateFlag bits found on this rank (deep-check steps only)
    STATE_STEP = 5  # the optimizer's step counter (max over parameters), -1 when absent
    LR_RATIO = 6  # max over param groups of lr / lr the scheduler (or previous step) explains
    STEP_TIME = 7  # seconds this rank was busy this step (see silent.py)
    PREEMPT = 8  # 1 when this rank received SIGTERM
    DEEP = 9  # 1 on steps where the deep checks ran (all ranks agree on this)
    FINGERPRINT = 10  # bit-pattern checksum of the parameters (divergence-check steps only)
    FP_CHECK = 11  # 1 on steps where the fingerprints are compared


NUM_COLS = len(Col)


class StateFlag(enum.IntFlag):
    """Structural problems of the optimizer state, OR-ed into ``Col.STATE_FLAGS``."""

    MISSING = 1  # parameters that were updated before have no state now
    INCONSISTENT_STEP = 2  # step counters differ between parameters


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t  # type: ignore[attr-defined]


def layout_of(model: nn.Module, world_size: int) -> str:
    """``"replicated"``, ``"sharded"`` or ``"independent"`` (see the module docstring)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "sharded"
    if world_size == 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return "replicated"
    return "independent"


def sq_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all elements, as a float64 0-d tensor on ``device``.

    One ``_foreach_norm`` launch per (device, dtype) group; the per-tensor norms are squared and
    summed in float64 so that a large but finite norm does not overflow float32.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    parts = []
    for ts in groups.values():
        # _foreach_norm squares in the input dtype and overflows for |x| ~ 1e19 in fp32; the
        # upcast only touches the per-tensor norms, and an overflow still reads as explosion.
        norms = torch.stack(torch._foreach_norm(ts)).to(torch.float64)
        parts.append(norms.square().sum().to(device))
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [_local(p.grad) for p in params if p.grad is not None]


def weights_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [_local(p.detach()) for p in params]


class SignalCollector:
    """Builds this rank's signal row for one step, on the device, without a host sync."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        fingerprint_optimizer: bool = False,
    ):
        self.optimizer = optimizer
        self.fingerprint_optimizer = fingerprint_optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.model_params = list(model.parameters())
        self.device = device
        # parameters that had optimizer state at the previous deep check: fewer now = a reset
        self._with_state = 0

    def row(
        self,
        loss: torch.Tensor,
        *,
        deep: bool,
        grad_sq: torch.Tensor | None = None,
        lr_ratio: float = 1.0,
        step_time: float = 0.0,
        preempt: bool = False,
        fingerprint: bool = False,
    ) -> torch.Tensor:
        dev, f64 = self.device, torch.float64
        zero = torch.zeros((), dtype=f64, device=dev)
        if grad_sq is None:
            grad_sq = sq_norm(grads_of(self.params), dev)
        if deep:
            weight_sq = sq_norm(weights_of(self.model_params), dev)
            state_sq, step_max, flags = self._optimizer_state()
        else:
            weight_sq, state_sq, flags = zero, zero, zero
            step_max = torch.full((), -1.0, dtype=f64, device=dev)
        fp = param_fingerprint(self.model_params + self._state_tensors(), dev) if fingerprint else zero
        host = torch.tensor([lr_ratio, step_time, float(preempt), float(deep)], dtype=f64)
        return torch.cat(
            [
                torch.stack(
                    [
                        loss.detach().reshape(()).to(device=dev, dtype=f64),
                        grad_sq.to(device=dev, dtype=f64),
                        weight_sq,
                        state_sq,
                        flags,
                        step_max,
                    ]
                ),
                host.to(dev, non_blocking=True),
                torch.stack([fp, torch.full((), float(fingerprint), dtype=f64, device=dev)]),
            ]
        )

    def _optimizer_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(state sq-norm, max step counter, StateFlag bits) as float64 device tensors.

        Floating tensors other than ``step`` count towards the norm (Adam's moments, SGD's
        momentum). Step counters are compared on the device: min != max means inconsistent.
        This walks the state dict (a Python loop over parameters), so it only runs on
        deep-check steps.
        """
        dev, f64 = self.device, torch.float64
        floats: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        with_state = 0
        for p in self.params:
            st = self.optimizer.state.get(p)
            if not st:
                continue
            with_state += 1
            for key, v in st.items():
                if key == "step":
                    steps.append(
                        _local(v).reshape(()).to(dev, f64)
                        if isinstance(v, torch.Tensor)
                        else torch.tensor(float(v), dtype=f64, device=dev)
                    )
                elif isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    floats.append(_local(v))
        missing = float(StateFlag.MISSING) if with_state < self._with_state else 0.0
        self._with_state = max(self._with_state, with_state)
        flags = torch.full((), missing, dtype=f64, device=dev)
        if steps:
            s = torch.stack(steps)
            step_max = s.max()
            flags = flags + (step_max != s.min()).to(f64) * float(StateFlag.INCONSISTENT_STEP)
        else:
            step_max = torch.full((), -1.0, dtype=f64, device=dev)
        return sq_norm(floats, dev), step_max, flags

    def _state_tensors(self) -> list[torch.Tensor]:
        if not self.fingerprint_optimizer:
            return []
        return [
            _local(v)
            for p in self.params
            for k, v in self.optimizer.state.get(p, {}).items()
            if isinstance(v, torch.Tensor) and k != "step"
        ]

    def reset_expectations(self) -> None:
        """After a restore the optimizer state is what the snapshot held; relearn its size."""
        self._with_state = 0


class DDPLocalGradNorm:
    """Measures each rank's own gradients before DDP averages them, through DDP's comm hook.

    After DDP's all-reduce every rank holds the same gradients, so a gradient explosion that
    started on one rank can no longer be traced to it. The hook reads each bucket's flat buffer
    (one norm kernel per bucket) right before handing it to DDP's default all-reduce, which
    also saves a second pass over the gradients later. A job that registered its own comm hook
    keeps it; the controller then falls back to norms of the reduced gradients.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, process_group=None):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self._norms: list[torch.Tensor] = []
        self._allreduce = default_hooks.allreduce_hook

        #: when this rank's last gradient bucket was ready (its own work done, no waiting)
        self.ready_at: float | None = None

        def hook(pg, bucket):
            self._norms.append(bucket.buffer().detach().norm())
            self.ready_at = time.monotonic()
            return self._allreduce(pg, bucket)

        ddp.register_comm_hook(process_group, hook)

    def take(self) -> torch.Tensor | None:
        """Squared local norm of this step's gradients (float64), or None if no backward ran."""
        if not self._norms:
            return None
        sq = torch.stack(self._norms).to(torch.float64).square().sum()
        self._norms.clear()
        return sq
