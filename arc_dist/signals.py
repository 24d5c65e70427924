"""Local health signals: what one rank measures about its own step, packed into one row.

Everything here runs on the device with ``torch._foreach_*`` ops and returns tensors; nothing
syncs with the host. The row layout (:class:`Col`) is shared by every rank, so after the
agreement step every rank holds the same ``[world_size, NUM_COLS]`` matrix.

How a column is combined across ranks follows from the model's layout (layout.py).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layout import Layout, is_dtensor, local_tensor
from .silent import fingerprint as param_fingerprint


class Col(enum.IntEnum):
    """Columns of a rank's signal row (float64)."""

    LOSS = 0  # this rank's loss (NaN/Inf kept as is)
    GRAD_SQ = 1  # squared L2 norm of the gradients this rank holds
    WEIGHT_SQ = 2  # squared L2 norm of the weights (deep-check steps only, else 0)
    STATE_SQ = 3  # squared norm of the optimizer's floating state (deep-check steps only)
    STATE_FLAGS = 4  # StateFlag bits found on this rank (deep-check steps only)
    STATE_COMMON_SQ = 5  # STATE_SQ over the parameters that had state at the last deep check too
    LR_RATIO = 6  # max over param groups of lr / the attached scheduler's lr (1 without one)
    STEP_TIME = 7  # seconds this rank was busy this step (see silent.py)
    PREEMPT = 8  # 1 when this rank received SIGTERM
    DEEP = 9  # 1 on steps where the deep checks ran (all ranks agree on this)
    FINGERPRINT = 10  # bit-pattern checksum of the parameters (divergence-check steps only)
    FP_CHECK = 11  # 1 on steps where the fingerprints are compared
    LOCAL_GRAD_SQ = 12  # this rank's own gradients before DDP averages them (who is to blame)
    LOSS_VALID = 13  # 0 when the row carries no loss (a ride right after a rollback or start)
    LR = 14  # the largest param-group LR (ranks that train one model agree on it)
    STATE_BASE_SQ = 15  # those parameters' STATE_COMMON_SQ at the last deep check (0: none)
    LATE_LOSS = 16  # the previous step's loss when it rode on DDP's all-reduce unjudged
    LATE_VALID = 17  # 1 when LATE_LOSS holds such a loss
    LOSS_JUDGED = 18  # 1 when its own step judged LOSS already (a ride after a collective step)
    ERROR = 19  # 1 when this rank failed inside step() and only joins to say so (failfast.py)


NUM_COLS = len(Col)
#: a deep check's columns, in the order :meth:`SignalCollector.deep_values` returns them
DEEP_COLS = (Col.WEIGHT_SQ, Col.STATE_SQ, Col.STATE_COMMON_SQ, Col.STATE_BASE_SQ, Col.STATE_FLAGS)


class StateFlag(enum.IntFlag):
    """Structural damage to the optimizer state, OR-ed into ``Col.STATE_FLAGS``.

    Per-parameter step counters legitimately differ (a parameter without a gradient on a step
    is not updated: frozen layers, alternating heads, unused DDP parameters, MoE experts), and
    parameters gain state when they join the updates; neither is damage.
    """

    LOST = 1  # every parameter that had state at the last deep check has none now (a reset)
    STEP_BACK = 2  # a parameter's step counter is lower than at the last deep check


def _sq_norm_groups(tensors: Sequence[torch.Tensor]):
    """(indices, their squared norms as float64) per (device, dtype) group: one
    ``_foreach_norm`` launch each. Norms are squared in float64: ``_foreach_norm`` squares in the
    input dtype and overflows for |x| ~ 1e19 in fp32; the upcast only touches the per-tensor
    norms, and an overflow still reads as an explosion."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    for idx in groups.values():
        norms = torch.stack(torch._foreach_norm([tensors[i] for i in idx])).to(torch.float64)
        yield idx, norms.square()


def sq_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all elements, as a float64 0-d tensor on ``device``."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    parts = [sq.sum().to(device) for _, sq in _sq_norm_groups(tensors)]
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def sq_norms(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each tensor's squared L2 norm, in order, as a float64 vector on ``device``."""
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    for idx, sq in _sq_norm_groups(tensors):
        out[torch.tensor(idx, device=device)] = sq.to(device)
    return out


def grads_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [local_tensor(p.grad) for p in params if p.grad is not None]


def weights_of(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [local_tensor(p.detach()) for p in params]


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
        # the last deep check's optimizer state: (parameters with state, per-parameter squared
        # norms, per-parameter step counters); None after a restore
        self._state_base: tuple[frozenset[int], torch.Tensor, torch.Tensor] | None = None
        self._deep: tuple[int, list[torch.Tensor]] | None = None  # the last deep_values()

    def row(
        self,
        loss: torch.Tensor,
        *,
        deep: bool,
        grad_sq: torch.Tensor | None = None,
        lr_ratio: float = 1.0,
        lr: float = 0.0,
        step_time: float = 0.0,
        preempt: bool = False,
        fingerprint: bool = False,
        local_grad_sq: torch.Tensor | None = None,
        late_loss: torch.Tensor | None = None,
        deep_values: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``late_loss``: the previous step's loss when nothing judged it yet (DDP ride);
        ``deep_values``: this step's :meth:`deep_values` (else taken here)."""
        dev, f64 = self.device, torch.float64
        if grad_sq is None:
            grad_sq = self.grad_sq()
        # host-known values in one small tensor, device values scattered in with one op
        host = [0.0] * NUM_COLS
        host[Col.LR_RATIO], host[Col.LR], host[Col.STEP_TIME] = lr_ratio, lr, step_time
        host[Col.PREEMPT], host[Col.DEEP] = float(preempt), float(deep)
        host[Col.FP_CHECK], host[Col.LOSS_VALID] = float(fingerprint), 1.0
        cols = [Col.LOSS, Col.GRAD_SQ, Col.LOCAL_GRAD_SQ]
        vals = [
            loss.detach().reshape(()),
            grad_sq,
            grad_sq if local_grad_sq is None else local_grad_sq,
        ]
        if late_loss is not None:
            host[Col.LATE_VALID] = 1.0
            cols.append(Col.LATE_LOSS)
            vals.append(late_loss.reshape(()))
        if deep:
            cols += DEEP_COLS
            vals += self.deep_values() if deep_values is None else deep_values
        if fingerprint:
            cols.append(Col.FINGERPRINT)
            vals.append(param_fingerprint(self.model_params + self._state_tensors(), dev))
        row = torch.tensor(host, dtype=f64).to(dev, non_blocking=True)
        row[cols] = torch.stack([v.to(dev, f64) for v in vals])
        return row

    def deep_values(self, step: int | None = None) -> list[torch.Tensor]:
        """This rank's deep check (:data:`DEEP_COLS`) as float64 device tensors: the weights'
        squared norm and the optimizer state's. Taken once per ``step`` (the ``step()`` call it
        belongs to; None: now): it moves the optimizer-state baseline, so a second backward
        before the same step, or the collective path after a ride, gets the same values."""
        if step is None or self._deep is None or self._deep[0] != step:
            weights = sq_norm(weights_of(self.model_params), self.device)
            self._deep = (step, [weights, *self._optimizer_state()])
        return self._deep[1]

    def grad_sq(self) -> torch.Tensor:
        """Squared norm of the gradients this rank holds (one foreach pass)."""
        return sq_norm(grads_of(self.params), self.device)

    def _optimizer_state(self) -> list[torch.Tensor]:
        """[state sq-norm, the same over parameters that had state at the last deep check too,
        those parameters' sq-norm then, StateFlag bits] as float64 device tensors.

        Floating tensors other than ``step`` count towards the norms (Adam's moments, SGD's
        momentum). Comparing only parameters present at both checks makes parameters that join
        the updates later (unfrozen layers, experts routed to for the first time) invisible to
        the ratio test, and a step counter is only compared with its own earlier value. This
        walks the state dict (a Python loop over parameters), so it only runs on deep-check
        steps; the comparisons stay on the device.
        """
        dev, f64 = self.device, torch.float64
        n = len(self.params)
        floats: list[torch.Tensor] = []
        owners: list[int] = []
        steps: list[torch.Tensor] = []
        step_owners: list[int] = []
        present = []
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(p)
            if not st:
                continue
            present.append(i)
            for key, v in st.items():
                if key == "step":
                    steps.append(
                        local_tensor(v).reshape(()).to(dev, f64)
                        if isinstance(v, torch.Tensor)
                        else torch.tensor(float(v), dtype=f64, device=dev)
                    )
                    step_owners.append(i)
                elif isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    floats.append(local_tensor(v))
                    owners.append(i)
        per = torch.zeros(n, dtype=f64, device=dev)
        if floats:
            per.index_add_(0, torch.tensor(owners, device=dev), sq_norms(floats, dev))
        counters = torch.full((n,), -1.0, dtype=f64, device=dev)
        if steps:
            counters[torch.tensor(step_owners, device=dev)] = torch.stack(steps)
        total = per.sum()
        zero = torch.zeros((), dtype=f64, device=dev)
        common_sq, base_sq, flags = total, zero, zero
        now = frozenset(present)
        if self._state_base is not None:
            had, base_per, base_counters = self._state_base
            common = sorted(had & now)
            if had and not now:
                flags = torch.full((), float(StateFlag.LOST), dtype=f64, device=dev)
            if common:
                idx = torch.tensor(common, device=dev)
                common_sq, base_sq = per[idx].sum(), base_per[idx].sum()
                back = (counters[idx] < base_counters[idx]).any().to(f64)
                flags = flags + back * float(StateFlag.STEP_BACK)
            else:
                common_sq = zero
        self._state_base = (now, per, counters)
        return [total, common_sq, base_sq, flags]

    def _state_tensors(self) -> list[torch.Tensor]:
        if not self.fingerprint_optimizer:
            return []
        return [
            local_tensor(v)
            for p in self.params
            for k, v in self.optimizer.state.get(p, {}).items()
            if isinstance(v, torch.Tensor) and k != "step"
        ]

    def reset_expectations(self) -> None:
        """After a restore the optimizer state is what the snapshot held: no baseline."""
        self._state_base = None


def error_row(device: torch.device) -> torch.Tensor:
    """The row of a rank that failed inside ``step()``: it carries nothing but the flag."""
    row = torch.zeros(NUM_COLS, dtype=torch.float64, device=device)
    row[Col.ERROR] = 1.0
    return row


def job_grad_sq(grad_norm, device: torch.device, layout: Layout, world_size: int) -> torch.Tensor:
    """The global gradient norm the job passed to ``Arc.step`` (a tensor, a DTensor or a float)
    as this rank's share of the squared norm, a float64 0-d tensor on ``device``."""
    if is_dtensor(grad_norm):
        grad_norm = grad_norm.full_tensor()
    if isinstance(grad_norm, torch.Tensor):
        if grad_norm.numel() != 1:
            raise ValueError(
                f"Arc.step(grad_norm=...) must be the scalar total norm, got shape "
                f"{tuple(grad_norm.shape)}"
            )
        sq = grad_norm.detach().reshape(()).to(device, torch.float64).square()
    elif isinstance(grad_norm, (int, float)):
        sq = torch.tensor(float(grad_norm) ** 2, dtype=torch.float64, device=device)
    else:
        raise TypeError(
            f"Arc.step(grad_norm=...) takes a tensor or a float, got {type(grad_norm).__name__}"
        )
    # sharded layouts add the ranks' shares; the job's norm is already the total
    return sq / world_size if layout == Layout.SHARDED else sq
