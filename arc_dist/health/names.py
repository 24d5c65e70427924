"""The preflight checks' names and outcomes, and the faults ``ARC_CHAOS_PREFLIGHT`` injects
into them: what checks.py, nvml.py and group.py share without importing one another."""

from __future__ import annotations

import os
import re

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
#: every check, in the order they run
CHECKS = ("device_count", "alloc", "matmul", "memory", "nvml", "allreduce")


def injected(inject: bool) -> str:
    """The note a check's detail ends with when its failure was injected."""
    return " (fault injected by ARC_CHAOS_PREFLIGHT)" if inject else ""


def preflight_faults(rank: int, spec: str | None = None) -> frozenset[str]:
    """Preflight checks (``arc_dist.health``) to make fail on ``rank``.

    ``spec`` defaults to ``$ARC_CHAOS_PREFLIGHT``: ``CHECK[/RANK[+RANK...]]`` separated by
    spaces or commas, e.g. ``matmul/1`` (rank 1's matmul returns a wrong element) or
    ``allreduce`` (every rank's all-reduce sees a wrong sum). Ranks are ranks of the group the
    preflight runs over (local ranks for ``python -m arc_dist.health``). The fault is real: the
    check runs (on the CPU when there is no GPU) and finds the corruption.
    """
    spec = os.environ.get("ARC_CHAOS_PREFLIGHT", "") if spec is None else spec
    out = set()
    for token in re.split(r"[\s,;]+", spec.strip()):
        if not token:
            continue
        name, _, ranks = token.partition("/")
        if name not in CHECKS or (ranks and not re.fullmatch(r"\d+(\+\d+)*", ranks)):
            raise ValueError(
                f"ARC_CHAOS_PREFLIGHT: cannot parse {token!r}: expected CHECK[/RANK[+RANK]] "
                f"with CHECK one of {', '.join(CHECKS)}"
            )
        if not ranks or rank in {int(r) for r in ranks.split("+")}:
            out.add(name)
    return frozenset(out)
