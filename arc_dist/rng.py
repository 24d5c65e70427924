"""This process's random number streams: torch CPU, CUDA, Python ``random`` and NumPy.

Two forms. ``capture``/``restore`` work on the native states (what an in-memory snapshot keeps:
cheap, no conversion). ``encode``/``decode`` turn a native state into a flat dict of tensors and
back, for anything written to disk: DCP stores tensors, and ``torch.load(weights_only=True)``
refuses NumPy arrays and pickled tuples. A stream missing from a state (no CUDA, a NumPy that
was not installed when it was saved) is left as it is on restore.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def capture() -> dict:
    """The native state of every stream this process uses."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Set the streams ``state`` holds (``capture``'s form); CUDA devices this process lacks
    are skipped."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    cuda = state.get("cuda") or ()
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)


def encode(state: dict) -> dict[str, torch.Tensor]:
    """``capture``'s form as tensors only."""
    out: dict[str, torch.Tensor] = {}
    if "torch" in state:
        out["torch"] = state["torch"]
    if "python" in state:
        version, mt, gauss = state["python"]
        out["python"] = torch.tensor([version, *mt], dtype=torch.int64)
        out["python_gauss"] = torch.tensor([math.nan if gauss is None else gauss],
                                           dtype=torch.float64)  # fmt: skip
    for i, s in enumerate(state.get("cuda") or ()):
        out[f"cuda_{i}"] = s
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        if kind == "MT19937":
            out["numpy_keys"] = torch.from_numpy(np.asarray(keys).astype("int64"))
            out["numpy_meta"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
    return out


def decode(tensors: dict[str, torch.Tensor]) -> dict:
    """``encode``'s tensors back in ``capture``'s form."""
    state: dict = {}
    if "torch" in tensors:
        state["torch"] = tensors["torch"].to(torch.uint8)
    if "python" in tensors:
        values = [int(x) for x in tensors["python"].tolist()]
        gauss = float(tensors["python_gauss"].item()) if "python_gauss" in tensors else math.nan
        state["python"] = (values[0], tuple(values[1:]), None if math.isnan(gauss) else gauss)
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda:
        state["cuda"] = [tensors[k].to(torch.uint8) for k in cuda]
    if "numpy_keys" in tensors:
        pos, has_gauss, cached = tensors["numpy_meta"].tolist()
        keys = tensors["numpy_keys"].numpy().astype("uint32")
        state["numpy"] = ("MT19937", keys, int(pos), int(has_gauss), float(cached))
    return state
