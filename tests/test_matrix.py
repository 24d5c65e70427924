"""The usage matrix: every loop pattern of tests/_matrix.py, in each layout, clean and faulty.

A clean cell must end at the step count with no failure, no rollback, no LR backoff and no
skip (GradScaler overflows excepted, where the pattern uses one), with a finite loss. A faulty
cell must act on its one injected fault (skip or roll back), reach the step count, agree on
every action across ranks, keep DDP replicas identical and end within tolerance of the clean
cell's loss. One process group per layout runs all of its cells; each test checks one cell.

Cells that fail for known, not yet fixed causes are listed in ``KNOWN`` (strict xfail): remove
an entry once its cause is fixed.
"""

from __future__ import annotations

import math
import os
import pickle

import pytest

from arc_dist.chaos import parse

from ._dist import run_ranks
from ._matrix import PATTERNS, STEPS, VARIANTS, cell_file, run_layout

#: (pattern, layout, variant) -> why the cell fails today (none does)
KNOWN: dict[tuple[str, str, str], str] = {}

BY_NAME = {p.name: p for p in PATTERNS}
WORLD = {"single": 1, "ddp": 2, "fsdp": 2}


def _cells():
    for p in PATTERNS:
        for layout in p.layouts:
            for variant in VARIANTS:
                reason = KNOWN.get((p.name, layout, variant))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(p.name, layout, variant, marks=marks,
                                   id=f"{p.name}-{layout}-{variant}")  # fmt: skip


def _run_layout(layout: str, tmp_path_factory) -> tuple[dict, str | None]:
    """{(pattern, variant): [per-rank result or None]}, and why the group stopped early."""
    names = [p.name for p in PATTERNS if layout in p.layouts]
    workdir = str(tmp_path_factory.mktemp(f"matrix-{layout}"))
    outdir = str(tmp_path_factory.mktemp(f"matrix-{layout}-out"))
    world = WORLD[layout]
    stopped = None
    try:
        run_ranks(run_layout, world, layout, names, workdir, outdir, timeout=300,
                  distributed=layout != "single")  # fmt: skip
    except (AssertionError, TimeoutError) as e:  # cells written before it still count
        stopped = str(e)
    results = {}
    for name in names:
        for variant in VARIANTS:
            ranks = []
            for rank in range(world):
                path = cell_file(outdir, layout, name, variant, rank)
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        ranks.append(pickle.load(f))
                else:
                    ranks.append(None)
            results[(name, variant)] = ranks
    return results, stopped


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    cache: dict[str, tuple[dict, str | None]] = {}

    def get(layout: str):
        if layout not in cache:
            cache[layout] = _run_layout(layout, tmp_path_factory)
        return cache[layout]

    return get


def _problems(
    name: str, layout: str, variant: str, results: dict, stopped: str | None
) -> list[str]:
    pattern = BY_NAME[name]
    ranks = results[(name, variant)]
    missing = [r for r, res in enumerate(ranks) if res is None]
    if missing:
        return [f"no result from ranks {missing}: the group stopped ({stopped})"]
    failed = [(r, res) for r, res in enumerate(ranks) if res["error"]]
    if failed:
        return [f"rank {r}: {res['error']}" for r, res in failed] + [failed[0][1]["trace"]]
    out = []
    events = ranks[0]["events"]
    if any(res["events"] != events for res in ranks):
        out.append(f"ranks acted differently: {[res['events'] for res in ranks]}")
    for r, res in enumerate(ranks):
        if res["step"] != STEPS:
            out.append(f"rank {r} stopped at step {res['step']}")
        if not math.isfinite(res["eval"]):
            out.append(f"rank {r}: final loss {res['eval']}")
        out += [f"rank {r}: {p}" for p in res["problems"]]
    if layout == "ddp" and len({res["digest"] for res in ranks}) > 1:
        out.append("DDP replicas differ")
    if variant == "clean":
        wrong = [
            e for e in events
            if e[1] == "failure" or (e[4] and not (pattern.amp_skips and e[2] == "amp_overflow"))
        ]  # fmt: skip
        if wrong:
            out.append(f"a clean run was acted on: {wrong}")
        if ranks[0]["stats"]["lr_scale"] != 1.0:
            out.append(f"a clean run ends with the LR scaled by {ranks[0]['stats']['lr_scale']}")
        return out
    fault = parse(pattern.fault_spec(layout, len(ranks)))[0]
    for r, res in enumerate(ranks):
        injected = r in (fault.ranks or range(len(ranks)))
        if bool(res["fired"]) != injected:
            out.append(
                f"rank {r}: fault fired {res['fired']}, expected {'one' if injected else 'none'}"
            )
    early = [e for e in events if e[0] < fault.step and e[4]]
    if early:
        out.append(f"acted on before the fault at step {fault.step}: {early}")
    if not any(e[4] for e in events):  # skipped or rolled back
        out.append(f"{fault.kind} at step {fault.step} was not acted on: {events}")
    clean = results[(name, "clean")]
    for r, (res, ref) in enumerate(zip(ranks, clean)):
        if ref is None or ref["error"]:
            out.append(f"rank {r}: no clean run to compare with")
        elif not res["eval"] <= pattern.tolerance * ref["eval"] + 0.02:
            out.append(f"rank {r}: final loss {res['eval']:.4f} vs clean {ref['eval']:.4f}")
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name,layout,variant", list(_cells()))
def test_cell(matrix, name, layout, variant):
    results, stopped = matrix(layout)
    problems = _problems(name, layout, variant, results, stopped)
    assert not problems, f"{name} / {layout} / {variant}:\n  " + "\n  ".join(problems)
