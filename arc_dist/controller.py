"""``Arc``: the controller that wraps a training loop.

One ``step()`` per optimizer step: read this rank's signals (signals.py), agree on them across
ranks (from DDP's all-reduce, ddp_hook.py, or one collective of our own, agreement.py), judge
them (policy.py), decide (recovery.py) and act: continue, skip, roll every rank back to the
newest healthy in-memory snapshot (snapshot.py) with an LR backoff, or give up with
:class:`~arc_dist.UnrecoverableError`. An error on one rank reaches the others through
failfast.py. Durable checkpoints, the hang watchdog and fault injection plug in here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import chaos as chaos_mod
from .agreement import Agreement, comm_device
from .arguments import check_arguments, check_gradients, check_loss
from .checkpoint.durability import Durability
from .checkpoint.resume import Source
from .checkpoint.state import TrainState
from .config import ArcConfig
from .ddp_hook import DDPRide
from .elastic import exitcodes
from .errors import Preempted, UnrecoverableError
from .failfast import FailFast, Phase, Route
from .forecast import REASON as FORECAST
from .forecast import Forecaster
from .layout import Layout, layout_of
from .lr import LRGuard
from .observe.events import EventLog
from .observe.recorder import Recorder
from .policy import FAILURE, HEALTHY, WARNING, HealthPolicy, Status, Verdict
from .preemption import PreemptionHandler
from .recovery import Decision, DecisionKind, RecoveryPolicy
from .signals import Col, SignalCollector, error_row, job_grad_sq
from .silent import DivergenceTracker, StragglerTracker
from .snapshot import SnapshotStore
from .watchdog import Watchdog

log = logging.getLogger("arc_dist")


@dataclass(frozen=True, slots=True)
class Action:
    """What the training loop should do after ``Arc.step``; identical on every rank."""

    step: int
    status: Status
    should_skip: bool
    rolled_back: bool
    reason: str | None
    bad_ranks: tuple[int, ...]
    #: mean loss over ranks this step
    loss: float = math.nan
    #: global gradient norm this step (under DDP: RMS of the ranks' own, pre-average norms)
    grad_norm: float = math.nan
    #: on a rollback: the step that failed (None otherwise)
    failed_step: int | None = None
    #: on a rollback: the step of the restored state, now ``step`` (None otherwise)
    restored_step: int | None = None


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
        metrics_every: int | None = None,
    ):
        check_arguments(model, optimizer, scheduler, config, process_group)
        self.model, self.optimizer, self.scheduler, self.scaler = (
            model,
            optimizer,
            scheduler,
            scaler,
        )
        self.config = config or ArcConfig()
        # these keywords override the config's fields of the same names
        chaos = self.config.chaos if chaos is None else chaos
        log_dir = self.config.log_dir if log_dir is None else log_dir
        metrics_every = self.config.metrics_every if metrics_every is None else metrics_every
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
        self._agree = Agreement(
            self.group, self.rank, self.world_size, comm_device(self.group, self.device)
        )
        self._signals = SignalCollector(
            model, optimizer, self._agree.device, self.config.divergence_check_optimizer
        )
        self._policy = HealthPolicy(
            self.config.thresholds, self.layout, self.world_size, max_skips=self.config.max_skips
        )
        # replicas are compared only where they must be bit-identical (DDP)
        self._check_divergence = (
            self.config.divergence_every > 0
            and self.layout == Layout.REPLICATED
            and self.world_size > 1
        )
        self._stragglers = StragglerTracker(
            self.world_size, self.config.straggler_ratio, self.config.straggler_window, self.rank
        )
        self._divergence = DivergenceTracker(
            self.world_size, self.config.suspect_after, self.config.exit_on_suspect, self.rank
        )
        self._recovery = RecoveryPolicy(self.config)
        self._snapshots = SnapshotStore(
            model, optimizer, scheduler, scaler, self.config.keep_snapshots
        )

        self.global_step = 0
        exitcodes.track_progress(self, 0)  # error files report how far this process got
        self._calls = 0  # step() calls, rollbacks included: decides deep-check steps
        self._lr = LRGuard(optimizer, scheduler, backoff=self.config.lr_backoff,
                           restore=self.config.lr_restore, recovery_steps=self.config.recovery_steps)  # fmt: skip
        self._last_step_end: float | None = None
        self._preemption = PreemptionHandler()
        if self.config.handle_sigterm:
            self._preemption.install()
        self._ride: DDPRide | None = None
        if self.config.ride_ddp:  # under DDP the signals ride on its all-reduce (ddp_hook.py)
            self._ride = DDPRide.attach(model, rank=self.rank, world_size=self.world_size,
                                        agree=self._agree, policy=self._policy, lr=self._lr,
                                        preemption=self._preemption, amp=scaler is not None,
                                        explain=self._failfast.explain,
                                        deep=self._riding_deep)  # fmt: skip
        self._closed = False
        self._stats = dict(rollbacks=0, skips=0, failures=0, warnings=0, escalations=0,
                           snapshots=0, checkpoints=0, forecasts=0)  # fmt: skip
        self._forecast = Forecaster(self.config.early_warning)  # off by default
        self._last: Action | None = None

        if isinstance(chaos, str):  # "" turns ARC_CHAOS off: no plan, no forward hook
            chaos = chaos_mod.Chaos.from_spec(chaos) if chaos.strip() else None
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
            speak=self.rank == 0,
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
        self._failfast.begin_step()
        try:
            return self._step(loss, grad_norm)
        except Exception as exc:
            from .health import hardware_error

            hw = hardware_error(exc, rank=self.rank, device=self.device, step=self.global_step)
            out = self._failfast.on_step_error(
                exc,
                hw,
                self.global_step,
                join=lambda: self._agree.reduce(error_row(self._agree.device)),
                judge_ride=self._ride.judge if self._ride is not None else None,
            )
            if out is exc:
                raise
            raise out from exc

    def _step(self, loss: torch.Tensor, grad_norm=None) -> Action:
        start = time.monotonic()
        # which collective every rank runs this step is settled first, from what every rank
        # shares, so that a rank failing below still knows whether the others wait for it.
        # Snapshot steps always run the deep (and divergence) checks: only verified states,
        # identical across replicas, become rollback targets. So does the step after a skip:
        # damaged state behind a one-step anomaly is then found at once.
        # Other deep-check steps ride on DDP's all-reduce when it carries them (ddp_hook.py).
        snapshot_step = self._snapshot_step()
        last, calls = self._last, self._calls
        deep = snapshot_step or self._after_skip() or calls % self.config.deep_check_every == 0
        compare = self._check_divergence and (
            snapshot_step or calls % self.config.divergence_every == 0
        )
        self._calls += 1
        ride = self._ride.take() if self._ride is not None else None
        deep_rides = ride is not None and ride.deep
        collective = True if ride is None or compare or (deep and not deep_rides) else None
        # under FSDP2 the others may be inside the collective of the job's DTensor norm
        sharded_norm = grad_norm is not None and self.layout == Layout.SHARDED
        route = self._failfast.route = Route(None, None if sharded_norm else collective)
        if self.chaos is not None:
            self.chaos.before_check()
        self._lr.follow_loop()  # an LR the loop set is its schedule: Arc's backoff goes on top
        user_sq = None
        if grad_norm is not None:
            user_sq = job_grad_sq(grad_norm, self._agree.device, self.layout, self.world_size)
        route.collective = collective
        if self._ride is not None:
            ride = self._ride.with_grad_norm(ride, user_sq)
        route.ride = ride  # what the ride verdict is judged from, as on every rank
        check_loss(loss)
        if ride is None and last is None:  # the first step: was there a backward at all?
            check_gradients(self._signals.params, self.global_step)
        if not self._snapshots:
            self._take_snapshot()  # the first rollback target: the state this run starts from
        # seconds this rank worked on the step, without waiting for other ranks (silent.py)
        busy, last_end = 0.0, self._last_step_end
        if last_end is not None:
            busy = (self._ride.work_end(start, last_end) if self._ride else start) - last_end
        m = verdict = None
        if ride is not None and not compare and (deep_rides or not deep):
            m, verdict = self._ride.judge(ride)
            route.collective = m is None
        fast = m is not None
        if not fast:
            # the collective path: this step's full row, one all-reduce of our own
            row = self._signals.row(
                loss,
                deep=deep,
                grad_sq=ride.grad_sq if ride is not None else user_sq,
                local_grad_sq=ride.local_grad_sq if ride is not None else None,
                lr_ratio=self._lr.ratio(),
                lr=max(self._lr.lrs()),
                step_time=busy,
                preempt=self._preemption.requested,
                fingerprint=compare,
                # the previous step's loss if it rode here unjudged: judged now, never dropped
                late_loss=self._ride.late_loss() if self._ride is not None else None,
                deep_values=self._signals.deep_values(calls) if deep else None,
            )
            self._failfast.phase = Phase.JOINED
            m = self._agree.reduce(row)  # one collective and one host sync
            failed = np.flatnonzero(m[:, Col.ERROR]).tolist()
            if failed:  # ranks that raised inside step() and only joined to say so
                self._failfast.phase = Phase.DECIDED
                raise self._failfast.peer_error(failed)
            verdict = self._policy.judge(m, amp=self.scaler is not None)
        self._failfast.phase = Phase.DECIDED  # every rank holds the same matrix and verdict
        if self._ride is not None:
            self._ride.judged(fast=fast, busy=busy)
        new, cleared = self._stragglers.observe(m[:, Col.STEP_TIME], self.global_step)
        if self.rank == 0 and (new or cleared):
            ratios = self._stragglers.persistent_ratios()
            self._rec.straggler(self.global_step, new, cleared, ratios)
        if verdict.reason == "replica_divergence":
            self._divergence.record(verdict.bad_ranks)
        if m[:, Col.PREEMPT].any():
            self._preempt(m, verdict)
        decision = self._recovery.decide(verdict, self._snapshots.steps())
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
        if self._ride is not None:  # the next backward carries this loss, judged or not
            self._ride.carry(None if action.should_skip else loss.detach(), judged=not fast)
        self._last = action
        self._durability.hold()
        self._last_step_end = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.beat()
        return action

    def _snapshot_step(self) -> bool:
        """A regular snapshot step, or the pin after an instability forecast (forecast.py)."""
        return self.global_step % self.config.snapshot_every == 0 or self._forecast.pin_due

    def _after_skip(self) -> bool:
        last = self._last
        return last is not None and last.should_skip and not last.rolled_back

    def _riding_deep(self) -> list[torch.Tensor] | None:
        """Asked by the DDP hook during backward: the coming step's deep check when it rides.
        Snapshot steps and the step after a skip take theirs on the collective path, from the
        state as ``step()`` finds it: only verified states become rollback targets."""
        if (
            self._calls % self.config.deep_check_every
            or self._snapshot_step()
            or self._after_skip()
        ):
            return None
        return self._signals.deep_values(self._calls)

    def _act(self, m, verdict: Verdict, decision: Decision) -> Action:
        base = dict(
            reason=verdict.reason,
            bad_ranks=verdict.bad_ranks,
            loss=verdict.loss,
            grad_norm=verdict.grad_norm,
        )
        if decision.kind == DecisionKind.CONTINUE:
            self._policy.observe(m, verdict)
            if verdict.status != HEALTHY:
                self._stats["warnings"] += 1
            regular = self.global_step % self.config.snapshot_every == 0
            pin = self._forecast.pinned(verdict) and not regular
            if (regular or pin) and self._snapshots.newest.step != self.global_step:
                self._take_snapshot(persist=verdict.status == HEALTHY, pin=pin)
            self._durability.on_step(self.global_step, verdict.status)
            self.global_step += 1
            self._lr.maybe_restore(self.global_step, self.rank)
            judged, status = self.global_step - 1, verdict.status
            score = self._forecast.observe(judged, verdict)
            if score is not None:  # the update is applied; the next state is pinned
                self._forecast.act(judged, score, verdict.grad_norm, self._lr, self._rec)
                self._stats["forecasts"] += 1
                status, base["reason"] = WARNING, FORECAST
            self._lr.remember()
            return Action(self.global_step, status, False, False, **base)
        if decision.kind == DecisionKind.SKIP:
            self._policy.observe(m, verdict, applied=False)
            self._stats["skips"] += 1
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
        if decision.kind == DecisionKind.RAISE:
            message = (
                f"arc_dist: training cannot recover at step {self.global_step}: {verdict.reason} "
                f"on ranks {list(verdict.bad_ranks)} after {self._stats['rollbacks']} rollbacks "
                f"and {self._stats['escalations']} escalations; no healthy state is left to "
                "restore. Lower the learning rate or inspect the data around this step."
            )
            self._rec.unrecoverable(self.global_step, verdict, message)
            self._durability.on_unrecoverable()
            raise UnrecoverableError(message)
        failed_step = self.global_step
        self._rollback(verdict, decision)
        return Action(self.global_step, FAILURE, True, True, **base, failed_step=failed_step,
                      restored_step=self.global_step)  # fmt: skip

    def _rollback(self, verdict: Verdict, decision: Decision) -> None:
        failed_at, drop = self.global_step, decision.drop
        t0 = time.monotonic()
        for _ in range(drop):
            self._snapshots.drop_newest()
        if drop:
            self._stats["escalations"] += 1
        snap = self._snapshots.newest
        assert snap is not None, "RecoveryPolicy only rolls back when a snapshot exists"
        self._snapshots.restore(snap, self._restore_snapshot_extra)
        # newer checkpoints and local snapshots belong to the failed trajectory
        self._durability.on_rollback(snap.step)
        self._policy.on_rollback()
        self._forecast.on_rollback()
        self._signals.reset_expectations()
        if self._ride is not None:
            self._ride.forget()
        self._lr.after_restore(snap.extra["lr_scale"], failed_at, decision.back_off)
        self.global_step = snap.step
        self._stats["rollbacks"] += 1
        self._rec.rollback(failed_at, snap.step, verdict, time.monotonic() - t0, drop,
                           self._lr.scale, self.config.lr_backoff if decision.back_off else 1.0)  # fmt: skip

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

    # -- snapshots and the controller's state --------------------------------------------
    def _snapshot_extra(self) -> dict:
        """What a snapshot holds of the controller: a rollback restores the step and reads the
        LR scale then (lr.py)."""
        return {"global_step": self.global_step, "lr_scale": self._lr.scale}

    def _restore_snapshot_extra(self, extra: dict) -> None:
        self.global_step = int(extra["global_step"])

    def _take_snapshot(self, persist: bool = False, pin: bool = False) -> None:
        """``persist``: a verified healthy state, also written to the node-local tier. ``pin``:
        held on top of ``keep_snapshots`` (snapshot.py)."""
        t0 = time.monotonic()
        self._durability.before_snapshot()
        snap = self._snapshots.take(self.global_step, self._snapshot_extra(), pin=pin)
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
            "forecast": self._forecast.state_dict(),
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
        self._forecast.load_state_dict(sd.get("forecast"))
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
        # after a rollback or a skipped update the state is one that was judged healthy before;
        # a forecast is about later steps, not this state
        changed = last is not None and not last.should_skip and last.reason != FORECAST
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
            if self._ride is not None:
                self._ride.forget()
            self._snapshots.clear()
            self._policy.on_rollback()
            self._signals.reset_expectations()
            self._lr.remember()
        source = out.source or Source.DURABLE
        self._rec.resumed(out.step, time.monotonic() - t0, source=source, nbytes=out.nbytes)
        exitcodes.track_progress(self, self.global_step)
        return self.global_step

    def allow_hang(self, seconds: float | None = None) -> contextlib.AbstractContextManager:
        """A context manager: ``seconds`` (default ``hang_grace``) on top of ``hang_timeout``
        for a long operation between steps (an evaluation, a save, a load); leaving it counts as
        progress. Does nothing without ``hang_timeout``."""
        if self._watchdog is None:
            return contextlib.nullcontext()
        return self._watchdog.allow(seconds)

    # -- lifecycle -----------------------------------------------------------------------
    def stats(self) -> dict:
        out = dict(self._stats)
        out.update(
            steps=self.global_step,
            fast_steps=self._ride.fast_steps if self._ride is not None else 0,
            collectives=self._agree.collectives,
            host_syncs=self._agree.host_syncs,
            lr_scale=self._lr.scale,
            # the last step's agreed health signals (NaN before the first step)
            loss=self._last.loss if self._last is not None else math.nan,
            grad_norm=self._last.grad_norm if self._last is not None else math.nan,
            stragglers=sorted(self._stragglers.flagged),
            straggler_ratios=self._stragglers.persistent_ratios(),
            divergence_incidents=dict(self._divergence.incidents),
            suspect_ranks=sorted(self._divergence.suspects),
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
