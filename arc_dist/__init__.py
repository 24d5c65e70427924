"""arc-dist: fault tolerance for multi-node PyTorch training.

Wrap the loop with :class:`Arc`; see README.md and ``shared/api.md`` for the contract.
"""

from .config import ArcConfig, Thresholds
from .controller import Action, Arc
from .errors import ArcError, CheckpointError, ExitCode, Preempted, UnrecoverableError

__all__ = [
    "Action",
    "Arc",
    "ArcConfig",
    "ArcError",
    "CheckpointError",
    "ExitCode",
    "Preempted",
    "Thresholds",
    "UnrecoverableError",
]
__version__ = "0.1.0"
