"""``Arc``: the controller that wraps a training loop.

One ``step()`` per optimizer step: read this rank's signals (signals.py), agree on them across
ranks with one collective (agreement.py), judge them (policy.py), and act: continue, skip, roll
every rank back to the newest healthy in-memory snapshot (snapshot.py) with an LR backoff, or
give up with :class:`~arc_dist.UnrecoverableError`. Durable checkpoints, the hang watchdog and
fault injection plug in here.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import chaos as chaos_mod
from .agreement import Agreement, comm_device
from .checkpoint.durability import Durability
from .checkpoint.resume import Source
from .checkpoint.state import TrainState
from .config import ArcConfig
from .elastic import exitcodes
from .errors import ArcError, HardwareError, Preempted, UnrecoverableError
from .failfast import FailFast
from .lr import LRGuard
from .observe.events import EventLog
from .observe.recorder import Recorder
from .policy import FAILURE, HEALTHY, Decision, HealthPolicy, RecoveryPolicy, Verdict
from .preemption import PreemptionHandler
from .signals import (
    Col,
    DDPRide,
    SignalCollector,
    error_row,
    is_dtensor,
    layout_of,
    ride_row,
    uncompiled,
)
from .silent import StragglerTracker
from .snapshot import SnapshotStore
from .watchdog import Watchdog

log = logging.getLogger("arc_dist")


@dataclass(slots=True)
class _Route:
    """How every rank judges the current step: the DDP ride it is judged from (None until
    known), and whether the ranks run Arc's own collective (None until the ride's verdict is
    known)."""

    ride: tuple | None
    collective: bool | None


class _Phase(enum.Enum):
    """Where ``Arc.step`` is: who else an error raised there concerns (failfast.py)."""

    LOCAL = 1  # before the step's collective: this rank's own error
    JOINED = 2  # in the collective: possibly the consequence of another rank's failure
    DECIDED = 3  # after it: an ArcError here is raised on every rank from the shared verdict


@dataclass(frozen=True, slots=True)
class Action:
    """What the training loop should do after ``Arc.step``; identical on every rank."""

    step: int
    status: str
    should_skip: bool
    rolled_back: bool
    reason: str | None
    bad_ranks: tuple[int, ...]
    #: mean loss over ranks this step
    loss: float = math.nan
    #: global gradient norm this step (under DDP: RMS of the ranks' own, pre-average norms)
    grad_norm: float = math.nan


def _validate(model, optimizer, scheduler, config, process_group) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Arc(model=...) must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Arc(optimizer=...) must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if scheduler is not None and not (
        hasattr(scheduler, "state_dict") and hasattr(scheduler, "step")
    ):
        raise TypeError(
            f"Arc(scheduler=...) must be an LR scheduler (with step() and state_dict()) or None, "
            f"got {type(scheduler).__name__}"
        )
    if config is not None and not isinstance(config, ArcConfig):
        raise TypeError(
            f"Arc(config=...) must be an arc_dist.ArcConfig or None, got {type(config).__name__}"
        )
    model_params = {id(p) for p in model.parameters()}
    foreign = sum(
        1 for g in optimizer.param_groups for p in g["params"] if id(p) not in model_params
    )
    if foreign:
        raise ValueError(
            f"Arc: {foreign} of the optimizer's parameters are not parameters of the model; "
            "build the optimizer from model.parameters() (after wrapping it in DDP/FSDP2)"
        )
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is not None and not initialized:
        raise ValueError(
            "Arc(process_group=...) was given but torch.distributed is not initialized; call "
            "dist.init_process_group() first or pass process_group=None"
        )
    world = os.environ.get("WORLD_SIZE", "1")
    if not initialized and world.isdigit() and int(world) > 1:
        # every process would train alone as rank 0 of 1, writing over the others' checkpoints
        raise ValueError(
            f"Arc: WORLD_SIZE={world} in the environment (a torchrun/Ray/Kubernetes launch) but "
            "torch.distributed is not initialized, so each process would train alone as rank 0; "
            "call torch.distributed.init_process_group() before Arc(...)"
        )


class Arc:
    """Protects a training loop; see ``docs/api.md`` for the contract."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        checkpoint_dir: str | None = None,
        config: ArcConfig | None = None,
        process_group: Any = None,
        scaler: Any = None,
        storage_options: dict | None = None,
        chaos: chaos_mod.Chaos | str | None = None,
        log_dir: str | None = None,
        metrics_every: int = 10,
    ):
        _validate(model, optimizer, scheduler, config, process_group)
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.config = config or ArcConfig()
        if dist.is_available() and dist.is_initialized():
            self.group = process_group or dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
        else:
            self.group, self.rank, self.world_size = None, 0, 1
        param = next(model.parameters(), None)
        if param is None:
            raise ValueError("Arc(model=...) has no parameters; there is nothing to protect")
        if self.config.preflight:  # collective over the group, before any state is built
            from .health import preflight

            preflight(self.group, devices=[param.device] if param.device.type == "cuda" else None)
        self.device = param.device
        self.layout = layout_of(model, self.world_size)
        self._failfast = FailFast(self.group, self.rank, self.world_size)
        self._phase, self._route = _Phase.LOCAL, None
        self._agree = Agreement(
            self.group, self.rank, self.world_size, comm_device(self.group, self.device)
        )
        self._signals = SignalCollector(
            model, optimizer, self._agree.device, self.config.divergence_check_optimizer
        )
        # under DDP the signals ride on DDP's gradient all-reduce (signals.DDPRide)
        self._ride: DDPRide | None = None
        self._ride_loss: torch.Tensor | None = None  # this step's loss, sent with the next step
        self._ride_loss_judged = True  # ... after this step judged it (the collective path)
        self._ride_busy = 0.0
        ddp = uncompiled(model)
        if (
            isinstance(ddp, nn.parallel.DistributedDataParallel)
            and self.world_size > 1
            # the ride's matrix has a row per rank of DDP's group: it must be Arc's group
            and dist.get_world_size(ddp.process_group) == self.world_size
            and dist.get_rank(ddp.process_group) == self.rank
        ):
            try:
                self._ride = DDPRide(
                    ddp, ddp.process_group, self._ride_row, explain=self._failfast.explain
                )
            except RuntimeError as e:  # the job registered its own comm hook
                log.info(
                    "arc_dist: keeping the job's DDP comm hook (%s); one collective per step", e
                )
        self._policy = HealthPolicy(
            self.config.thresholds, self.layout, self.world_size, max_skips=self.config.max_skips
        )
        # replicas are compared only where they must be bit-identical (DDP)
        self._check_divergence = (
            self.config.divergence_every > 0 and self.layout == "replicated" and self.world_size > 1
        )
        self._stragglers = StragglerTracker(
            self.world_size, self.config.straggler_ratio, self.config.straggler_window
        )
        self._divergence_incidents: dict[int, int] = {}
        self._suspects: set[int] = set()
        self._recovery = RecoveryPolicy(self.config)
        self._snapshots = SnapshotStore(
            model, optimizer, scheduler, scaler, self.config.keep_snapshots
        )

        self.global_step = 0
        exitcodes.track_progress(self, 0)  # error files report how far this process got
        self._calls = 0  # step() calls, rollbacks included: decides deep-check steps
        self._fast_steps = 0  # steps judged from the DDP ride alone (no collective of our own)
        self._lr = LRGuard(optimizer, scheduler, backoff=self.config.lr_backoff,
                           restore=self.config.lr_restore, recovery_steps=self.config.recovery_steps)  # fmt: skip
        self._last_step_end: float | None = None
        self._preemption = PreemptionHandler()
        if self.config.handle_sigterm:
            self._preemption.install()
        self._closed = False
        self._stats = dict(
            rollbacks=0, skips=0, failures=0, warnings=0, escalations=0, snapshots=0, checkpoints=0
        )
        self._last: Action | None = None

        if isinstance(chaos, str):
            chaos = chaos_mod.Chaos.from_spec(chaos)
        elif chaos is None:
            chaos = chaos_mod.Chaos.from_env()
        self.chaos: chaos_mod.Chaos | None = chaos
        if self.chaos is not None:
            self.chaos.attach(self)

        # durable checkpoints, the node-local tier, registered objects, the resume choice
        self.checkpoint_dir = checkpoint_dir
        self._durability = Durability(
            train=TrainState(model, optimizer, scheduler, scaler),
            arc_state=self,
            snapshots=self._snapshots,
            config=self.config,
            group=self.group,
            rank=self.rank,
            world_size=self.world_size,
            layout=self.layout,
            checkpoint_dir=checkpoint_dir,
            storage_options=storage_options,
        )
        # the event log (events.py): rank 0 appends to <log_dir>/events.jsonl; no collectives
        self.log_dir = checkpoint_dir if log_dir is None else log_dir
        self.events = EventLog(
            self.log_dir, storage_options=storage_options, enabled=self.rank == 0
        )
        self._rec = Recorder(
            self.events,
            metrics_every=metrics_every,
            context=lambda: {"lr": self._lr.lrs()[0], "lr_scale": self._lr.scale},
        )
        self._durability.subscribe(self._rec.checkpoint_event)
        self._rec.start(
            world_size=self.world_size, layout=self.layout, checkpoint_dir=checkpoint_dir
        )
        # started last: the first step's allowance (hang_grace) also covers resume() and the
        # first collective's warm-up
        self._watchdog: Watchdog | None = None
        if self.config.hang_timeout is not None:
            self._watchdog = Watchdog(self.config.hang_timeout, self.config.hang_grace, log)
        self._durability.watchdog = self._watchdog

    # -- the step ----------------------------------------------------------------------
    def step(self, loss: torch.Tensor, *, grad_norm: torch.Tensor | float | None = None) -> Action:
        """Collective: judge this step on every rank and act on the shared verdict.

        ``grad_norm``: the global gradient norm when the job computes it anyway (the value
        ``torch.nn.utils.clip_grad_norm_`` returns); Arc then skips its own pass over the
        gradients. Pass it on every step or on none.

        A CUDA/NCCL device error raised inside it (chaos ``device_error`` included) is not
        rolled back, since the CUDA context cannot be trusted: it is logged with rank, host and
        device and re-raised as :class:`~arc_dist.errors.HardwareError` (exit code 12 under
        ``arc_dist.launch.main_entry``). See arc_dist/health/device_errors.py.

        Any other error raised on this rank alone (a non-scalar loss or a bad ``grad_norm`` on
        one rank, a failed restore) is published to the other ranks and recorded in this
        process's error file; when the others wait for this step's collective, this rank joins
        it with an error flag, so they raise :class:`~arc_dist.errors.PeerError` naming this
        rank and its error at once instead of at the collective timeout (failfast.py).
        """
        if self._closed:
            raise RuntimeError("Arc.step() called after close(); create a new Arc")
        if self._failfast.failed is not None:
            raise RuntimeError(
                f"Arc.step() after an error inside it ({self._failfast.failed}): the ranks are "
                "out of step; restart the job"
            )
        self._phase, self._route = _Phase.LOCAL, None
        try:
            return self._step(loss, grad_norm)
        except Exception as exc:
            from .health import hardware_error

            hw = hardware_error(exc, rank=self.rank, device=self.device, step=self.global_step)
            error = exc if hw is None else hw
            if self._phase is _Phase.DECIDED and isinstance(error, ArcError) and hw is None:
                raise  # raised on every rank from the agreed matrix
            out = self._failfast.fail(
                error, self.global_step, joined=self._phase is not _Phase.LOCAL
            )
            # a device that cannot be trusted joins no collective
            if self._phase is _Phase.LOCAL and hw is None and self._others_join_collective():
                self._phase = _Phase.JOINED
                self._agree.reduce(error_row(self._agree.device))  # they raise PeerError
            if out is exc:
                raise
            raise out from exc

    def _others_join_collective(self) -> bool:
        """Whether the other ranks judge this step through Arc's own collective (not from DDP's
        ride), from what every rank shares; False when this rank cannot tell."""
        route = self._route
        if route is None or self._failfast.enabled is False:
            return False
        if route.collective is None:  # judged from the ride unless it shows an anomaly
            ride = route.ride
            if ride is None or ride[0] is None:
                return False
            route.collective = self._judge_ride(ride)[0] is None
        return route.collective

    def _user_grad_sq(self, grad_norm) -> torch.Tensor:
        """The job's global gradient norm as this rank's share of the squared norm."""
        if is_dtensor(grad_norm):
            grad_norm = grad_norm.full_tensor()
        if isinstance(grad_norm, torch.Tensor):
            if grad_norm.numel() != 1:
                raise ValueError(
                    f"Arc.step(grad_norm=...) must be the scalar total norm, got shape "
                    f"{tuple(grad_norm.shape)}"
                )
            sq = grad_norm.detach().reshape(()).to(self._agree.device, torch.float64).square()
        elif isinstance(grad_norm, (int, float)):
            sq = torch.tensor(float(grad_norm) ** 2, dtype=torch.float64, device=self._agree.device)
        else:
            raise TypeError(
                f"Arc.step(grad_norm=...) takes a tensor or a float, got {type(grad_norm).__name__}"
            )
        # sharded layouts add the ranks' shares; the job's norm is already the total
        return sq / self.world_size if self.layout == "sharded" else sq

    def _step(self, loss: torch.Tensor, grad_norm=None) -> Action:
        start = time.monotonic()
        # which collective every rank runs this step is settled first, from what every rank
        # shares, so that a rank failing below still knows whether the others wait for it.
        # Snapshot steps always run the deep (and divergence) checks: only verified states,
        # identical across replicas, become rollback targets. So does the step after a skip:
        # damaged state behind a one-step anomaly is then found at once.
        snapshot_step = self.global_step % self.config.snapshot_every == 0
        last = self._last
        after_skip = last is not None and last.should_skip and not last.rolled_back
        deep = snapshot_step or after_skip or self._calls % self.config.deep_check_every == 0
        compare = self._check_divergence and (
            snapshot_step or self._calls % self.config.divergence_every == 0
        )
        self._calls += 1
        ride = self._ride.take() if self._ride is not None else None
        collective = True if ride is None or deep or compare else None
        # under FSDP2 the others may be inside the collective of the job's DTensor norm
        sharded_norm = grad_norm is not None and self.layout == "sharded"
        self._route = _Route(None, None if sharded_norm else collective)
        if self.chaos is not None:
            self.chaos.before_check()
        self._lr.follow_loop()  # an LR the loop set is its schedule: Arc's backoff goes on top
        user_sq = self._user_grad_sq(grad_norm) if grad_norm is not None else None
        self._route.collective = collective
        if self._ride is not None:
            self._ride.measure = user_sq is None  # from the next backward on
        if ride is not None and (user_sq is not None or ride[0] is None):
            if user_sq is None:  # the job stopped passing grad_norm: measure from now on
                user_sq = self._signals.grad_sq()
            ride = (user_sq, ride[1], ride[2])
        self._route.ride = ride  # what the ride verdict is judged from, as on every rank
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"Arc.step(loss) needs the scalar loss tensor of this step, got {shape}; "
                "reduce it first (e.g. loss.mean())"
            )
        first = ride is None and last is None
        if first and not any(p.grad is not None for p in self._signals.params):
            raise ValueError(
                f"Arc.step() at step {self.global_step} found no gradients: call loss.backward() "
                "before arc.step(loss), and optimizer.zero_grad() after it"
            )
        if not self._snapshots.snapshots:
            self._take_snapshot()  # the first rollback target: the state this run starts from
        busy = self._busy_time(start)
        m = verdict = None
        if ride is not None and not (deep or compare):
            m, verdict = self._judge_ride(ride)
            self._route.collective = m is None
        fast = m is not None
        if not fast:
            # the collective path: this step's full row, one all-reduce of our own
            row = self._signals.row(
                loss,
                deep=deep,
                grad_sq=ride[0] if ride is not None else user_sq,
                local_grad_sq=ride[1] if ride is not None else None,
                lr_ratio=self._lr.ratio(),
                lr=max(self._lr.lrs()),
                step_time=busy,
                preempt=self._preemption.requested,
                fingerprint=compare,
                # the previous step's loss if it rode here unjudged: judged now, never dropped
                late_loss=None if self._ride_loss_judged else self._ride_loss,
            )
            self._phase = _Phase.JOINED
            m = self._agree.reduce(row)  # one collective and one host sync
            failed = np.flatnonzero(m[:, Col.ERROR]).tolist()
            if failed:  # ranks that raised inside step() and only joined to say so
                self._phase = _Phase.DECIDED
                raise self._failfast.peer_error(failed)
            verdict = self._policy.judge(m, amp=self.scaler is not None)
        self._phase = _Phase.DECIDED  # every rank holds the same matrix and verdict
        self._ride_busy = busy
        self._fast_steps += fast
        self._track_stragglers(m)
        if verdict.reason == "replica_divergence":
            self._on_divergence(verdict)
        if m[:, Col.PREEMPT].any():
            self._preempt(m, verdict)
        decision = self._recovery.decide(verdict, [s.step for s in self._snapshots.snapshots])
        step_judged = self.global_step
        self._rec.verdict(step_judged, verdict, decision.kind)
        action = self._act(m, verdict, decision)
        failing = self._recovery.failed_at is not None
        self._recovery.record(
            decision, step_judged, self.global_step if action.rolled_back else None
        )
        if failing and self._recovery.failed_at is None:
            self._rec.recovered(self.global_step)
        self._rec.on_step(action)
        # the ride carries this loss with the next step: to judge (on the fast path nothing has)
        # or only to report
        self._ride_loss = loss.detach() if not action.should_skip else None
        self._ride_loss_judged = not fast
        self._last = action
        self._durability.hold()
        self._last_step_end = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.beat()
        return action

    def _act(self, m, verdict: Verdict, decision: Decision) -> Action:
        base = dict(
            reason=verdict.reason,
            bad_ranks=verdict.bad_ranks,
            loss=verdict.loss,
            grad_norm=verdict.grad_norm,
        )
        if decision.kind == "continue":
            self._policy.observe(m, verdict)
            if verdict.status != HEALTHY:
                self._stats["warnings"] += 1
                self._log_verdict(verdict)
            newest = self._snapshots.newest
            if (
                self.global_step % self.config.snapshot_every == 0
                and newest.step != self.global_step
            ):
                self._take_snapshot(persist=verdict.status == HEALTHY)
            self._durability.on_step(self.global_step, verdict.status)
            self.global_step += 1
            self._lr.maybe_restore(self.global_step, self.rank)
            self._lr.remember()
            return Action(self.global_step, verdict.status, False, False, **base)
        if decision.kind == "skip":
            self._policy.observe(m, verdict, applied=False)
            self._stats["skips"] += 1
            self._log_verdict(verdict)
            if self.scaler is not None:
                # the update is skipped, so scaler.step/update are not called; lower the scale
                # as GradScaler.update would after an overflow (a finite outlier keeps it)
                scale = self.scaler.get_scale()
                if not math.isfinite(verdict.grad_norm):
                    scale *= self.scaler.get_backoff_factor()
                self.scaler.update(scale)
            self.optimizer.zero_grad(set_to_none=True)
            return Action(self.global_step, verdict.status, True, False, **base)
        self._stats["failures"] += 1
        if decision.kind == "raise":
            self._log_verdict(verdict)
            message = (
                f"arc_dist: training cannot recover at step {self.global_step}: {verdict.reason} "
                f"on ranks {list(verdict.bad_ranks)} after {self._stats['rollbacks']} rollbacks "
                f"and {self._stats['escalations']} escalations; no healthy state is left to "
                "restore. Lower the learning rate or inspect the data around this step."
            )
            self._rec.unrecoverable(self.global_step, verdict, message)
            self._durability.on_unrecoverable()
            raise UnrecoverableError(message)
        self._rollback(verdict, decision)
        return Action(self.global_step, FAILURE, True, True, **base)

    def _rollback(self, verdict: Verdict, decision: Decision) -> None:
        failed_at, drop = self.global_step, decision.drop
        t0 = time.monotonic()
        for _ in range(drop):
            self._snapshots.drop_newest()
        if drop:
            self._stats["escalations"] += 1
        snap = self._snapshots.newest
        assert snap is not None, "RecoveryPolicy only rolls back when a snapshot exists"
        self._snapshots.restore(snap, self._load_own_state)
        # newer checkpoints and local snapshots belong to the failed trajectory
        self._durability.on_rollback(snap.step)
        self._policy.on_rollback()
        self._signals.reset_expectations()
        self._ride_loss = None
        self._lr.after_restore(snap.extra["lr_scale"], failed_at, decision.back_off)
        self.global_step = snap.step
        self._stats["rollbacks"] += 1
        self._rec.rollback(
            failed_at,
            snap.step,
            verdict.reason,
            verdict.bad_ranks,
            time.monotonic() - t0,
            drop,
            self._lr.scale,
        )
        if self.rank == 0:
            log.warning(
                "arc_dist: failure at step %d (%s, ranks %s, loss=%.4g, grad_norm=%.4g)%s: rolled "
                "back to step %d in %.3fs, lr x%.3g (cumulative %.3g)",
                failed_at,
                verdict.reason,
                list(verdict.bad_ranks),
                verdict.loss,
                verdict.grad_norm,
                " escalated to an older snapshot" if drop else "",
                snap.step,
                time.monotonic() - t0,
                self.config.lr_backoff if decision.back_off else 1.0,
                self._lr.scale,
            )

    def _log_verdict(self, verdict: Verdict) -> None:
        if self.rank == 0:
            log.warning(
                "arc_dist: %s at step %d: %s on ranks %s (loss=%.4g, grad_norm=%.4g) %s",
                verdict.status,
                self.global_step,
                verdict.reason,
                list(verdict.bad_ranks),
                verdict.loss,
                verdict.grad_norm,
                verdict.details or "",
            )

    def _preempt(self, m, verdict: Verdict) -> None:
        """Every rank: write a final checkpoint if the state is healthy, then exit for a retry."""
        ranks = [int(r) for r in (m[:, Col.PREEMPT] > 0).nonzero()[0]]
        # nothing to save at step 0 (the job's own initial state) or when the newest
        # checkpoint already holds this very state
        saved = (
            self._durability.manager is not None
            and verdict.status != FAILURE
            and self.global_step > 0
            and self.global_step != self._durability.saved_step
        )
        if self.rank == 0:
            log.warning(
                "arc_dist: SIGTERM on ranks %s at step %d: %s and exiting with code %d (retry)",
                ranks,
                self.global_step,
                "writing a final checkpoint"
                if saved
                else "no checkpoint (none configured or state failing)",
                int(Preempted.exit_code),
            )
        if saved:
            self._durability.save(self.global_step, verdict.status, blocking=True)
        self._close(clean=False)  # a restart follows: keep the local snapshots
        raise Preempted(
            f"arc_dist: preempted (SIGTERM on ranks {ranks}) at step {self.global_step}"
        )

    # -- the DDP ride -------------------------------------------------------------------
    def _ride_row(self, local_grad_norm: torch.Tensor) -> torch.Tensor:
        """Called from DDP's comm hook during backward: what bucket 0 carries for this rank."""
        return ride_row(
            local_grad_norm,
            self._ride_loss,
            lr_ratio=self._lr.ratio(),
            lr=max(self._lr.lrs()),
            busy=self._ride_busy,
            preempt=self._preemption.requested,
            loss_judged=self._ride_loss_judged,
        )

    def _judge_ride(self, ride) -> tuple[Any, Verdict | None]:
        """Judge from what rode on DDP's all-reduce; (None, None) sends the step down the
        collective path, which every rank decides identically (replicated inputs only), to
        judge this step's own signals with exact blame, and the previous step's loss that rode
        here as its late loss."""
        post_sq, _, matrix = ride
        matrix[:, Col.GRAD_SQ] = post_sq  # reduced gradients: the same on every rank
        m = self._agree.to_host(matrix)
        verdict = self._policy.judge(m, amp=self.scaler is not None)
        if verdict.status != HEALTHY or m[:, Col.PREEMPT].any():
            return None, None
        return m, verdict

    # -- silent failures ---------------------------------------------------------------
    def _busy_time(self, start: float) -> float:
        """Seconds this rank worked on the step, without waiting for other ranks (silent.py)."""
        if self._last_step_end is None:
            return 0.0
        ready = self._ride.ready_at if self._ride is not None else None
        end = ready if ready is not None and ready > self._last_step_end else start
        return end - self._last_step_end

    def _track_stragglers(self, m) -> None:
        new, cleared = self._stragglers.update(m[:, Col.STEP_TIME])
        if self.rank != 0 or not (new or cleared):
            return
        ratios = self._stragglers.persistent_ratios()
        self._rec.straggler(self.global_step, new, cleared, ratios)
        for r in new:
            log.warning(
                "arc_dist: rank %d is a straggler at step %d: %.2fx the other ranks' busy time "
                "(median over %d steps)",
                r,
                self.global_step,
                ratios[r],
                self.config.straggler_window,
            )
        for r in cleared:
            log.info("arc_dist: rank %d is no longer a straggler at step %d", r, self.global_step)

    def _on_divergence(self, verdict: Verdict) -> None:
        """Count incidents per rank; a rank that keeps diverging is suspect hardware."""
        if len(verdict.bad_ranks) >= self.world_size:
            return  # no majority (e.g. two replicas): nobody can be blamed
        for r in verdict.bad_ranks:
            self._divergence_incidents[r] = self._divergence_incidents.get(r, 0) + 1
            if (
                self._divergence_incidents[r] >= self.config.suspect_after
                and r not in self._suspects
            ):
                self._suspects.add(r)
                if self.rank == 0:
                    log.error(
                        "arc_dist: rank %d diverged from the other replicas %d times: suspect "
                        "hardware (silent data corruption); replace its node",
                        r,
                        self._divergence_incidents[r],
                    )
        if self.config.exit_on_suspect and self._suspects:
            bad = sorted(self._suspects)
            if self.rank in self._suspects:
                raise HardwareError(
                    f"arc_dist: rank {self.rank} is suspect hardware: its parameters diverged "
                    f"from the other replicas {self._divergence_incidents[self.rank]} times"
                )
            raise ArcError(f"arc_dist: restarting the group without suspect ranks {bad}")

    # -- snapshots and own state ---------------------------------------------------------
    def _own_state(self) -> dict:
        return {"global_step": self.global_step, "lr_scale": self._lr.scale}

    def _load_own_state(self, state: dict) -> None:
        self.global_step = int(state["global_step"])

    def _take_snapshot(self, persist: bool = False) -> None:
        """``persist``: a verified healthy state, also written to the node-local tier."""
        t0 = time.monotonic()
        self._durability.before_snapshot()
        snap = self._snapshots.take(self.global_step, self._own_state())
        if persist:
            self._durability.persist(snap)
        self._stats["snapshots"] += 1
        self._rec.snapshot(snap.step, snap.nbytes, time.monotonic() - t0)
        log.debug(
            "[rank %d] arc_dist: snapshot at step %d (%.1f MB in %.3fs)",
            self.rank,
            snap.step,
            snap.nbytes / 1e6,
            time.monotonic() - t0,
        )

    def state_dict(self) -> dict:
        """The controller's own state (saved in checkpoints under the key ``"arc"``)."""
        return {
            "global_step": self.global_step,
            "lr": self._lr.state_dict(),
            "policy": self._policy.state_dict(),
            "recovery": self._recovery.state_dict(),
            "stats": dict(self._stats),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.global_step = int(sd["global_step"])
        lr = sd.get("lr") or {  # saved without the restore step: wait a full recovery window
            "scale": sd["lr_scale"],
            "restore_at": self.global_step + self.config.recovery_steps,
        }
        self._lr.load_state_dict(lr)
        self._policy.load_state_dict(sd["policy"])
        self._recovery.load_state_dict(sd["recovery"])
        for k, v in sd.get("stats", {}).items():
            self._stats[k] = int(v)

    # -- durability ----------------------------------------------------------------------
    def register(self, name: str, obj: Any, *, per_rank: bool = False,
                 reshard: str = "error") -> None:  # fmt: skip
        """Save and restore ``obj`` (with ``state_dict``/``load_state_dict``) in checkpoints.

        A checkpoint written inside ``step()`` holds ``obj`` as it was when the previous
        ``step()`` returned: a data position then counts the batches trained on, not the one in
        flight, so a resumed run trains on that batch too. Advance such state before
        ``step()`` (as a loader does when it yields the batch); ``save()`` takes it as it is.
        ``obj.state_dict()`` is called and deep-copied at the end of every ``step()``: keep it
        small (a position, not a buffer of samples).

        ``per_rank=True`` for state that differs between ranks (a data iterator, a loader
        worker's RNG): each rank's copy is stored under its own key. ``reshard`` says what a
        resume at another world size does with it: ``"error"`` (:class:`~arc_dist.ReshardError`
        on every rank), ``"copy_rank0"`` (new ranks start from rank 0's state) or
        ``"keep_own"`` (new ranks keep their own); removed ranks' state is dropped. A global
        position (:class:`~arc_dist.ResumableDistributedSampler`) needs none of this.
        """
        self._durability.register(name, obj, per_rank=per_rank, reshard=reshard)

    def save(self, blocking: bool = True) -> None:
        """Collective: a durable checkpoint of the current state now."""
        last = self._last
        # after a rollback or a skipped update the state is one that was judged healthy before
        changed = last is not None and not last.should_skip
        status = last.status if changed else HEALTHY
        try:
            self._durability.save(self.global_step, status, blocking=blocking, live=True)
        finally:
            self._rec.drain()  # a blocking save's outcome is known now

    def resume(self) -> int:
        """Collective: load the newest healthy checkpoint, if any; returns ``global_step``.

        Healthy: saved under a healthy verdict (the final checkpoint on SIGTERM included) or
        confirmed (docs/checkpoints.md). With the node-local tier on, its newest snapshot is used
        instead when every rank has it and it is not older than that durable checkpoint
        (checkpoint/resume.py).
        """
        t0 = time.monotonic()
        out = self._durability.resume()
        if out.step is not None:
            self.global_step = out.step
            self._ride_loss = None
            self._snapshots.snapshots.clear()
            self._policy.on_rollback()
            self._signals.reset_expectations()
            self._lr.remember()
        source = (out.source or Source.DURABLE).value
        self._rec.resumed(out.step, time.monotonic() - t0, source=source, nbytes=out.nbytes)
        exitcodes.track_progress(self, self.global_step)
        return self.global_step

    # -- lifecycle -----------------------------------------------------------------------
    def stats(self) -> dict:
        out = dict(self._stats)
        out.update(
            steps=self.global_step,
            fast_steps=self._fast_steps,
            collectives=self._agree.collectives,
            host_syncs=self._agree.host_syncs,
            lr_scale=self._lr.scale,
            # the last step's agreed health signals (NaN before the first step)
            loss=self._last.loss if self._last is not None else math.nan,
            grad_norm=self._last.grad_norm if self._last is not None else math.nan,
            stragglers=sorted(self._stragglers.flagged),
            straggler_ratios=self._stragglers.persistent_ratios(),
            divergence_incidents=dict(self._divergence_incidents),
            suspect_ranks=sorted(self._suspects),
        )
        out.update(self._durability.stats())
        return out

    def close(self) -> None:
        """The end of training: waits for pending writes, stops threads, removes the local tier."""
        self._close(clean=True)

    def _close(self, clean: bool) -> None:
        """``clean=False`` (an exception, a preemption): a restart follows, keep local snapshots."""
        if self._closed:
            return
        self._closed = True
        try:
            self._durability.close(clean)
        finally:
            if self._watchdog is not None:
                self._watchdog.stop()
        self._preemption.uninstall()
        self._rec.close(self.stats())
        if self.chaos is not None:
            self.chaos.detach()

    def __enter__(self) -> Arc:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._close(clean=exc_type is None)
