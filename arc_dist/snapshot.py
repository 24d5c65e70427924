"""In-memory snapshots: the rollback targets, kept in host memory.

A snapshot holds what a rollback must restore: the model's local tensors (parameters and
buffers; the local shards under FSDP2), the optimizer state, the scheduler and GradScaler state,
the RNG states and the controller's step and LR scale (``extra``). Host buffers are allocated
once per slot and reused, and the copies are one ``torch._foreach_copy_`` per slot
(non-blocking into pinned memory on CUDA), so a snapshot costs about one memcpy of the state.

A background checkpoint of the state a snapshot holds (a checkpoint step that is also a
snapshot step) borrows the snapshot's host copies instead of copying the state again
(``SnapshotStore.lend``); a lent snapshot's buffers are not reused by a later snapshot until
the write returns them, so the checkpoint holds exactly the state of its step.

Model tensors are restored in place, so references held by the optimizer, DDP's buckets or the
user stay valid. The optimizer state becomes exactly the snapshot's, also where it was replaced,
cleared or grew since: through ``load_state_dict``, or for FSDP2 (DTensor state) by copying into
the live shards, rebuilding entries that are gone and dropping entries that are new.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import rng
from .layout import is_dtensor, local_tensor


def load_scaler_state(scaler: Any, state: dict) -> None:
    """``scaler.load_state_dict(state)`` as the start of a fresh step.

    ``GradScaler.load_state_dict`` keeps the per-optimizer stage (torch 2.13): a scaler restored
    after the loop's ``unscale_`` would make the next ``unscale_`` raise "already been called
    on this optimizer since the last update()", and the loop calls no ``update()`` after a
    rollback. A restored state is one between steps, where that stage is empty.
    """
    scaler.load_state_dict(state)
    stages = getattr(scaler, "_per_optimizer_states", None)
    if stages is not None:
        stages.clear()


def _host_like(t: torch.Tensor) -> torch.Tensor:
    pin = t.is_cuda and torch.cuda.is_available()
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


@dataclass(slots=True)
class Snapshot:
    step: int
    model: list[torch.Tensor]
    optim_tensors: list[torch.Tensor]
    optim_skeleton: Any = None  # optimizer.state_dict() with tensors replaced by indices
    scheduler: dict | None = None
    scaler: dict | None = None
    rng: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the controller's step and LR scale then
    nbytes: int = 0
    #: held on top of ``keep`` until the next snapshot (an instability forecast, forecast.py)
    pinned: bool = False
    #: the live tensors copied: ``{_identity(t): (optimizer?, index, t._version)}`` at the copy;
    #: emptied when the live state is rewritten from the snapshot (a restore)
    sources: dict = field(default_factory=dict)


def _identity(t: torch.Tensor) -> tuple:
    """The memory a tensor views (same address, layout and type: the same values)."""
    return (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place write); None for an inference tensor,
    which has none."""
    return None if t.is_inference() else t._version


class Loan:
    """The host copies of one snapshot, lent to a checkpoint of the same state; ``release`` (from
    any thread, idempotent) lets the snapshot's buffers be reused again."""

    def __init__(self, store: SnapshotStore, snap: Snapshot) -> None:
        self.store, self.snap = store, snap

    def host(self, t: torch.Tensor) -> torch.Tensor | None:
        """The snapshot's copy of the live tensor ``t``, or None when it holds none or ``t``
        changed since the copy (its version counter moved: any in-place write)."""
        hit = self.snap.sources.get(_identity(t))
        if hit is None or _version(t) != hit[2]:
            return None
        host = (self.snap.optim_tensors if hit[0] else self.snap.model)[hit[1]]
        return host if host.shape == t.shape and host.dtype == t.dtype else None

    def release(self) -> None:
        if self.snap is not None:
            self.store._release(self.snap)
            self.snap = None


class TensorRef:
    """Placeholder for a tensor in the optimizer-state skeleton (index into optim_tensors).

    A snapshot taken in this process also knows where the live tensor lived (``device``, and
    for a DTensor ``dtensor``: its mesh, placements, global shape and stride), so a restore can
    rebuild a state entry that was dropped since (None when read back from the local tier).
    """

    __slots__ = ("index", "device", "dtensor")

    def __init__(self, index: int, device: torch.device | None = None, dtensor=None) -> None:
        self.index, self.device, self.dtensor = index, device, dtensor

    def rebuild(self, host: torch.Tensor) -> torch.Tensor:
        """A new live tensor holding ``host`` (this rank's part of it)."""
        if self.device is None:
            raise RuntimeError(
                "arc_dist: an optimizer state entry is missing and the snapshot does not say "
                "where it lived; it cannot be rebuilt"
            )
        local = host.to(self.device, copy=True)
        if self.dtensor is None:
            return local
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = self.dtensor
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )


def _strip(obj: Any, out: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        dt = (obj.device_mesh, obj.placements, obj.shape, obj.stride()) if is_dtensor(obj) else None
        return TensorRef(len(out) - 1, local_tensor(obj).device, dt)
    if isinstance(obj, dict):
        return {k: _strip(v, out) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, out) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_strip(v, out) for v in obj)
    return copy.deepcopy(obj)


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, TensorRef):
        return tensors[obj.index].clone()
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_fill(v, tensors) for v in obj)
    return copy.deepcopy(obj)


class SnapshotStore:
    """A ring of ``keep`` snapshots, oldest first; buffers of a dropped slot are reused."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        scaler: Any = None,
        keep: int = 2,
    ):
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.keep = keep
        self._ring: list[Snapshot] = []
        self._spare: list[Snapshot] = []
        self._lent: dict[int, int] = {}  # id(snapshot) -> loans not yet released
        self._lock = threading.Lock()  # loans are released from a writer's thread

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def newest(self) -> Snapshot | None:
        return self._ring[-1] if self._ring else None

    def steps(self) -> tuple[int, ...]:
        """The steps of the snapshots held, oldest first (the rollback targets)."""
        return tuple(s.step for s in self._ring)

    def lend(self, step: int) -> Loan | None:
        """The newest snapshot's host copies when it holds the state at ``step`` (taken at this
        step boundary), for a background checkpoint of that state; None otherwise. Its buffers
        are not reused until ``Loan.release()``."""
        snap = self.newest
        if snap is None or snap.step != step or not snap.sources:
            return None
        with self._lock:
            self._lent[id(snap)] = self._lent.get(id(snap), 0) + 1
        return Loan(self, snap)

    def _release(self, snap: Snapshot) -> None:
        with self._lock:
            n = self._lent.pop(id(snap)) - 1
            if n:
                self._lent[id(snap)] = n

    def clear(self) -> None:
        """Forget every snapshot: a resume starts from another state."""
        self._ring.clear()

    def _model_tensors(self) -> list[torch.Tensor]:
        # state_dict(keep_vars=True) lists parameters and persistent buffers once each, also
        # when modules share them; local_tensor() maps FSDP2's DTensors to this rank's shard
        return [local_tensor(t.detach()) for t in self.model.state_dict(keep_vars=True).values()]

    def take(self, step: int, extra: dict, pin: bool = False) -> Snapshot:
        """Copy the live state into a snapshot slot (reusing the oldest buffers when full).

        ``pin``: held on top of the ``keep`` others, so that it evicts none of the older targets
        an escalation may need; the next snapshot replaces it."""
        # a rollback abandoned the trajectory of any snapshot at or after ``step``
        while self._ring and self._ring[-1].step >= step:
            self._spare.append(self._ring.pop())
        if self._ring and self._ring[-1].pinned:
            self._spare.append(self._ring.pop())
        if not pin and len(self._ring) >= self.keep:
            self._spare.append(self._ring.pop(0))
        live = self._model_tensors()
        optim_live: list[torch.Tensor] = []
        skeleton = _strip(self.optimizer.state_dict(), optim_live)
        snap = self._slot(live, optim_live)
        self._trim(self.keep + pin)
        optim_local = [local_tensor(t) for t in optim_live]
        with torch.no_grad():
            torch._foreach_copy_(snap.model, live, non_blocking=True)
            if optim_local:
                torch._foreach_copy_(snap.optim_tensors, optim_local, non_blocking=True)
        snap.step, snap.pinned = step, pin
        snap.optim_skeleton = skeleton
        snap.scheduler = copy.deepcopy(self.scheduler.state_dict()) if self.scheduler else None
        snap.scaler = copy.deepcopy(self.scaler.state_dict()) if self.scaler else None
        snap.rng = rng.capture()
        snap.extra = copy.deepcopy(extra)
        snap.sources = {
            _identity(t): (opt, i, _version(t))
            for opt, ts in ((False, live), (True, optim_local))
            for i, t in enumerate(ts)
            if not t.is_inference()
        }
        # the copies must land before the live state changes (and before the local tier reads
        # the buffers); every device matters: placements can be mixed (FSDP2 CPU offload)
        _wait_for_copies(live + optim_local)
        self._ring.append(snap)
        return snap

    def _slot(self, live: list[torch.Tensor], optim_live: list[torch.Tensor]) -> Snapshot:
        """A snapshot whose buffers match the live shapes, recycled when possible."""

        def fits(bufs: list[torch.Tensor], ts: list[torch.Tensor]) -> bool:
            return len(bufs) == len(ts) and all(
                b.shape == t.shape and b.dtype == t.dtype for b, t in zip(bufs, ts)
            )

        with self._lock:  # a snapshot still lent to a checkpoint write keeps its buffers
            free = [i for i, s in enumerate(self._spare) if id(s) not in self._lent]
        snap = self._spare.pop(free[-1]) if free else None
        if snap is None:
            snap = Snapshot(step=-1, model=[], optim_tensors=[])
        if not fits(snap.model, live):
            snap.model = [_host_like(t) for t in live]
        if not fits(snap.optim_tensors, optim_live):
            # optimizer state appears after the first step: allocate once it exists
            snap.optim_tensors = [_host_like(local_tensor(t)) for t in optim_live]
        snap.nbytes = sum(t.numel() * t.element_size() for t in snap.model + snap.optim_tensors)
        return snap

    def _trim(self, slots: int) -> None:
        """At most ``slots`` (``keep``, plus a pinned one): one allocated while another was lent
        is surplus once that one is back."""
        excess = len(self._ring) + 1 + len(self._spare) - slots
        if excess > 0:
            with self._lock:
                drop = {id(s) for s in self._spare if id(s) not in self._lent}
            drop = set(list(drop)[:excess])
            self._spare = [s for s in self._spare if id(s) not in drop]

    def drop_newest(self) -> None:
        self._spare.append(self._ring.pop())

    def restore(self, snap: Snapshot, set_extra: Callable[[dict], None]) -> None:
        """Put the live state back to ``snap``: model in place, optimizer, scheduler, RNG."""
        # the live tensors are rewritten (the optimizer's replaced): none is a source any more
        snap.sources = {}
        live = self._model_tensors()
        with torch.no_grad():
            torch._foreach_copy_(live, snap.model, non_blocking=True)
        self._restore_optimizer(snap.optim_skeleton, snap.optim_tensors)
        if self.scheduler is not None and snap.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
        if self.scaler is not None and snap.scaler is not None:
            load_scaler_state(self.scaler, copy.deepcopy(snap.scaler))
        rng.restore(snap.rng)
        set_extra(copy.deepcopy(snap.extra))
        self.optimizer.zero_grad(set_to_none=True)

    def _restore_optimizer(self, skeleton: dict, tensors: list[torch.Tensor]) -> None:
        """Make the optimizer state exactly the snapshot's, also for parameters that gained
        state since (a head trained later, a layer unfrozen later): their state is dropped."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not any(is_dtensor(p) for p in params):
            sd = _fill(skeleton, tensors)
            _keep_added_groups(sd, self.optimizer.param_groups)
            self.optimizer.load_state_dict(sd)  # replaces the whole state
            return
        # FSDP2 optimizer state holds DTensors; load_state_dict would replace them with the
        # plain local tensors kept here, so copy into the live DTensors' shards where they
        # exist, and rebuild entries that are gone
        state, saved_state = self.optimizer.state, skeleton["state"]
        dst, src = [], []
        for i, p in enumerate(params):
            saved = saved_state.get(i)
            if not saved:
                state.pop(p, None)
                continue
            cur = state[p]
            for k in [k for k in cur if k not in saved]:
                del cur[k]
            for k, v in saved.items():
                if not isinstance(v, TensorRef):
                    cur[k] = copy.deepcopy(v)
                    continue
                host, live = tensors[v.index], cur.get(k)
                if (
                    isinstance(live, torch.Tensor)
                    and local_tensor(live).shape == host.shape
                    and local_tensor(live).dtype == host.dtype
                ):
                    dst.append(local_tensor(live))
                    src.append(host)
                else:
                    cur[k] = v.rebuild(host)
        with torch.no_grad():
            if dst:
                torch._foreach_copy_(dst, src)
        for g, sg in zip(self.optimizer.param_groups, _fill(skeleton["param_groups"], tensors)):
            g.update({k: v for k, v in sg.items() if k != "params"})


def _keep_added_groups(sd: dict, live_groups: list[dict]) -> None:
    """Keep param groups added since the snapshot (``add_param_group``: a layer unfrozen later),
    without state, as their parameters had none then: the loop added them once and will not
    again (as the FSDP2 path does; ``load_state_dict`` needs every live group)."""
    saved = sd["param_groups"]
    n = sum(len(g["params"]) for g in saved)
    for g in live_groups[len(saved) :]:
        hyper = {k: v for k, v in g.items() if k != "params"}
        saved.append({**hyper, "params": list(range(n, n + len(g["params"])))})
        n += len(g["params"])


def _wait_for_copies(sources: list[torch.Tensor]) -> None:
    """Wait for the non-blocking copies out of ``sources``: on every device that copies
    asynchronously (not the CPU), on the stream they were issued on. Not yet run on a GPU."""
    for device in {t.device for t in sources if t.device.type != "cpu"}:
        torch.accelerator.current_stream(device).synchronize()
