"""Arc inside training frameworks: a PyTorch Lightning callback and a Hugging Face Trainer.

Each integration lives in its own module so that importing one framework never imports the
other (both are optional extras)::

    from arc_dist.integrations.lightning import ArcCallback                 # pip install arc-dist[lightning]
    from arc_dist.integrations.hf import ArcTrainer, ArcTrainerCallback     # pip install arc-dist[hf]

``_common.py`` holds what both need: the loss accumulator, the LR-schedule hold that undoes the
scheduler step a framework takes after a skipped update, and unwrapping of framework wrappers.
See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ArcCallback", "ArcTrainer", "ArcTrainerCallback", "ArcTrainerMixin"]

_HOME = {
    "ArcCallback": "lightning",
    "ArcTrainer": "hf",
    "ArcTrainerCallback": "hf",
    "ArcTrainerMixin": "hf",
}


def __getattr__(name: str) -> Any:
    # lazy, so that `import arc_dist.integrations` needs neither framework
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
