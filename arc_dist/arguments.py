"""What the job hands ``Arc``, checked before anything is built or judged.

Misuse raises ``ValueError``/``TypeError`` naming the argument, the value and the fix, on the
rank that made it (a rank that fails inside ``Arc.step`` tells the others, failfast.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .config import ArcConfig


def check_arguments(model, optimizer, scheduler, config, process_group) -> None:
    """``Arc(...)``'s arguments, before anything is built."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Arc(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Arc(optimizer=...) must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if scheduler is not None and not (
        hasattr(scheduler, "state_dict") and hasattr(scheduler, "step")
    ):
        raise TypeError(
            f"Arc(scheduler=...) must be an LR scheduler (with step() and state_dict()) or None, "
            f"got {type(scheduler).__name__}"
        )
    if config is not None and not isinstance(config, ArcConfig):
        raise TypeError(
            f"Arc(config=...) must be an arc_dist.ArcConfig or None, got {type(config).__name__}"
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params
    )
    if foreign:
        raise ValueError(
            f"Arc: {foreign} of the optimizer's parameters are not parameters of the model; "
            "build the optimizer from model.parameters() (after wrapping it in DDP/FSDP2)"
        )
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is not None and not initialized:
        raise ValueError(
            "Arc(process_group=...) was given but torch.distributed is not initialized; call "
            "dist.init_process_group() first or pass process_group=None"
        )
    world = os.environ.get("WORLD_SIZE", "1")
    if not initialized and world.isdigit() and int(world) > 1:
        # every process would train alone as rank 0 of 1, writing over the others' checkpoints
        raise ValueError(
            f"Arc: WORLD_SIZE={world} in the environment (a torchrun/Ray/Kubernetes launch) but "
            "torch.distributed is not initialized, so each process would train alone as rank 0; "
            "call torch.distributed.init_process_group() before Arc(...)"
        )


def check_loss(loss) -> None:
    """``Arc.step(loss)`` takes this step's scalar loss tensor."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"Arc.step(loss) needs the scalar loss tensor of this step, got {shape}; "
            "reduce it first (e.g. loss.mean())"
        )


def check_gradients(params: Iterable[torch.Tensor], step: int) -> None:
    """A first ``Arc.step`` without any gradient means the loop calls it before backward."""
    if not any(p.grad is not None for p in params):
        raise ValueError(
            f"Arc.step() at step {step} found no gradients: call loss.backward() "
            "before arc.step(loss), and optimizer.zero_grad() after it"
        )
