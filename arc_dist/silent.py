"""Silent failures: replica divergence (silent data corruption) and stragglers.

Neither crashes anything. A GPU that computes wrong numbers leaves DDP replicas that should be
bit-identical slightly different; a slow rank holds every step of every other rank back. Both
are read from columns of the step's agreed signal matrix, so they cost no extra collective and
every rank reaches the same conclusion.

* **Divergence.** Every ``divergence_every`` steps (and on every snapshot step, so snapshots are
  verified identical across replicas when taken) each rank adds up the bit patterns of its
  parameters as integers. The sum changes when any bit of any element changes (float sums
  would round small changes away) and is sent modulo 2**52 so that a float64 carries it
  exactly. Ranks whose fingerprint differs from the majority's are named, and
  :class:`DivergenceTracker` counts their incidents: a rank that keeps diverging is suspect
  hardware. Under FSDP each rank holds a different shard, so there is nothing to compare (see
  docs/design.md).
* **Stragglers.** Each rank reports its busy time for the step: under DDP, from the end of its
  previous step until its last gradient bucket was ready (time spent waiting for other ranks
  in DDP's all-reduce is excluded); otherwise the whole step. A rank is reported when the
  median, over a window of steps, of its time relative to the others' median exceeds a
  threshold: one slow step or ordinary jitter does not raise an alarm.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from .errors import ArcError, HardwareError

log = logging.getLogger("arc_dist")

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FINGERPRINT_MOD = 2**52


def fingerprint(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the tensors' bit patterns as integers, modulo 2**52, as a float64 0-d tensor.

    One reduction per tensor; runs only on divergence-check steps.
    """
    total = torch.zeros((), dtype=torch.int64, device=device)
    for t in tensors:
        bits = t.detach().contiguous().view(_INT_VIEW[t.element_size()])
        total += bits.sum(dtype=torch.int64).to(device)
    return torch.remainder(total, FINGERPRINT_MOD).to(torch.float64)


def divergent_ranks(fps: np.ndarray) -> tuple[int, ...]:
    """Ranks outside the majority fingerprint; all ranks when no value has a strict majority
    (with two replicas, nothing tells which one is right)."""
    values, counts = np.unique(fps, return_counts=True)
    if len(values) == 1:
        return ()
    best = counts.max()
    if (counts == best).sum() > 1:
        return tuple(range(len(fps)))
    majority = values[counts.argmax()]
    return tuple(int(r) for r in np.nonzero(fps != majority)[0])


class DivergenceTracker:
    """Counts each rank's divergence incidents; a rank that keeps diverging is suspect hardware.

    Fed the ranks every verdict blames for ``replica_divergence`` (shared: the same on every
    rank). With ``exit_on_suspect`` a suspect ends the run for a restart without it: the suspect
    raises :class:`~arc_dist.errors.HardwareError`, the others :class:`~arc_dist.ArcError`.
    """

    def __init__(self, world_size: int, suspect_after: int, exit_on_suspect: bool, rank: int):
        self.world_size, self.suspect_after = world_size, suspect_after
        self.exit_on_suspect, self.rank = exit_on_suspect, rank
        self.incidents: dict[int, int] = {}
        self.suspects: set[int] = set()

    def record(self, bad_ranks: tuple[int, ...]) -> None:
        if len(bad_ranks) >= self.world_size:
            return  # no majority (e.g. two replicas): nobody can be blamed
        for r in bad_ranks:
            self.incidents[r] = self.incidents.get(r, 0) + 1
            if self.incidents[r] >= self.suspect_after and r not in self.suspects:
                self.suspects.add(r)
                if self.rank == 0:
                    log.error(
                        "arc_dist: rank %d diverged from the other replicas %d times: suspect "
                        "hardware (silent data corruption); replace its node",
                        r,
                        self.incidents[r],
                    )
        if self.exit_on_suspect and self.suspects:
            if self.rank in self.suspects:
                raise HardwareError(
                    f"arc_dist: rank {self.rank} is suspect hardware: its parameters diverged "
                    f"from the other replicas {self.incidents[self.rank]} times"
                )
            bad = sorted(self.suspects)
            raise ArcError(f"arc_dist: restarting the group without suspect ranks {bad}")


class StragglerTracker:
    """Flags ranks persistently slower than the others (shared history: same on every rank).

    Runs after every step's collective, so its cost per step does not grow with the window: the
    window is a preallocated ring (a median does not depend on the rows' order) beside a count,
    per rank, of the ring's ratios above ``ratio``. A median is above ``ratio`` exactly when more
    than half the window is (for an even window, when exactly half is, the two middle values
    decide: only those ranks' medians are taken)."""

    def __init__(self, world_size: int, ratio: float, window: int, rank: int = 0):
        self.world_size, self.ratio, self.rank = world_size, ratio, rank
        self.window = window
        self._ring = np.empty((window, world_size))
        self._above = np.zeros(world_size, dtype=np.int64)  # ring entries above ``ratio``
        self._count = 0  # steps added so far; the ring holds the last ``window`` of them
        self.flagged: set[int] = set()

    def relative(self, times: np.ndarray) -> np.ndarray | None:
        """Each rank's time over the median of the other ranks' (the median of all for >= 5)."""
        n = len(times)
        if n < 2 or not np.all(np.isfinite(times)) or np.any(times <= 0):
            return None
        if n >= 5:
            return times / np.median(times)
        return times / _median0(times[_others(n)].T)

    def update(self, times: np.ndarray) -> tuple[list[int], list[int]]:
        """Add one step's busy times; returns (newly flagged ranks, ranks no longer flagged)."""
        rel = self.relative(times)
        if rel is None:
            return [], []
        slot = self._count % self.window
        if self._count >= self.window:  # the oldest step leaves the window
            self._above -= self._ring[slot] > self.ratio
        self._ring[slot] = rel
        self._above += rel > self.ratio
        self._count += 1
        if self._count < self.window:
            return [], []
        half = self.window // 2
        slow = self._above > half
        if self.window % 2 == 0:
            tied = np.nonzero(self._above == half)[0]
            if tied.size:
                slow[tied[_median0(self._ring[:, tied]) > self.ratio]] = True
        now = {int(r) for r in np.nonzero(slow)[0]}
        new, cleared = sorted(now - self.flagged), sorted(self.flagged - now)
        self.flagged = now
        return new, cleared

    def observe(self, times: np.ndarray, step: int) -> tuple[list[int], list[int]]:
        """:meth:`update`, and rank 0 logs who became or stopped being a straggler."""
        new, cleared = self.update(times)
        if self.rank != 0 or not (new or cleared):
            return new, cleared
        ratios = self.persistent_ratios()
        for r in new:
            log.warning(
                "arc_dist: rank %d is a straggler at step %d: %.2fx the other ranks' busy time "
                "(median over %d steps)",
                r,
                step,
                ratios[r],
                self.window,
            )
        for r in cleared:
            log.info("arc_dist: rank %d is no longer a straggler at step %d", r, step)
        return new, cleared

    def persistent_ratios(self) -> list[float]:
        if not self._count:
            return []
        return [float(x) for x in _median0(self._ring[: self._count])]


def _median0(a: np.ndarray) -> np.ndarray:
    """``np.median(a, axis=0)`` (same values) for finite ``a``, without its per-call overhead."""
    h = a.shape[0] // 2
    if a.shape[0] % 2:
        return np.partition(a, h, axis=0)[h]
    p = np.partition(a, (h - 1, h), axis=0)
    return (p[h - 1] + p[h]) / 2


@functools.cache
def _others(n: int) -> np.ndarray:
    """Row r: the indices of every rank but r."""
    return np.array([[j for j in range(n) if j != r] for r in range(n)])


def replica_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers: equal on every replica of a healthy
    data-parallel run (a quick check for tests, examples and fire drills).

    Sharded (FSDP2) tensors are gathered first, which is a collective: call it on every rank.
    """
    import hashlib

    h = hashlib.sha256()
    for t in module.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
