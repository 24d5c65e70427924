"""Fail fast: an error on one rank inside ``Arc.step`` reaches every rank, named, in seconds.

``Arc.step`` joins one collective per step: its own all-reduce, or DDP's gradient all-reduce
that the step's signals ride on (ddp_hook.DDPRide). When one rank raises inside it on its own (a
misuse only that rank makes, a failed restore), the other ranks must not wait for it in a
collective until the timeout (minutes). So the failing rank, in :meth:`FailFast.fail`,
publishes ``rank R at step S: Type: message`` in the process group's store (the first error
wins) and records it in its torchelastic error file (the launcher's exit record then names the
first rank's error), and then:

* when every rank judges this step through Arc's own collective (always without DDP's ride, and
  on deep-check steps or after an anomaly with it), it joins that collective with a row that only
  carries an error flag (``Col.ERROR``): every rank sees the flag in the agreed matrix and raises
  at once, the failing rank its own error, the others :class:`~arc_dist.errors.PeerError` naming
  it and its message;
* otherwise (the other ranks judged the step from DDP's ride and went on) it raises its error:
  the others fail in their next collective when this process ends, which an uncaught error does
  at once, and name it through :meth:`FailFast.explain`. A process that lingers after the error
  holds them until it ends or their collective times out.

Aborting the process group does not release the others with gloo: DDP keeps the group alive, so
its connections stay open until the process ends. After such an error the ranks are out of step,
so ``Arc.step`` refuses to continue on every rank that raised.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from .elastic.exitcodes import write_error_file
from .errors import ArcError, ExitCode, PeerError

if TYPE_CHECKING:
    from .ddp_hook import Ride

log = logging.getLogger("arc_dist")

#: ``Arc`` objects built in this process, in order: every rank builds them in the same order,
#: so the count tells apart the errors of successive ``Arc`` objects on one process group
_instances = itertools.count()


class Phase(enum.Enum):
    """Where ``Arc.step`` is: who else an error raised there concerns."""

    LOCAL = 1  # before the step's collective: this rank's own error
    JOINED = 2  # in the collective: possibly the consequence of another rank's failure
    DECIDED = 3  # after it: an ArcError here is raised on every rank from the shared verdict


@dataclass(slots=True)
class Route:
    """How every rank judges the current step: the DDP ride it is judged from (None until
    known), and whether the ranks run Arc's own collective (None until the ride's verdict is
    known)."""

    ride: Ride | None = None
    collective: bool | None = None


class FailFast:
    """One per ``Arc``: publishes this rank's error and reads the first one of its group.

    ``Arc.step`` keeps it told where the step is (``phase``) and how every rank judges it
    (``route``), so that an error raised there knows whether the other ranks wait for this one.
    """

    def __init__(self, group, rank: int, world_size: int):
        self.rank = rank
        self.enabled = group is not None and world_size > 1
        self.phase = Phase.LOCAL
        self.route: Route | None = None
        #: why ``Arc.step`` raised on this rank; the ranks are out of step from then on
        self.failed: str | None = None
        self._store = None
        self._key = ""
        if self.enabled:
            ranks = ",".join(map(str, dist.get_process_group_ranks(group)))
            group_id = f"{zlib.crc32(ranks.encode()):08x}"
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            self._key = f"arc_dist/first_error/{restart}/{next(_instances)}/{group_id}"
            try:  # only quick requests: set if absent, check, then get what exists
                self._store = dist.distributed_c10d._get_default_store()
            except (RuntimeError, ValueError, AttributeError):
                self._store = None

    def begin_step(self) -> None:
        self.phase, self.route = Phase.LOCAL, None

    def on_step_error(
        self,
        exc: Exception,
        hardware: BaseException | None,
        step: int,
        *,
        join: Callable[[], object],
        judge_ride: Callable[[Ride], tuple] | None,
    ) -> BaseException:
        """``exc`` escaped ``Arc.step`` on this rank: the exception to raise (``exc`` itself:
        re-raise it). ``hardware``: the device error it is (None: not one); such a device joins
        no collective. ``join()`` enters the step's collective with the error flag when the
        other ranks wait there; ``judge_ride`` tells whether they do after a ride."""
        error = exc if hardware is None else hardware
        if self.phase is Phase.DECIDED and isinstance(error, ArcError) and hardware is None:
            return exc  # raised on every rank from the agreed matrix
        out = self.fail(error, step, joined=self.phase is not Phase.LOCAL)
        if self.phase is Phase.LOCAL and hardware is None and self._others_join(judge_ride):
            self.phase = Phase.JOINED
            join()  # they raise PeerError
        return out

    def _others_join(self, judge_ride: Callable[[Ride], tuple] | None) -> bool:
        """Whether the other ranks judge this step through Arc's own collective (not from DDP's
        ride), from what every rank shares; False when this rank cannot tell."""
        route = self.route
        if route is None or not self.enabled:
            return False
        if route.collective is None:  # judged from the ride unless it shows an anomaly
            ride = route.ride
            if ride is None or ride.grad_sq is None or judge_ride is None:
                return False
            route.collective = judge_ride(ride)[0] is None
        return route.collective

    def fail(self, error: BaseException, step: int, *, joined: bool) -> BaseException:
        """This rank raises ``error`` inside ``Arc.step`` on its own: publish and record it;
        returns the exception to raise.

        ``joined``: the error came after this rank joined the step's collective, so it may be
        the consequence of another rank's failure: when another rank published its error first,
        a :class:`PeerError` naming it is returned (raise it ``from error``).
        """
        if not self.enabled:
            return error
        mine = f"rank {self.rank} at step {step}: {type(error).__name__}: {_first_line(error)}"
        first = self._publish(mine)
        raised = _peer_error(first) if joined and first not in (None, mine) else error
        write_error_file(raised, int(getattr(raised, "exit_code", ExitCode.RETRY)))
        self.failed = mine
        log.error("[rank %d] arc_dist: %s", self.rank, mine)
        return raised

    def peer_error(self, ranks: list[int]) -> PeerError:
        """The error every other rank raises when ``ranks`` flagged a failure in the matrix."""
        first = self._read()
        error = _peer_error(first) if first is not None else PeerError(
            f"arc_dist: stopped because rank {ranks[0]} failed inside Arc.step (its error is "
            "in its log and its error file)",
            rank=ranks[0],
        )  # fmt: skip
        self.failed = str(error)
        return error

    def explain(self, error: BaseException) -> BaseException:
        """``error`` from a collective: the :class:`PeerError` behind it, if another rank
        published one, else ``error`` itself."""
        first = self._read()
        if first is None or first.startswith(f"rank {self.rank} "):
            return error
        return _peer_error(first)

    def _publish(self, text: str) -> str | None:
        if self._store is None:
            return None
        try:
            return self._store.compare_set(self._key, "", text).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store may be gone with a failed peer
            return None

    def _read(self) -> str | None:
        if self._store is None:
            return None
        try:
            if not self._store.check([self._key]):
                return None
            return self._store.get(self._key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store may be gone with a failed peer
            return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _peer_error(first: str) -> PeerError:
    head = first.split(" ", 2)
    rank = int(head[1]) if len(head) > 1 and head[0] == "rank" and head[1].isdigit() else None
    return PeerError(f"arc_dist: stopped because another rank failed first: {first}", rank=rank,
                     cause=first)  # fmt: skip
