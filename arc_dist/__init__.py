"""arc-dist: fault tolerance for multi-node PyTorch training.

Wrap the loop with :class:`Arc`; see README.md and ``docs/api.md`` for the contract. The
controller (and torch) load on first use, so ``python -m arc_dist.launch`` and other tools that
only need the configuration or the exit codes start fast.
"""

from typing import TYPE_CHECKING

from .config import ArcConfig, EarlyWarning, Thresholds
from .errors import (
    ArcError,
    BadNodeError,
    CheckpointError,
    ExitCode,
    HangError,
    HardwareError,
    PeerError,
    Preempted,
    ReshardError,
    UnrecoverableError,
)

if TYPE_CHECKING:
    from .checkpoint import CheckpointStorageError
    from .controller import Action, Arc
    from .data import ResumableDistributedSampler

__all__ = [
    "Action",
    "Arc",
    "ArcConfig",
    "ArcError",
    "BadNodeError",
    "CheckpointError",
    "CheckpointStorageError",
    "EarlyWarning",
    "ExitCode",
    "HangError",
    "HardwareError",
    "PeerError",
    "Preempted",
    "ReshardError",
    "ResumableDistributedSampler",
    "Thresholds",
    "UnrecoverableError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Arc", "Action"):
        from . import controller

        return getattr(controller, name)
    if name == "CheckpointStorageError":  # defined beside the checkpoint code, which needs torch
        from .checkpoint import CheckpointStorageError

        return CheckpointStorageError
    if name == "ResumableDistributedSampler":
        from .data import ResumableDistributedSampler

        return ResumableDistributedSampler
    raise AttributeError(f"module 'arc_dist' has no attribute {name!r}")
