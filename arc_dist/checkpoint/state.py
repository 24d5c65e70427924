"""What a checkpoint holds: DCP ``Stateful`` wrappers for the training state.

* ``TrainState(model, optimizer, scheduler=None, scaler=None)``: model and optimizer through
  ``torch.distributed.checkpoint.state_dict`` (``get_state_dict``/``set_state_dict``), so DDP,
  FSDP2 and plain modules all save FQN-keyed, reshardable state; plus the LR scheduler, the
  ``GradScaler`` and this rank's RNG streams (torch CPU, CUDA, Python ``random``, NumPy).
* ``PerRank(obj, reshard)``: any ``Stateful`` whose state differs per rank (a data iterator, a
  loader worker's RNG). DCP stores a same-key plain value once for all ranks, so per-rank state
  needs rank-unique keys: ``rank_<r>``.

Both know how to build their *load template* from the keys a checkpoint actually has
(``state_dict_for_load``), which is how resharding handles per-rank state: ``TrainState`` gives a
rank that did not exist at save time its own RNG (copying rank 0's would correlate dropout masks
across ranks); ``PerRank`` refuses a changed world size unless its ``reshard`` choice says what to
do (``Reshard``). State of ranks that no longer exist is dropped with a log line.

Every value is a tensor or a plain Python number/list/dict, so nothing is ever unpickled beyond what
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .. import rng as rng_streams
from ..errors import ReshardError
from ..snapshot import load_scaler_state

log = logging.getLogger("arc_dist")


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank_keys(available: set[str], prefix: str) -> set[int]:
    """Ranks ``r`` with some key ``<prefix>rank_<r>.*`` (or ``<prefix>rank_<r>``)."""
    ranks = set()
    for key in available:
        if key.startswith(prefix + "rank_"):
            head = key[len(prefix) + 5 :].split(".", 1)[0]
            if head.isdigit():
                ranks.add(int(head))
    return ranks


# -- training state -------------------------------------------------------------------------
class TrainState:
    """Model, optimizer, scheduler, ``GradScaler`` and this rank's RNG as one DCP ``Stateful``.

    Keys: ``model`` and ``optim`` (FQN-keyed, from ``get_state_dict``; DDP's ``module.`` prefix is
    dropped, FSDP2 parameters are DTensors), ``scheduler``, ``scaler``, ``rng.rank_<r>``.
    """

    #: key prefixes whose unexpected keys in a checkpoint make it incompatible
    strict_prefixes = ("model.",)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        rng: bool = True,
        options: StateDictOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"TrainState(model=...) must be an nn.Module, got {type(model).__name__}"
            )
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.rng = rng
        self.options = options or StateDictOptions()

    def _scaler_enabled(self) -> bool:
        s = self.scaler
        return s is not None and (not hasattr(s, "is_enabled") or s.is_enabled())

    def _optimizer_untouched(self) -> bool:
        """No state and no gradients: ``get_state_dict`` will run a zero-LR step to create state."""
        opt = self.optimizer
        return not opt.state and all(p.grad is None for g in opt.param_groups for p in g["params"])

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is not None:
            untouched = self._optimizer_untouched()
            msd, osd = get_state_dict(self.model, self.optimizer, options=self.options)
            if untouched:
                # DCP gave the optimizer state by taking one zero-LR step (so the checkpoint has
                # keys to load into). Undo it: saving must not change training, and a state at
                # step 0 with zero moments resumes exactly like a fresh optimizer.
                self.optimizer.state.clear()
                for st in osd.get("state", {}).values():
                    if "step" in st:
                        st["step"] = (
                            torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0
                        )
            sd: dict[str, Any] = {"model": msd, "optim": osd}
        else:
            sd = {"model": get_model_state_dict(self.model, options=self.options)}
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        if self._scaler_enabled():
            sd["scaler"] = self.scaler.state_dict()
        if self.rng:
            sd["rng"] = {f"rank_{_global_rank()}": rng_streams.encode(rng_streams.capture())}
        return sd

    def state_dict_for_load(self, available: set[str]) -> dict[str, Any]:
        """The template to load into, given the checkpoint's keys under this object."""
        sd = self.state_dict()
        if not self.rng:
            return sd
        rank, world = _global_rank(), _world_size()
        saved = _rank_keys(available, "rng.")
        if rank == 0 and any(r >= world for r in saved):
            log.info(
                "arc_dist: RNG state of ranks %s has no owner at world size %d; dropped",
                sorted(r for r in saved if r >= world),
                world,
            )
        if rank not in saved:
            log.info(
                "[rank %d] arc_dist: the checkpoint has no RNG state for rank %d (saved at a "
                "smaller world size); this rank keeps its own RNG streams",
                rank,
                rank,
            )
            sd.pop("rng")
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.optimizer is not None:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
                options=self.options,
            )
        else:
            set_model_state_dict(self.model, sd["model"], options=self.options)
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])
        if self._scaler_enabled() and sd.get("scaler"):
            load_scaler_state(self.scaler, sd["scaler"])
        saved_rng = sd.get("rng", {}).get(f"rank_{_global_rank()}")
        if saved_rng is not None:
            rng_streams.restore(rng_streams.decode(saved_rng))


class Reshard(str, Enum):
    """What ``PerRank`` state does when the world size changed since it was saved."""

    #: refuse (``ReshardError`` on every rank): nothing says how positions map to new ranks
    ERROR = "error"
    #: a rank missing from the checkpoint starts from rank 0's state; state of ranks that no
    #: longer exist is dropped (a data position copied this way repeats rank 0's samples)
    COPY_RANK0 = "copy_rank0"
    #: a rank missing from the checkpoint keeps its own current state; dropped ranks' state is lost
    KEEP_OWN = "keep_own"


class PerRank:
    """Saves ``obj``'s state under ``rank_<r>``; ``reshard`` says what a changed world size does.

    ``name`` (the object's key in the checkpoint) only makes messages clearer.
    """

    def __init__(
        self, obj: Any, reshard: Reshard | str = Reshard.ERROR, *, name: str | None = None
    ) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"PerRank(obj) needs state_dict() and load_state_dict(), got {type(obj).__name__}"
            )
        try:
            self.reshard = Reshard(reshard)
        except ValueError:
            raise ValueError(
                f"PerRank(reshard={reshard!r}) is invalid: choose one of "
                f"{[r.value for r in Reshard]}"
            ) from None
        self.obj = obj
        self.name = name or type(obj).__name__

    def state_dict(self) -> dict[str, Any]:
        return {f"rank_{_global_rank()}": self.obj.state_dict()}

    def state_dict_for_load(self, available: set[str]) -> dict[str, Any]:
        rank, world = _global_rank(), _world_size()
        saved = _rank_keys(available, "")
        if not saved or saved == set(range(world)):
            return self.state_dict()  # nothing saved (reported as missing), or no resize
        if self.reshard is Reshard.ERROR:
            # every rank sees the same keys: all raise here, before any collective of the load
            raise ReshardError(
                f"arc_dist: per-rank state {self.name!r} was saved at world size {len(saved)} and "
                f"rank {rank} resumes it at world size {world}: each rank's state is its own share "
                "(e.g. of the data), and nothing says how the shares map to the new ranks. Choose: resume at the saved world size; keep a global position instead "
                "(arc_dist.ResumableDistributedSampler, registered without per_rank, reshards "
                f"exactly); or register it with reshard={Reshard.COPY_RANK0.value!r} (new ranks "
                "start from rank 0's state, state of removed ranks is dropped) or "
                f"reshard={Reshard.KEEP_OWN.value!r} (new ranks keep their own state)"
            )
        if rank == 0 and any(r >= world for r in saved):
            log.info(
                "arc_dist: %s state of ranks %s has no owner at world size %d; dropped",
                self.name,
                sorted(r for r in saved if r >= world),
                world,
            )
        if rank in saved:
            return self.state_dict()
        if self.reshard is Reshard.KEEP_OWN:
            log.info(
                "[rank %d] arc_dist: no %s state saved for this rank; keeping its own",
                rank,
                self.name,
            )
            return {}
        source = 0 if 0 in saved else min(saved)
        log.info(
            "[rank %d] arc_dist: no %s state saved for this rank; starting from rank %d's",
            rank,
            self.name,
            source,
        )
        return {f"rank_{source}": self.obj.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd:  # empty: this rank keeps its own (Reshard.KEEP_OWN)
            (state,) = sd.values()
            self.obj.load_state_dict(state)
