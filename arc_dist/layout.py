"""Which rank holds which part of the model, and this rank's own part of a tensor.

How a signal is combined across ranks follows from the layout:

* ``replicated`` (DDP, or a single process): gradients after backward and weights are the same
  on every rank, so each rank's norm is already the global one;
* ``sharded`` (FSDP2, ``DTensor`` parameters): each rank holds a disjoint shard, so squared norms
  add up across ranks (with HSDP the replicas repeat shards; see docs/design.md);
* ``independent`` (a plain module on several ranks without DDP): each rank trains its own
  replica and the worst rank decides.
"""

from __future__ import annotations

import enum
import sys

import torch
from torch import nn


class Layout(enum.StrEnum):
    """How the model's state is spread over the ranks (the values appear in events and files)."""

    REPLICATED = "replicated"
    SHARDED = "sharded"
    INDEPENDENT = "independent"


def is_dtensor(t: object) -> bool:
    """FSDP2 parameters are DTensors. Importing ``torch.distributed.tensor`` costs seconds (it
    pulls in sympy), which every restart would pay: a job that never imported it holds none."""
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, any other tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``OptimizedModule`` keeps it as ``_orig_mod``):
    ``torch.compile(DDP(model))`` is still DDP, with DDP's process group and comm hooks."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def layout_of(model: nn.Module, world_size: int) -> Layout:
    """The model's :class:`Layout` (see the module docstring)."""
    if any(is_dtensor(p) for p in model.parameters()):
        return Layout.SHARDED
    if world_size == 1 or isinstance(uncompiled(model), nn.parallel.DistributedDataParallel):
        return Layout.REPLICATED
    return Layout.INDEPENDENT
