"""Recovery: what the controller does about a verdict, as a small state machine.

:class:`RecoveryPolicy` turns each :class:`~arc_dist.policy.Verdict` into a :class:`Decision`
(continue, skip, roll back, give up). Its state only changes as a function of the verdicts and
of the snapshot steps, which every rank shares, so every rank decides the same.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .config import ArcConfig
from .policy import HEALTHY, WARNING, Verdict


class DecisionKind(enum.StrEnum):
    """What the controller does about a verdict (the values appear in events)."""

    CONTINUE = "continue"  # apply the update
    SKIP = "skip"  # withhold the update, state intact
    ROLLBACK = "rollback"  # restore a snapshot
    RAISE = "raise"  # nothing healthy is left to restore: UnrecoverableError


@dataclass(frozen=True, slots=True)
class Decision:
    """What the controller does about a verdict."""

    kind: DecisionKind
    #: for rollback: how many newest snapshots to discard first (0 = restore the newest)
    drop: int = 0
    #: for rollback: also multiply the LR by ``lr_backoff`` (the failure recurred)
    back_off: bool = False


class RecoveryPolicy:
    """Escalation as a small state machine, shared by all ranks.

    Recovered means training got ``recovery_steps`` healthy steps past the step where it last
    failed. The first rollback keeps the LR (one bad event is not a reason to train slower); a
    failure that recurs before recovery rolls back with an LR backoff. After ``max_rollbacks``
    rollbacks the policy escalates: it discards snapshots and restores one strictly older than
    any earlier escalation restored (the newer ones may sit on a doomed trajectory). With
    nothing older left, the run is unrecoverable.
    """

    def __init__(self, config: ArcConfig):
        self.max_rollbacks = config.max_rollbacks
        self.recovery_steps = config.recovery_steps
        self.consecutive = 0
        self.failed_at: int | None = None
        self.floor = math.inf  # escalations must restore a snapshot older than this step

    def decide(self, verdict: Verdict, snapshot_steps: list[int]) -> Decision:
        """``snapshot_steps``: steps of the snapshots held, oldest first."""
        if verdict.status == HEALTHY:
            return Decision(DecisionKind.CONTINUE)
        if verdict.status == WARNING:
            return Decision(DecisionKind.SKIP if verdict.skip else DecisionKind.CONTINUE)
        if not snapshot_steps:
            return Decision(DecisionKind.RAISE)
        if self.consecutive < self.max_rollbacks:
            return Decision(DecisionKind.ROLLBACK, back_off=self.consecutive > 0)
        limit = min(self.floor, snapshot_steps[-1])
        older = [i for i, s in enumerate(snapshot_steps) if s < limit]
        if not older:
            return Decision(DecisionKind.RAISE)
        return Decision(
            DecisionKind.ROLLBACK, drop=len(snapshot_steps) - 1 - older[-1], back_off=True
        )

    def record(self, decision: Decision, step: int, restored_step: int | None = None) -> None:
        """Update after acting; ``step`` is the global step the verdict was about."""
        if decision.kind == DecisionKind.ROLLBACK:
            self.failed_at = step if self.failed_at is None else max(self.failed_at, step)
            if decision.drop:
                self.consecutive = 1
                if restored_step is not None:
                    self.floor = restored_step
            else:
                self.consecutive += 1
        elif decision.kind == DecisionKind.CONTINUE and self.failed_at is not None:
            if step + 1 >= self.failed_at + self.recovery_steps:
                self.consecutive, self.failed_at, self.floor = 0, None, math.inf

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "failed_at": self.failed_at}

    def load_state_dict(self, sd: dict) -> None:
        self.consecutive = int(sd["consecutive"])
        self.failed_at = sd.get("failed_at")
        self.floor = math.inf
