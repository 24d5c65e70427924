"""The lifecycle of durable checkpoints: which one a restart resumes from, which are confirmed,
retracted and pruned. Pure bookkeeping: no I/O, no communication.

A step's checkpoint goes *saving* -> *committed* (its manifest is written) -> *confirmed*
(``confirm_after`` healthy steps followed it) -> *pruned* by retention; a rollback to an older
state *retracts* a saving or committed one that is not confirmed. The rules (docs/checkpoints.md
has them as a table):

* **Resume** (``resume_order``): the newest committed checkpoint saved under a healthy agreed
  verdict (or with none: a save outside ``Arc``) or confirmed, then the others (saved under a
  warning) newest first; a damaged one falls back to the next. Newer checkpoints are never
  deleted in favour of an older one: a healthy SIGTERM checkpoint is the newest healthy work.
* **Confirmed** is extra evidence that the state stayed healthy afterwards. A confirmed
  checkpoint is never retracted and the newest one is never pruned, so it is the fallback when
  newer ones turn out damaged or are retracted. It never makes a restart skip newer healthy work.
* **Rollback** to step R (``rolled_back``): unconfirmed checkpoints of this run newer than R hold
  the failed trajectory and are retracted (a save still writing does not commit); never a
  confirmed one, nor the one the run resumed from, nor any at or before R.
* **Retention** (``protected``, ``retention.plan_retention``): the ``keep`` newest committed
  checkpoints, plus the newest confirmed, the newest healthy, the one resumed from (until a newer
  one is confirmed) and, for each in-memory rollback target, the newest checkpoint at or before
  it: after any rollback, storage still holds the newest healthy checkpoint off the failed
  trajectory. A checkpoint pruned before its confirmation is never confirmed or counted.

``CheckpointManager`` owns one :class:`Lifecycle` per rank, feeds it every event under its lock
and carries out on storage (rank 0) what it returns. Training-thread events arrive in the same
order on every rank; commits arrive from each rank's background thread, so per-rank counts
(``stats()``) may differ for a moment, never the storage actions (rank 0 alone acts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..policy import HEALTHY
from . import retention
from .catalog import CheckpointInfo


def healthy_verdict(verdict: dict) -> bool:
    """A save's verdict (as in the manifest) is healthy, or has no status (a save outside Arc)."""
    return verdict.get("status", HEALTHY) == HEALTHY


def trusted(info: CheckpointInfo) -> bool:
    """Confirmed, or saved under a healthy verdict."""
    if info.confirmed:
        return True
    return info.manifest is not None and healthy_verdict(info.manifest.verdict)


def resume_order(infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
    """The committed checkpoints in the order a resume tries them (see the module docstring)."""
    return sorted((i for i in infos if i.committed), key=lambda i: (not trusted(i), -i.step))


@dataclass(slots=True)
class Entry:
    """A committed checkpoint as the lifecycle knows it (duck-types ``CheckpointInfo`` for
    ``retention.plan_retention``)."""

    step: int
    healthy: bool
    confirmed: bool = False
    committed: bool = field(default=True, init=False)


@dataclass(slots=True)
class _Pending:
    """A checkpoint awaiting confirmation: healthy steps count from the save call on."""

    step: int
    healthy_steps: int = 0
    committed: bool = False


@dataclass(frozen=True, slots=True)
class Actions:
    """What the manager must do after an event."""

    #: (step, healthy steps seen) of each checkpoint confirmed now (rank 0 writes the sidecars)
    confirmed: tuple[tuple[int, int], ...] = ()
    #: committed steps to uncommit: retracted by a rollback
    retract: tuple[int, ...] = ()
    #: saves not committed yet that must not commit (a rollback went past them)
    reject: tuple[int, ...] = ()
    #: steps retention drops (rank 0 deletes them from its own listing, with the same rule)
    pruned: tuple[int, ...] = ()


_NOTHING = Actions()


class Lifecycle:
    """One rank's view of the checkpoints of a run, and the rules applied to it."""

    def __init__(self, keep: int, confirm_after: int) -> None:
        self.keep, self.confirm_after = keep, confirm_after
        self.checkpoints: dict[int, Entry] = {}
        self._pending: dict[int, _Pending] = {}
        #: the step this run resumed from (``loaded``), None for a fresh start
        self.resumed: int | None = None
        #: steps of the in-memory states a rollback can restore (the controller's snapshots)
        self.rollback_targets: tuple[int, ...] = ()

    # -- what storage holds --------------------------------------------------------------------
    def known(self, entries: Iterable[Entry]) -> None:
        """Checkpoints found at start (before any resume)."""
        self.checkpoints = {e.step: e for e in entries}

    def loaded(self, infos: Iterable[CheckpointInfo], step: int) -> None:
        """A resume loaded ``step`` from a listing: pending confirmation unless confirmed."""
        self.checkpoints = {
            i.step: Entry(i.step, trusted(i), i.confirmed) for i in infos if i.committed
        }
        self.resumed = step
        self.rollback_targets = ()
        entry = self.checkpoints.get(step)
        self._pending = {} if entry is None or entry.confirmed else {step: _Pending(step, 0, True)}

    @property
    def pending(self) -> list[int]:
        """Steps saving or committed and not confirmed yet (oldest first)."""
        return sorted(self._pending)

    # -- save ------------------------------------------------------------------------------------
    def saving(self, step: int) -> None:
        """A save of ``step`` starts; an existing ``step_<step>`` is replaced by it."""
        self.checkpoints.pop(step, None)
        self._pending[step] = _Pending(step)

    def abandoned(self, step: int) -> None:
        """The save of ``step`` failed for good: it never commits."""
        self._pending.pop(step, None)

    def committed(self, step: int, healthy: bool) -> Actions:
        """``step``'s manifest is written. A save a rollback rejected meanwhile is retracted."""
        p = self._pending.get(step)
        if p is None:
            return Actions(retract=(step,))
        self.checkpoints[step] = Entry(step, healthy)
        p.committed = True
        confirmed = self._confirm([p]) if p.healthy_steps >= self.confirm_after else ()
        return Actions(confirmed=confirmed, pruned=self._prune())

    # -- training --------------------------------------------------------------------------------
    def healthy_step(self, global_step: int) -> Actions:
        """A step after which the state is still healthy (a warning does not count)."""
        ready = []
        for p in self._pending.values():
            if global_step > p.step:
                p.healthy_steps += 1
                if p.committed and p.healthy_steps >= self.confirm_after:
                    ready.append(p)
        if not ready:
            return _NOTHING
        confirmed = self._confirm(ready)
        return Actions(confirmed=confirmed, pruned=self._prune())

    def rolled_back(self, restored_step: int) -> Actions:
        """Training restored the state of ``restored_step``: retract what lies past it."""
        doomed = [p for s, p in self._pending.items() if s > restored_step and s != self.resumed]
        for p in doomed:
            del self._pending[p.step]
            self.checkpoints.pop(p.step, None)
        self.rollback_targets = tuple(t for t in self.rollback_targets if t <= restored_step)
        return Actions(
            retract=tuple(p.step for p in doomed if p.committed),
            reject=tuple(p.step for p in doomed if not p.committed),
        )

    # -- retention -------------------------------------------------------------------------------
    def protected(self) -> set[int]:
        """Committed steps retention must keep beyond the ``keep`` newest."""
        steps = sorted(self.checkpoints)
        out = set()
        confirmed = [s for s in steps if self.checkpoints[s].confirmed]
        if confirmed:
            out.add(confirmed[-1])
        healthy = [s for s in steps if self.checkpoints[s].healthy]
        if healthy:
            out.add(healthy[-1])
        if self.resumed in self.checkpoints and not any(s > self.resumed for s in confirmed):
            out.add(self.resumed)
        for t in self.rollback_targets:
            before = [s for s in steps if s <= t]
            if before:
                out.add(before[-1])
        return out

    def _confirm(self, ready: list[_Pending]) -> tuple[tuple[int, int], ...]:
        for p in ready:
            del self._pending[p.step]
            self.checkpoints[p.step].confirmed = True
        return tuple(sorted((p.step, p.healthy_steps) for p in ready))

    def _prune(self) -> tuple[int, ...]:
        victims = retention.plan_retention(
            list(self.checkpoints.values()), self.keep, protect=self.protected()
        )
        for v in victims:
            del self.checkpoints[v.step]
            self._pending.pop(v.step, None)
        return tuple(v.step for v in victims)
