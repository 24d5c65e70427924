"""``python -m arc_dist.health``: the preflight as a command; exit 0 healthy, 13 bad node.

Outside a launcher it spawns ``--nproc-per-node`` local ranks (one per GPU by default, 1 on a
CPU-only host) that form a local group and run :func:`arc_dist.health.preflight`; under
torchrun it is one rank of the job's group. ``python -m arc_dist.launch --preflight`` runs it
before starting torchrun.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

from ..errors import ExitCode
from .group import backend, preflight, resolve_nproc, run_local


def _options(ns: argparse.Namespace) -> dict:
    return dict(matmul_size=ns.matmul_size, alloc_mb=ns.alloc_mb,
                min_free_fraction=ns.min_free_fraction, nvml=not ns.no_nvml)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m arc_dist.health``: exit 0 when the node is healthy, 13 when it is not."""
    p = argparse.ArgumentParser(
        prog="python -m arc_dist.health",
        description="Preflight health check of this node's GPUs and local collectives. Exit 0: "
        "healthy; 13: bad node (the failing device and check are printed); 11: usage error.",
    )
    p.add_argument("--nproc-per-node", default=os.environ.get("ARC_NPROC_PER_NODE", "auto"),
                   help="local ranks to check with: an int, or auto/gpu (one per GPU) or cpu "
                   "(1) (default auto)")  # fmt: skip
    p.add_argument("--json", default="", help="also write every rank's report to this file")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before a rank that has not reported counts as hung",
    )
    p.add_argument("--matmul-size", type=int, default=512)
    p.add_argument("--alloc-mb", type=int, default=256)
    p.add_argument("--min-free-fraction", type=float, default=0.5)
    p.add_argument("--no-nvml", action="store_true", help="skip the NVML queries")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        nproc = resolve_nproc(str(ns.nproc_per_node))
    except ValueError as e:
        p.print_usage(sys.stderr)
        sys.stderr.write(f"{p.prog}: error: {e}\n")
        return int(ExitCode.UNRECOVERABLE)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # under torchrun: this process is one rank of the job's group
        if not dist.is_initialized():
            dist.init_process_group(backend(), timeout=timedelta(seconds=ns.timeout))
        reports = [preflight(raise_on_failure=False, **_options(ns))]
    else:
        reports = run_local(nproc, timeout=ns.timeout, **_options(ns))
    ok = all(r.ok for r in reports)
    for r in reports:
        sys.stderr.write(r.format() + "\n")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"ok": ok, "ranks": [r.to_dict() for r in reports]}, f, indent=1)
    if ok:
        sys.stderr.write(f"arc_dist preflight: healthy ({len(reports)} local ranks)\n")
        return int(ExitCode.OK)
    for r in reports:
        if r.failures:
            sys.stderr.write(r.error_message() + "\n")
    sys.stderr.write(f"arc_dist preflight: BAD NODE -> exit {int(ExitCode.BAD_NODE)}\n")
    return int(ExitCode.BAD_NODE)


if __name__ == "__main__":
    sys.exit(main())
