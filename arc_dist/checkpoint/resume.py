"""Where ``Arc.resume()`` resumes from: the node-local snapshot tier or durable storage.

Every rank must load the same state, so the choice is a pure function (``choose_source``) of
data every rank holds after one ``all_gather_object`` on the training group: each rank's usable
local snapshots (local_tier.py; checked from manifests and file sizes), rank 0's listing of the
durable checkpoint root, and the snapshots already rejected. The rules:

1. only a (step, lineage) present on *every* rank counts (a rank restarted on another node, a
   world-size change, a file missing on one rank: durable storage);
2. the newest such local snapshot wins unless it is older than the durable checkpoint a durable
   resume would load first (the newest healthy one, checkpoint/lifecycle.py): that one holds
   newer healthy work, a final checkpoint on SIGTERM for example; at the same step the local
   copy wins (the same state, read from memory);
3. when the durable listing fails, a local snapshot is used if there is one.

A local choice is then verified (checksums, model keys and shapes) on every rank; a failure on
any rank rejects that snapshot for all and the choice is made again, so ranks never split.
If restoring fails midway, durable storage is loaded over the half-restored state; without a
durable checkpoint, ``CheckpointError``: training never starts from a half-restored state.
Rank 0 logs the source, the step and why. The collective that carries this out is
``Durability.resume`` (durability.py); this module holds its pure parts.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from ..layout import local_tensor
from .catalog import scan
from .lifecycle import trusted


class Source(StrEnum):
    """Where a resume loads from; a ``str`` so JSON records and comparisons with the plain
    strings keep working."""

    LOCAL = "local"  # the node-local snapshot tier
    DURABLE = "durable"  # durable checkpoint storage


LOCAL, DURABLE = Source.LOCAL, Source.DURABLE


@dataclass(frozen=True, slots=True)
class DurableView:
    """Rank 0's look at durable storage, shared with every rank."""

    #: the step a durable resume would load first (the newest healthy checkpoint), None: none
    newest: int | None = None
    #: steps of healthy committed checkpoints (a local resume at one of them need not save it
    #: again)
    healthy_steps: tuple[int, ...] = ()
    #: why the listing failed; None when it worked or there is no durable storage
    error: str | None = None
    #: False when Arc has no checkpoint_dir
    configured: bool = True


@dataclass(frozen=True, slots=True)
class Choice:
    source: Source
    step: int | None  # the local snapshot's step; None for DURABLE (the manager picks)
    lineage: str | None
    reason: str


def choose_source(
    local: Sequence[Sequence[tuple[int, str]]],
    durable: DurableView,
    rejected: Collection[tuple[int, str]] = (),
    notes: Sequence[Sequence[str]] = (),
) -> Choice:
    """Pure: the source every rank resumes from.

    ``local[r]``: rank r's usable (step, lineage) pairs; ``rejected``: pairs that failed
    verification on some rank; ``notes[r]``: rank r's reasons for unusable snapshots (for the
    message only).
    """
    sets = [set(c) - set(rejected) for c in local]
    common = set.intersection(*sets) if sets else set()
    if not common:
        if not any(local):
            why = "no local snapshot"
            hints = [f"rank {r}: {n[0]}" for r, n in enumerate(notes) if n]
            if hints:
                why += " usable (" + "; ".join(hints[:4]) + ")"
        elif not any(sets):
            why = f"every local snapshot was rejected ({_rejected(rejected)})"
        else:
            missing = [r for r, s in enumerate(sets) if not s]
            newest = max(max(s)[0] for s in sets if s)
            lacking = [r for r, s in enumerate(sets) if all(st != newest for st, _ in s)]
            why = (
                f"no local snapshot is on every rank (step {newest} is missing on ranks "
                f"{lacking or missing})"
            )
            hints = [
                f"rank {r}: {n[0]}" for r, n in enumerate(notes) if n and r in (lacking or missing)
            ]
            if hints:
                why += ": " + "; ".join(hints[:4])
        return Choice(DURABLE, None, None, why)
    step, lineage = max(common)
    if durable.newest is not None and step < durable.newest:
        return Choice(
            DURABLE, None, None,
            f"the local snapshot (step {step}) is older than the newest healthy durable "
            f"checkpoint (step {durable.newest})",
        )  # fmt: skip
    if not durable.configured:
        why = "no durable storage configured"
    elif durable.error is not None:
        why = f"durable storage could not be listed ({durable.error})"
    elif durable.newest is None:
        why = "no healthy durable checkpoint"
    else:
        why = f"newest healthy durable checkpoint: step {durable.newest}"
    return Choice(LOCAL, step, lineage, why)


def _rejected(rejected: Collection[tuple[int, str]]) -> str:
    return ", ".join(f"step {s}" for s, _ in sorted(rejected)) or "none"


def durable_view(manager: Any) -> DurableView:
    """Rank 0: one listing of the durable root and its manifests (small JSON reads)."""
    if manager is None:
        return DurableView(configured=False)
    try:
        infos = scan(manager.storage)
    except Exception as e:  # noqa: BLE001 - an unreachable store must not block a local resume
        return DurableView(error=f"{type(e).__name__}: {e}")
    healthy = tuple(sorted(i.step for i in infos if i.committed and trusted(i)))
    return DurableView(newest=healthy[-1] if healthy else None, healthy_steps=healthy)


def model_keys(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, local shape, dtype) of every tensor a snapshot holds, in snapshot order."""
    return [
        (k, tuple(local_tensor(t).shape), str(t.dtype))
        for k, t in model.state_dict(keep_vars=True).items()
    ]


def check_payload(payload: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  registered: dict) -> str | None:  # fmt: skip
    """Why ``payload`` cannot be restored into these live objects; None when it can."""
    try:
        want = [tuple(x) for x in payload["model_keys"]]
        have = model_keys(model)
        if [(k, tuple(s), d) for k, s, d in want] != have:
            missing = [k for k, *_ in have if k not in {w[0] for w in want}]
            diff = [f"{h[0]}: {list(w[1])} {w[2]} vs model {list(h[1])} {h[2]}"
                    for w, h in zip(want, have) if w != h]  # fmt: skip
            return "does not match the model: " + "; ".join(
                ([f"missing keys {missing[:4]}"] if missing else []) + diff[:4]
                or [f"{len(want)} tensors saved, the model has {len(have)}"]
            )
        if len(payload["model"]) != len(have):
            return "model tensors missing from the snapshot"
        if payload.get("optimizer") != type(optimizer).__name__:
            return (
                f"saved with optimizer {payload.get('optimizer')}, not {type(optimizer).__name__}"
            )
        skel = payload["optim_skeleton"]
        groups = skel.get("param_groups", [])
        live = optimizer.param_groups
        if len(groups) != len(live) or any(
            len(g["params"]) != len(lg["params"]) for g, lg in zip(groups, live)
        ):
            return "does not match the optimizer's parameter groups"
        missing_reg = sorted(set(registered) - set(payload.get("registered", {})))
        if missing_reg:
            return f"no state for registered objects {missing_reg}"
    except (KeyError, TypeError, AttributeError) as e:
        return f"payload misses or garbles a field ({e!r})"
    return None


def own_state(arc_state: dict, registered: dict) -> dict:
    """Training thread, at a snapshot: the small per-rank state, deep-copied (written later).

    ``registered``: each registered object's state dict, by name."""
    return {"arc": copy.deepcopy(arc_state), "registered": copy.deepcopy(registered)}
