"""Fault injection: the same tool for the demo, the tests and users' fire drills.

Faults are real: a NaN loss is produced by the model's forward pass and flows through
backward and DDP's all-reduce like a genuine one; an LR spike changes the optimizer's param
group; a weight corruption writes into the parameter. Faults fire at a global step on chosen
ranks, once by default (after a rollback the same step runs again, cleanly) or on every step
from then on (``persistent``), which is how escalation is tested.

From code::

    arc = Arc(model, opt, chaos="nan_loss@30/1 grad_explosion@60 lr_spike@90/1")
    # or: arc_dist.chaos.inject(arc, "nan_loss", step=30, ranks=[1])

From the environment (used when ``Arc(chaos=...)`` is not given)::

    ARC_CHAOS="nan_loss@30/1 lr_spike@90/0+1 nan_loss@200!" torchrun ... train.py

Grammar: ``KIND@STEP[/RANK[+RANK...]][*FACTOR][!]`` separated by spaces, commas or semicolons;
no ranks means all ranks, ``*FACTOR`` sets the fault's magnitude (seconds for ``slow``, ``hang`` and the
maximum of ``jitter``; the bit index for ``bit_flip``), ``!`` makes it persistent.

``device_error`` raises a CUDA-style illegal-memory-access ``RuntimeError`` inside ``Arc.step``
(which turns it into ``HardwareError``, exit code 12). ``ARC_CHAOS_PREFLIGHT="matmul/1"`` makes
a preflight health check fail (:func:`arc_dist.health.preflight_faults`, docs/health.md).
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .layout import local_tensor

if TYPE_CHECKING:
    from .controller import Arc

log = logging.getLogger("arc_dist")

#: faults applied to the model's output in forward (they flow through backward and DDP)
FORWARD_KINDS = {
    "nan_loss",
    "inf_loss",
    "loss_spike",
    "grad_explosion",
    "nan_grad",
    "lr_spike",
    "slow",
    "jitter",
}
#: faults applied inside ``Arc.step`` before the health signals are read
STEP_KINDS = {
    "nan_weights",
    "noisy_weights",
    "bit_flip",
    "optimizer_reset",
    "optimizer_corrupt",
    "hang",
    "crash",
    "preempt",
    "device_error",
}
KINDS = FORWARD_KINDS | STEP_KINDS

_DEFAULT_FACTOR = {
    "loss_spike": 100.0,
    "grad_explosion": 1e6,
    "lr_spike": 100.0,
    "noisy_weights": 1e-3,
    "optimizer_corrupt": 1e6,
    "slow": 0.05,
    "jitter": 0.005,
    "hang": 3600.0,
}

_SPEC = re.compile(
    r"^(?P<kind>[a-z_]+)@(?P<step>\d+)(?:/(?P<ranks>\d+(?:\+\d+)*))?"
    r"(?:\*(?P<factor>[-+0-9.eE]+))?(?P<persist>!)?$"
)


@dataclass(slots=True)
class Fault:
    kind: str
    step: int
    ranks: tuple[int, ...] | None = None  # None: every rank
    persistent: bool = False
    factor: float | None = None
    fired: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose one of {sorted(KINDS)}")
        if self.step < 0:
            raise ValueError(f"fault step must be >= 0, got {self.step}")
        if self.factor is None:
            self.factor = _DEFAULT_FACTOR.get(self.kind)

    def due(self, step: int, rank: int) -> bool:
        if self.ranks is not None and rank not in self.ranks:
            return False
        return step >= self.step if self.persistent else (step == self.step and not self.fired)


def parse(spec: str) -> list[Fault]:
    """Parse the ``ARC_CHAOS`` grammar (see the module docstring)."""
    faults = []
    for token in re.split(r"[\s,;]+", spec.strip()):
        if not token:
            continue
        m = _SPEC.match(token)
        if m is None:
            raise ValueError(
                f"cannot parse fault {token!r}: expected KIND@STEP[/RANK[+RANK]][*FACTOR][!], "
                f"e.g. 'nan_loss@30/1' (kinds: {', '.join(sorted(KINDS))})"
            )
        ranks = tuple(int(r) for r in m["ranks"].split("+")) if m["ranks"] else None
        factor = float(m["factor"]) if m["factor"] else None
        faults.append(Fault(m["kind"], int(m["step"]), ranks, bool(m["persist"]), factor))
    return faults


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``factor`` backward: a gradient explosion at the source."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def _map_tensors(out: Any, fn) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() else out
    if isinstance(out, tuple):
        return (
            type(out)(*(_map_tensors(o, fn) for o in out))
            if hasattr(out, "_fields")
            else tuple(_map_tensors(o, fn) for o in out)
        )
    if isinstance(out, list):
        return [_map_tensors(o, fn) for o in out]
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


class Chaos:
    """A schedule of faults attached to one :class:`~arc_dist.Arc`."""

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults = list(faults)
        #: (kind, step, rank) of every fault that fired on this rank
        self.fired: list[tuple[str, int, int]] = []
        self._arc: Arc | None = None
        self._hook = None

    @classmethod
    def from_spec(cls, spec: str) -> Chaos:
        return cls(parse(spec))

    @classmethod
    def from_env(cls, var: str = "ARC_CHAOS") -> Chaos | None:
        spec = os.environ.get(var, "").strip()
        if not spec:
            return None
        try:
            return cls.from_spec(spec)
        except ValueError as e:
            raise ValueError(f"environment variable {var}={spec!r}: {e}") from None

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def attach(self, arc: Arc) -> None:
        self._arc = arc
        if self._hook is None:
            self._hook = arc.model.register_forward_hook(self._forward_hook)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _due(self, kinds: set[str]) -> list[Fault]:
        arc = self._arc
        assert arc is not None
        out = [f for f in self.faults if f.kind in kinds and f.due(arc.global_step, arc.rank)]
        for f in out:
            f.fired += 1
            self.fired.append((f.kind, arc.global_step, arc.rank))
            log.warning(
                "[rank %d] chaos: injecting %s at step %d", arc.rank, f.kind, arc.global_step
            )
        return out

    def _forward_hook(self, module, args, output):
        if self._arc is None or not module.training or not torch.is_grad_enabled():
            return None
        due = self._due(FORWARD_KINDS)
        for f in due:
            if f.kind == "nan_loss":
                output = _map_tensors(output, lambda t: t * float("nan"))
            elif f.kind == "inf_loss":
                output = _map_tensors(output, lambda t: t * float("inf"))
            elif f.kind == "loss_spike":
                output = _map_tensors(output, lambda t, k=f.factor: t * k)
            elif f.kind == "grad_explosion":
                output = _map_tensors(output, lambda t, k=f.factor: _ScaleGrad.apply(t, k))
            elif f.kind == "nan_grad":
                output = _map_tensors(output, lambda t: _ScaleGrad.apply(t, float("nan")))
            elif f.kind == "lr_spike":  # changed before the step, as a buggy schedule would
                _apply_step_fault(self._arc, f)
            elif f.kind == "slow":  # slow compute: the rank's own step takes longer
                time.sleep(f.factor)
            elif f.kind == "jitter":
                time.sleep(random.uniform(0.0, f.factor))
        return output if due else None

    def before_check(self) -> None:
        """Called by ``Arc.step`` before it reads this step's signals."""
        arc = self._arc
        if arc is None:
            return
        for f in self._due(STEP_KINDS):
            _apply_step_fault(arc, f)


def _first_param(arc: Arc) -> torch.Tensor:
    return local_tensor(next(p for p in arc.model.parameters() if p.numel() > 0).detach())


def _apply_step_fault(arc: Arc, f: Fault) -> None:
    k = f.kind
    with torch.no_grad():
        if k == "lr_spike":
            for g in arc.optimizer.param_groups:
                g["lr"] = g["lr"] * f.factor
        elif k == "nan_weights":
            _first_param(arc).view(-1)[0] = float("nan")
        elif k == "noisy_weights":
            p = _first_param(arc)
            p.add_(torch.randn_like(p) * p.abs().mean().clamp_min(1e-8) * f.factor)
        elif k == "bit_flip":
            p = _first_param(arc)
            bits = p.view(-1)[:1].view(torch.int32) if p.dtype == torch.float32 else None
            if bits is None:
                raise ValueError(f"bit_flip supports float32 parameters, got {p.dtype}")
            bits ^= 1 << int(f.factor or 20)  # a mantissa bit: finite, wrong, silent
        elif k == "optimizer_reset":
            arc.optimizer.state.clear()
        elif k == "optimizer_corrupt":
            for st in list(arc.optimizer.state.values())[:1]:
                for v in st.values():
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                        v.mul_(f.factor)
        elif k == "hang":
            time.sleep(f.factor)
        elif k == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif k == "preempt":  # what a scheduler sends before it evicts the pod
            os.kill(os.getpid(), signal.SIGTERM)
        elif k == "device_error":
            raise RuntimeError(
                "CUDA error: an illegal memory access was encountered (injected by arc_dist.chaos)"
            )


def inject(
    arc: Arc,
    kind: str,
    *,
    step: int,
    ranks: Iterable[int] | None = None,
    persistent: bool = False,
    factor: float | None = None,
) -> Fault:
    """Schedule a fault on ``arc`` (creating its :class:`Chaos` if it has none)."""
    fault = Fault(kind, step, tuple(ranks) if ranks is not None else None, persistent, factor)
    if arc.chaos is None:
        arc.chaos = Chaos()
        arc.chaos.attach(arc)
    arc.chaos.add(fault)
    return fault
