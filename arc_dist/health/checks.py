"""This node's device checks, one process at a time (no collectives), and the report types.

``device_count`` (CUDA devices vs ``LOCAL_WORLD_SIZE``), ``alloc`` (write and read back device
memory), ``matmul`` (an integer-valued matmul on the device, compared exactly with the CPU),
``memory`` (free memory is sane) and ``nvml`` (nvml.py). On a CPU-only machine they report
``skipped``; a check named in ``inject`` (``ARC_CHAOS_PREFLIGHT``) runs against the CPU with a
real fault injected, so the failing path is testable anywhere.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .names import FAILED, PASSED, SKIPPED, injected
from .nvml import Nvml

_FIX = {
    "device_count": "run nvidia-smi on this host: a GPU that fell off the bus or a broken "
    "driver needs a node reboot or replacement; drain the node",
    "alloc": "this GPU's memory returns wrong data: drain the node and run the vendor "
    "diagnostics (e.g. dcgmi diag -r 3)",
    "matmul": "this GPU computes wrong results: drain the node and run the vendor diagnostics "
    "(e.g. dcgmi diag -r 3)",
    "memory": "another process holds GPU memory (a worker left from an earlier attempt?): find "
    "it with nvidia-smi --query-compute-apps=pid,used_memory --format=csv, or lower "
    "min_free_fraction",
    "nvml": "the GPU reports pending memory repairs or uncorrectable errors: reset the GPU "
    "(nvidia-smi -r) or reboot the node before training on it",
    "allreduce": "a collective returned a wrong sum: check the NICs/NVLink (e.g. nccl-tests "
    "all_reduce_perf) and drain the node",
    "finished": "a rank that hangs or dies in these checks usually has a hung GPU or driver: "
    "see that rank's output, then reset the GPU or drain the node",
}


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check on one device (``device`` None: the host or the group)."""

    name: str
    status: str
    detail: str
    device: str | None = None
    seconds: float = 0.0

    @property
    def fix(self) -> str | None:
        return _FIX.get(self.name) if self.status == FAILED else None


@dataclass(frozen=True, slots=True)
class HealthReport:
    """One rank's checks plus what the collective told it about the other ranks."""

    host: str
    rank: int
    world_size: int
    checks: tuple[Check, ...]
    #: ranks of the group whose own checks failed (the same on every rank)
    failed_ranks: tuple[int, ...] = ()

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAILED]

    @property
    def ok(self) -> bool:
        """True when every rank of the group passed (skipped checks count as passed)."""
        return not self.failures and not self.failed_ranks

    def status(self, name: str) -> list[str]:
        """The statuses of check ``name`` (one per device it ran on)."""
        return [c.status for c in self.checks if c.name == name]

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        lines = [f"arc_dist preflight on host {self.host}, rank {self.rank} of {self.world_size}:"]
        for c in self.checks:
            lines.append(
                f"  {c.name:<13}{c.status:<8} {c.device or '-':<8} {c.detail} "
                f"({c.seconds * 1e3:.0f} ms)"
            )
        return "\n".join(lines)

    def error_message(self) -> str:
        """The first failure with its device and fix; empty when this rank's checks passed."""
        bad = self.failures
        if not bad:
            return ""
        c = bad[0]
        more = f" (also failed: {', '.join(f'{b.name} on {b.device}' for b in bad[1:])})"
        return (
            f"arc_dist preflight failed on host {self.host}, rank {self.rank}: check "
            f"'{c.name}' on {c.device or 'this host'}: {c.detail}{more if bad[1:] else ''}. "
            f"Fix: {c.fix}."
        )


# ---------------------------------------------------------------------------------------------
# Local device checks
# ---------------------------------------------------------------------------------------------


def _host_has_nvidia_devices() -> bool:
    """Whether this host looks like a GPU node (device files), unless CUDA was hidden on purpose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))


def select_devices(devices: Sequence[torch.device | str | int] | None) -> list[torch.device]:
    """The CUDA devices this rank checks: the given ones, else its own (``LOCAL_RANK``), else all."""
    if devices is not None:
        out = [torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in devices]
        return [d for d in out if d.type == "cuda"]
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return [torch.device("cuda", int(local))] if int(local) < count else []
    return [torch.device("cuda", i) for i in range(count)]


def _timed(name: str, device: str | None, fn, *args) -> Check:
    t0 = time.monotonic()
    try:
        status, detail = fn(*args)
    except Exception as e:  # noqa: BLE001 - any error on the device is the check's finding
        status, detail = FAILED, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return Check(name, status, detail, device, time.monotonic() - t0)


def _check_device_count(expect_gpu: bool | None, inject: bool) -> tuple[str, str]:
    expected = os.environ.get("LOCAL_WORLD_SIZE")
    expected_n = int(expected) if expected and expected.isdigit() else None
    if not torch.cuda.is_available() and not inject:
        gpu_host = _host_has_nvidia_devices() if expect_gpu is None else expect_gpu
        if gpu_host and torch.version.cuda is not None:
            return FAILED, (
                "CUDA is not available, but this host has NVIDIA devices (/dev/nvidia*): the "
                "driver or a GPU is broken"
            )
        return SKIPPED, "no CUDA device (CPU-only host or CPU-only torch build)"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if inject:  # one device short, as when a GPU falls off the bus
        expected_n = expected_n or count or 1
        count = expected_n - 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    if expected_n is not None and count < expected_n:
        return FAILED, (
            f"{count} CUDA devices visible{where}, but LOCAL_WORLD_SIZE={expected_n} needs one "
            f"per local rank{injected(inject)}"
        )
    extra = f"; LOCAL_WORLD_SIZE={expected_n} uses {expected_n}" if expected_n else ""
    return PASSED, f"{count} CUDA devices visible{where}{extra}"


def _check_alloc(device: torch.device, megabytes: int, inject: bool) -> tuple[str, str]:
    n = megabytes << 20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = max(1 << 20, min(n, free // 4))
    else:  # only reached with an injected fault: keep the simulation cheap
        n = 1 << 20
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    bad = 0
    for pattern in (0xA5, 0x5A):
        buf.fill_(pattern)
        if inject:
            buf[n // 2] ^= 0x10  # one flipped bit, as a bad memory cell would
        bad += int((buf != pattern).sum())
    del buf
    if bad:
        return FAILED, (
            f"{bad} of {2 * n} bytes read back wrong after writing 0xA5/0x5A patterns to "
            f"{n >> 20} MiB{injected(inject)}"
        )
    return PASSED, f"{n >> 20} MiB written and read back (0xA5, 0x5A)"


def _check_matmul(device: torch.device, size: int, inject: bool) -> tuple[str, str]:
    # Small integers: every product and partial sum is an integer below 2**24, exact in fp32
    # (and in TF32, whose 10-bit mantissa holds -4..4), in any summation order. So the device
    # result must equal the CPU's bit for bit; any difference is a wrong computation.
    g = torch.Generator().manual_seed(1234)
    a = torch.randint(-4, 5, (size, size), generator=g).float()
    b = torch.randint(-4, 5, (size, size), generator=g).float()
    ref = a @ b
    da, db = a.to(device), b.to(device)
    runs, worst, bad = 3, 0.0, 0
    for i in range(runs):
        out = da @ db
        if inject and i == runs - 1:
            out.view(-1)[size + 1] += 1.0  # one wrong element, as a faulty SM would produce
        out = out.cpu()
        diff = (out != ref).sum().item()
        if diff:
            bad = max(bad, int(diff))
            worst = max(worst, float((out - ref).abs().max()))
    if bad:
        return FAILED, (
            f"{bad} of {size * size} elements of a {size}x{size} integer matmul differ from the "
            f"CPU result (max error {worst:g}; {runs} runs){injected(inject)}"
        )
    return PASSED, f"{size}x{size} integer matmul equals the CPU result exactly ({runs} runs)"


def _check_memory(device: torch.device, min_free_fraction: float, inject: bool) -> tuple[str, str]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        own = torch.cuda.memory_reserved(device)  # this process's own cache counts as usable
    else:
        free, total, own = 0, 1 << 30, 0  # only reached with an injected fault
    if inject:
        free, own = 0, 0
    usable = (free + own) / total if total else 0.0
    gib = 1 << 30
    if total == 0 or usable < min_free_fraction:
        return FAILED, (
            f"only {free / gib:.1f} GiB of {total / gib:.1f} GiB free (+{own / gib:.1f} GiB held "
            f"by this process), below min_free_fraction={min_free_fraction:g}{injected(inject)}"
        )
    return PASSED, f"{free / gib:.1f} GiB of {total / gib:.1f} GiB free"


# -- NVML (optional) -------------------------------------------------------------------------


def run_local_checks(
    devices: Sequence[torch.device | str | int] | None = None,
    *,
    matmul_size: int = 512,
    alloc_mb: int = 256,
    min_free_fraction: float = 0.5,
    nvml: bool = True,
    expect_gpu: bool | None = None,
    inject: frozenset[str] = frozenset(),
) -> list[Check]:
    """This process's device checks (no collectives); see the module docstring.

    ``devices``: the CUDA devices to check (default: ``cuda:$LOCAL_RANK`` under a launcher, else
    every visible one); ``expect_gpu``: whether a missing CUDA runtime is a failure (default:
    when the host has ``/dev/nvidia*``); ``inject``: names of checks to make fail (chaos).
    """
    checks = [
        _timed("device_count", None, _check_device_count, expect_gpu, "device_count" in inject)
    ]
    targets = select_devices(devices)
    if not targets:
        injected = inject & {"alloc", "matmul", "memory", "nvml"}
        if injected:  # simulate on the CPU so the failing path runs on any machine
            targets = [torch.device("cpu")]
        else:
            why = "no CUDA device to check" if checks[0].status != FAILED else "see device_count"
            return checks + [Check(n, SKIPPED, why) for n in ("alloc", "matmul", "memory", "nvml")]
    nv = Nvml(nvml and targets[0].type == "cuda")
    xid_note = nv.watch_xids([d for d in targets if d.type == "cuda"])
    runs = (("alloc", _check_alloc, alloc_mb), ("matmul", _check_matmul, matmul_size),
            ("memory", _check_memory, min_free_fraction))  # fmt: skip
    for d in targets:
        for name, fn, arg in runs:
            if d.type == "cuda" or name in inject:
                checks.append(_timed(name, str(d), fn, d, arg, name in inject))
            else:
                checks.append(Check(name, SKIPPED, "no CUDA device to check", str(d)))
    if targets[0].type == "cuda":
        torch.cuda.synchronize()
    for d in targets:
        if d.type == "cuda" or "nvml" in inject:
            checks.append(_timed("nvml", str(d), nv.check, d, "nvml" in inject, xid_note))
        else:
            checks.append(Check("nvml", SKIPPED, "no CUDA device to check", str(d)))
    return checks
