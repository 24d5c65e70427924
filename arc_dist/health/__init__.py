"""Node health: keep a job off a sick GPU, and tell a broken device from a bad step.

* :func:`preflight` (collective, group.py): every rank checks its own devices (checks.py:
  ``device_count``, ``alloc``, ``matmul``, ``memory``; ``nvml`` in nvml.py when ``pynvml`` is
  installed), then one small all-reduce over the group checks a known sum and tells every rank
  which ranks failed. Returns a :class:`HealthReport`; a failure raises
  :class:`~arc_dist.errors.BadNodeError` (exit code 13) on the failing ranks, naming host,
  device, check and fix, and ``ArcError`` (exit code 10) on their healthy peers. On a CPU-only
  machine the device checks report ``skipped`` and the collective still runs.
  ``ArcConfig(preflight=True)`` runs it in ``Arc.__init__``; ``python -m arc_dist.health``
  (__main__.py) runs it on spawned local ranks; ``python -m arc_dist.launch --preflight`` runs
  that before torchrun.
* :func:`device_fault` / :func:`is_device_error` / :func:`hardware_error` (device_errors.py):
  CUDA/NCCL device errors during training become a logged ``HardwareError`` (exit code 12),
  with no in-memory rollback.

Fault injection: ``ARC_CHAOS_PREFLIGHT`` (:func:`preflight_faults`, names.py) and the
``device_error`` step fault (:mod:`arc_dist.chaos`). See docs/health.md.
"""

from .checks import Check, HealthReport, run_local_checks
from .device_errors import (
    DeviceFault,
    describe_device,
    device_fault,
    hardware_error,
    is_device_error,
)
from .group import preflight, raise_for, run_local
from .names import CHECKS, FAILED, PASSED, SKIPPED, preflight_faults

__all__ = [
    "CHECKS",
    "FAILED",
    "PASSED",
    "SKIPPED",
    "Check",
    "DeviceFault",
    "HealthReport",
    "describe_device",
    "device_fault",
    "hardware_error",
    "is_device_error",
    "preflight",
    "preflight_faults",
    "raise_for",
    "run_local",
    "run_local_checks",
]
