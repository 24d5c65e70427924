"""The collective half of the preflight: :func:`preflight`, and :func:`run_local` that spawns
the local ranks for ``python -m arc_dist.health``.

One all-reduce over the group carries a known sum (checked exactly) and one "my checks failed"
slot per rank, so every rank reaches the same verdict and knows which ranks failed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ArcError, BadNodeError
from .checks import Check, HealthReport, run_local_checks, select_devices
from .names import FAILED, PASSED, SKIPPED, injected, preflight_faults

log = logging.getLogger("arc_dist")

_SUM_LEN = 1024


def _allreduce_check(group, rank: int, world_size: int, failed: bool, inject: bool,
                     device: torch.device) -> tuple[Check, tuple[int, ...]]:  # fmt: skip
    """Collective over ``group``: a known sum plus one "my checks failed" slot per rank."""
    t0 = time.monotonic()
    pattern = torch.arange(_SUM_LEN, dtype=torch.float32) % 7 + 1
    buf = torch.zeros(_SUM_LEN + world_size, dtype=torch.float32)
    buf[:_SUM_LEN] = pattern * (rank + 1)
    if inject:
        buf[3] += 1.0  # a corrupted contribution: every rank sees a wrong sum
    buf[_SUM_LEN + rank] = float(failed)
    buf = buf.to(device)
    # every rank of the group calls this once, in the same order (preflight is collective)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    out = buf.cpu()
    expected = pattern * (world_size * (world_size + 1) / 2)
    wrong = int((out[:_SUM_LEN] != expected).sum())
    failed_ranks = tuple(int(r) for r in (out[_SUM_LEN:] != 0).nonzero().flatten())
    backend = dist.get_backend(group)
    if wrong:
        check = Check("allreduce", FAILED, (
            f"{wrong} of {_SUM_LEN} elements of a {backend} all-reduce over {world_size} ranks "
            f"differ from the known sum{injected(inject)}"
        ), str(device), time.monotonic() - t0)  # fmt: skip
    else:
        check = Check("allreduce", PASSED, f"{backend} all-reduce over {world_size} ranks returned "
                      "the known sum", str(device), time.monotonic() - t0)  # fmt: skip
    return check, failed_ranks


def preflight(
    group: Any = None,
    *,
    devices: Sequence[torch.device | str | int] | None = None,
    raise_on_failure: bool = True,
    **options: Any,
) -> HealthReport:
    """Collective: check this node's devices and the group's collective path.

    Every rank of ``group`` (default: the default group when torch.distributed is initialized;
    none: the collective check is skipped) must call it, in the same order as other
    collectives. ``options`` go to :func:`run_local_checks` (``matmul_size``, ``alloc_mb``,
    ``min_free_fraction``, ``nvml``, ``expect_gpu``). ``ARC_CHAOS_PREFLIGHT`` makes checks fail
    on chosen ranks (see :func:`~arc_dist.health.names.preflight_faults`).

    Returns this rank's :class:`HealthReport` (every rank agrees on ``ok``). With
    ``raise_on_failure`` a failure raises :class:`~arc_dist.errors.BadNodeError` (exit code 13)
    on the ranks whose own checks failed (on every rank when the all-reduce itself was wrong),
    and ``ArcError`` (exit code 10, restart) on the others.
    """
    distributed = dist.is_available() and dist.is_initialized()
    if group is None and distributed:
        group = dist.group.WORLD
    rank = dist.get_rank(group) if group is not None else 0
    world_size = dist.get_world_size(group) if group is not None else 1
    inject = preflight_faults(rank)
    checks = run_local_checks(devices, inject=inject, **options)
    own_failed = any(c.status == FAILED for c in checks)
    failed_ranks: tuple[int, ...] = (rank,) if own_failed else ()
    if group is not None:
        from ..agreement import comm_device

        cuda = select_devices(devices)
        dev = comm_device(group, cuda[0] if cuda else torch.device("cpu"))
        check, failed_ranks = _allreduce_check(group, rank, world_size, own_failed,
                                               "allreduce" in inject, dev)  # fmt: skip
        checks.append(check)
    else:
        checks.append(Check("allreduce", SKIPPED, "no process group (a single process)"))
    report = HealthReport(socket.gethostname(), rank, world_size, tuple(checks), failed_ranks)
    if report.ok:
        log.log(logging.INFO if rank == 0 else logging.DEBUG, "%s", report.format())
        return report
    log.error("%s", report.format())
    if raise_on_failure:
        raise_for(report)
    return report


def raise_for(report: HealthReport) -> None:
    """Raise what a failed :class:`HealthReport` means for this rank (see :func:`preflight`)."""
    if report.failures:
        raise BadNodeError(report.error_message())
    if report.failed_ranks:
        raise ArcError(
            f"arc_dist preflight: ranks {list(report.failed_ranks)} failed their health checks "
            f"(see their logs); rank {report.rank} on {report.host} passed and exits for a "
            "restart without the bad node"
        )


def resolve_nproc(value: str) -> int:
    """Local ranks for ``--nproc-per-node``: an int, or auto/gpu (one per GPU), cpu (one)."""
    if value.isdigit() and int(value) >= 1:
        return int(value)
    if value in ("auto", "gpu"):
        return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    if value in ("cpu", "xpu"):
        return 1
    raise ValueError(f"--nproc-per-node={value!r} is invalid: use an integer >= 1, or auto/gpu/cpu")


def backend() -> str:
    """The backend the spawned local group uses: NCCL where there are GPUs, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _cli_worker(local_rank: int, nproc: int, outdir: str, options: dict, timeout: float) -> None:
    """One spawned local rank: form the local group, run :func:`preflight`, write the report."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))  # fmt: skip
    logging.getLogger("arc_dist").setLevel(logging.CRITICAL)  # the parent prints every report
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend(), init_method=f"file://{outdir}/rendezvous",
                            rank=local_rank, world_size=nproc,
                            timeout=timedelta(seconds=timeout))  # fmt: skip
    try:
        report = preflight(raise_on_failure=False, **options)
        with open(os.path.join(outdir, f"rank{local_rank}.json"), "w") as f:
            json.dump(report.to_dict(), f)
    finally:
        dist.destroy_process_group()


def _report_from(d: dict) -> HealthReport:
    checks = tuple(Check(**c) for c in d["checks"])
    return HealthReport(d["host"], d["rank"], d["world_size"], checks, tuple(d["failed_ranks"]))


def run_local(nproc: int, *, timeout: float = 300.0, **options: Any) -> list[HealthReport]:
    """Run :func:`preflight` on ``nproc`` freshly spawned local ranks; one report per rank.

    A rank that crashes or does not finish within ``timeout`` seconds (a hung GPU) gets a
    report with a failed check that says so.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="arc-health-") as outdir:
        ctx = mp.start_processes(_cli_worker, args=(nproc, outdir, options, timeout), nprocs=nproc,
                                 join=False, start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    if ctx.join(timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
                        break
                except mp.ProcessRaisedException:
                    break  # reported below as that rank's failure
                except mp.ProcessExitedException:
                    break
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        reports = []
        for r in range(nproc):
            path = os.path.join(outdir, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    reports.append(_report_from(json.load(f)))
                continue
            code = ctx.processes[r].exitcode
            if code is None or code < 0:
                what = (
                    f"did not report within {timeout:g} s, or was stopped after another rank failed"
                )
            else:
                what = f"exited with code {code} before reporting (see its output above)"
            check = Check("finished", FAILED, f"local rank {r} {what}", f"local rank {r}")
            reports.append(HealthReport(socket.gethostname(), r, nproc, (check,), (r,)))
    return reports
