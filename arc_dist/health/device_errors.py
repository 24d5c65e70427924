"""Device errors during training: is an exception a broken GPU rather than a bad step?

:func:`device_fault` classifies CUDA errors (illegal memory access, ECC, launch failure, lost
device, ...) and NCCL errors and timeouts; :func:`hardware_error` turns one into a logged
:class:`~arc_dist.errors.HardwareError` (exit code 12) that names rank, host and device.
There is no in-memory rollback for these: the CUDA context cannot be trusted. ``Arc.step`` and
``arc_dist.launch.main_entry`` call it.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

from ..errors import ArcError, ExitCode, HardwareError

log = logging.getLogger("arc_dist")


@dataclass(frozen=True, slots=True)
class DeviceFault:
    """What kind of device error an exception is."""

    kind: str
    #: the error itself points at this host's hardware (ECC, a lost device, NVLink, an Xid).
    #: False: a peer, the network or the program may be at fault; the launcher's bad-node rule
    #: then counts it only when the same code ran without it on another host
    blames_host: bool


#: never device errors, although they mention CUDA: resource limits and setup mistakes
_NOT_DEVICE = (
    "out of memory",
    "alloc_failed",
    "no kernel image",
    "invalid device ordinal",
    "not compiled with cuda",
    "cuda is not available",
)
#: (substring of the lower-cased message, kind, blames_host), first match wins.
#: blames_host only on evidence that points at the hardware (ECC, a lost device, NVLink, an
#: Xid): an illegal address, a launch failure or a failed cuBLAS call is what a kernel bug or a
#: bad index looks like too, and would repeat on any healthy node running the same code.
_CUDA_PATTERNS = (
    ("uncorrectable ecc", "ecc", True),
    ("ecc error", "ecc", True),
    ("fallen off the bus", "device_lost", True),
    ("device lost", "device_lost", True),
    ("gpu is lost", "device_lost", True),
    ("nvlink", "nvlink", True),
    ("row remap", "row_remap", True),
    ("nvrm: xid", "xid", True),
    ("xid error", "xid", True),
    ("illegal memory access", "illegal_memory_access", False),
    ("unspecified launch failure", "launch_failure", False),
    ("illegal instruction", "illegal_instruction", False),
    ("misaligned address", "misaligned_address", False),
    ("hardware stack error", "hardware_stack_error", False),
    ("launch timed out", "launch_timeout", False),
    ("device-side assert", "device_assert", False),
    ("cublas_status_execution_failed", "cublas_execution_failed", False),
    ("cudnn_status_execution_failed", "cudnn_execution_failed", False),
    ("cuda driver error", "cuda_driver", False),
    ("cuda error", "cuda", False),
)


def device_fault(error: BaseException | str) -> DeviceFault | None:
    """Classify ``error`` (an exception, its cause chain, or a message); None: not a device error.

    Device errors: CUDA errors (illegal memory access, ECC, launch failure, lost device, ...),
    ``torch.AcceleratorError``, NCCL errors and NCCL timeouts. Not device errors: CUDA out of
    memory, setup mistakes (no kernel image, bad ordinal), gloo/TCP peer errors, and arc-dist's
    own ``ArcError`` (already classified).
    """
    seen = 0
    while error is not None and seen < 8:
        seen += 1
        if isinstance(error, ArcError):
            return None
        fault = _classify_one(error)
        if fault is not None:
            return fault
        if isinstance(error, str):
            return None
        error = error.__cause__ or error.__context__
    return None


def _classify_one(error: BaseException | str) -> DeviceFault | None:
    names = () if isinstance(error, str) else tuple(t.__name__ for t in type(error).__mro__)
    msg = str(error).lower()
    if "OutOfMemoryError" in names or any(s in msg for s in _NOT_DEVICE):
        return None
    if "nccl" in msg:
        if "unhandled cuda error" in msg:  # a CUDA error NCCL saw: what kind, it does not say
            return DeviceFault("nccl_cuda", False)
        if "timeout" in msg or "timed out" in msg:
            return DeviceFault("nccl_timeout", False)
        return DeviceFault("nccl", False)
    for pattern, kind, blames in _CUDA_PATTERNS:
        if pattern in msg:
            return DeviceFault(kind, blames)
    if "AcceleratorError" in names:
        return DeviceFault("accelerator", False)
    return None


def is_device_error(error: BaseException | str) -> bool:
    """True when ``error`` is a CUDA/NCCL device error (see :func:`device_fault`)."""
    return device_fault(error) is not None


def describe_device(device: torch.device | str | None = None) -> str:
    """``cuda:N (name, GPU-uuid)`` for logs; never raises (it runs after a device error)."""
    try:
        if device is None:
            if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                return "cpu"
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        if device.type != "cuda":
            return str(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid and not uuid.startswith("GPU-"):
            uuid = f"GPU-{uuid}"
        return f"cuda:{index} ({props.name}{', ' + uuid if uuid else ''})"
    except Exception:  # noqa: BLE001
        return str(device)


def hardware_error(
    error: BaseException,
    *,
    rank: int | None = None,
    device: torch.device | str | None = None,
    step: int | None = None,
) -> HardwareError | None:
    """A logged :class:`HardwareError` for a device error, or None when ``error`` is not one.

    The message names rank, host, device and the error, and says why there is no rollback. The
    caller raises it (``raise hw from error``); ``main_entry`` turns it into exit code 12 and an
    error file that carries the host, the device and whether the error blames this host.
    """
    fault = device_fault(error)
    if fault is None:
        return None
    if rank is None:
        rank_env = os.environ.get("RANK")
        rank = int(rank_env) if rank_env and rank_env.isdigit() else 0
    host, where = socket.gethostname(), describe_device(device)
    at = f" at step {step}" if step is not None else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    message = (
        f"rank {rank} on host {host}, device {where}: device error{at} ({fault.kind}): "
        f"{type(error).__name__}: {first}. No in-memory rollback: the CUDA context cannot be "
        f"trusted. Exit code {int(ExitCode.HARDWARE)} (HARDWARE): the launcher restarts the "
        "group; if it repeats on this host, drain the node."
    )
    log.error("arc_dist: %s", message)
    return HardwareError(
        message, host=host, device=where, kind=fault.kind, blames_host=fault.blames_host
    )
