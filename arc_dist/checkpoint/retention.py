"""Which checkpoint directories to delete: a pure policy plus the ordered deletion.

Rules (``plan_retention``):

* keep the ``keep`` newest committed checkpoints;
* never delete the newest confirmed checkpoint, however old;
* delete a partial directory (no manifest: a crashed, failed or uncommitted save) only when a
  newer checkpoint has been committed since, so a save that is still being written, or the
  newest attempt before a crash, is never touched; ``protect`` names steps that must be skipped
  regardless (the save in flight, and what ``lifecycle.Lifecycle.protected`` keeps: the newest
  healthy checkpoint, the one resumed from, the fallbacks of possible rollbacks);
* delete oldest first.

``delete`` removes the manifest first (uncommit), then the rest: a crash in the middle leaves a
partial directory, never a committed checkpoint with missing files.
"""

from __future__ import annotations

import logging

from .catalog import CheckpointInfo
from .manifest import CONFIRMED_NAME, MANIFEST_NAME
from .storage import Storage


def plan_retention(
    infos: list[CheckpointInfo], keep: int, *, protect: frozenset[int] | set[int] = frozenset()
) -> list[CheckpointInfo]:
    if keep < 1:
        raise ValueError(f"keep={keep} is invalid: keep at least 1 checkpoint")
    committed = sorted(i.step for i in infos if i.committed)
    kept = set(committed[-keep:])
    confirmed = [i.step for i in infos if i.confirmed]
    if confirmed:
        kept.add(max(confirmed))
    newest = committed[-1] if committed else None
    victims = []
    for info in sorted(infos, key=lambda i: i.step):
        if info.step in kept or info.step in protect:
            continue
        if info.committed or (newest is not None and info.step < newest):
            victims.append(info)
    return victims


def uncommit(storage: Storage, path: str) -> None:
    """Make ``path`` stop being a checkpoint, then delete it: manifest first, data last."""
    storage.rm_file(f"{path}/{MANIFEST_NAME}")
    storage.rm_file(f"{path}/{CONFIRMED_NAME}")
    storage.rm_tree(path)


def delete(storage: Storage, victims: list[CheckpointInfo], logger: logging.Logger) -> list[int]:
    """Delete ``victims`` oldest first; returns the steps removed (failures are logged, skipped)."""
    removed = []
    for info in sorted(victims, key=lambda i: i.step):
        try:
            uncommit(storage, info.path)
        except OSError as e:
            logger.warning(
                "arc_dist: could not delete old checkpoint step_%d in %s (%s: %s); will retry "
                "after the next save",
                info.step,
                storage.display,
                type(e).__name__,
                e,
            )
            continue
        removed.append(info.step)
    if removed:
        logger.info(
            "arc_dist: retention removed %s from %s",
            [f"step_{s}" for s in removed],
            storage.display,
        )
    return removed
