"""``Durability``: everything that outlives the process, in one place.

It owns the durable checkpoints (``CheckpointManager``), the node-local snapshot tier
(``LocalTier``), the objects registered with ``Arc.register`` and the choice a restart resumes
from (resume.py). ``Arc`` calls it at a few points of its loop and applies what it returns;
durability never calls back into the controller. The state it saves and restores is the set of
objects it was given: the model, optimizer, scheduler and scaler, the controller's own state
(``arc_state``: ``state_dict``/``load_state_dict``, saved under ``"arc"``), the in-memory
snapshot store (a local snapshot is restored through it, as a rollback is) and the registered
objects.

Outcomes are reported to the sink given to ``subscribe`` as ``on_event(kind, step, values)``
(the event log's ``checkpoint_*`` records): ``checkpoint_start`` here, the rest from the
manager.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.state_dict import _init_optim_state

from ..config import ArcConfig
from ..errors import CheckpointError
from ..layout import is_dtensor
from ..policy import HEALTHY
from ..rng import decode as decode_rng
from ..snapshot import Snapshot, SnapshotStore
from .local_format import Identity, decode_skeleton, default_local_dir, host_name, run_id_from_env
from .local_tier import LocalTier
from .manager import CheckpointManager, EventSink, gather_objects
from .manifest import config_digest
from .resume import Source, check_payload, choose_source, durable_view, model_keys, own_state
from .state import PerRank, Reshard, TrainState

log = logging.getLogger("arc_dist")


@dataclass(frozen=True, slots=True)
class Resumed:
    """What ``Durability.resume`` loaded into the state objects; ``Arc`` applies the rest."""

    source: Source | None  # None: nothing loaded (a fresh start)
    step: int | None
    reason: str = ""
    #: bytes read from durable storage (0 for a local resume or none)
    nbytes: int = 0


class Durability:
    """Durable checkpoints, the node-local tier and the resume choice of one ``Arc``.

    ``train``: the ``TrainState`` saved under ``"train"``; ``arc_state``: the controller's own
    state, saved under ``"arc"``; ``snapshots``: the in-memory snapshot store (its newest
    verified snapshots go to the local tier, and a local resume restores through it).
    """

    def __init__(
        self,
        *,
        train: TrainState,
        arc_state: Any,
        snapshots: SnapshotStore,
        config: ArcConfig,
        group: Any,
        rank: int,
        world_size: int,
        layout: str,
        checkpoint_dir: str | None,
        storage_options: dict | None = None,
    ) -> None:
        self.train, self.arc_state, self.snapshots = train, arc_state, snapshots
        self.config, self.group, self.rank, self.world_size = config, group, rank, world_size
        self.layout = layout
        self.on_event: EventSink | None = None  # subscribe()
        #: set by ``Arc`` once started: saves, loads and the final flush get ``hang_grace``
        self.watchdog: Any = None
        self.digest = config_digest(config.digest_fields())
        self.manager: CheckpointManager | None = None
        if checkpoint_dir is not None:
            self.manager = CheckpointManager(
                checkpoint_dir,
                storage_options=storage_options,
                keep=config.keep_checkpoints,
                confirm_after=config.confirm_after,
                async_save=config.async_checkpoint,
                process_group=group,
                config_digest=self.digest,
            )
        self.registered: dict[str, Any] = {}
        self._held: dict[str, Any] = {}  # their state when step() last returned
        # node-local snapshots for fast restarts (local_tier.py); inactive until resume()
        self.local = self._make_local_tier(checkpoint_dir)
        self._local_static: dict | None = None
        #: the step whose state the newest save holds (None: none, or another trajectory's)
        self.saved_step: int | None = None
        self.resume_source: Source | None = None

    def subscribe(self, on_event: EventSink) -> None:
        """``on_event(kind, step, values)``: the ``checkpoint_*`` outcomes from now on (every
        rank, any thread; see ``CheckpointManager``)."""
        self.on_event = on_event
        if self.manager is not None:
            self.manager.on_event = on_event

    # -- registered objects --------------------------------------------------------------
    def register(self, name: str, obj: Any, *, per_rank: bool, reshard: str) -> None:
        """See ``Arc.register``."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"Arc.register({name!r}, ...) needs an object with state_dict() and "
                f"load_state_dict(), got {type(obj).__name__}"
            )
        if name in ("train", "arc") or name in self.registered:
            raise ValueError(f"Arc.register: the name {name!r} is taken; choose another")
        if reshard not in [r.value for r in Reshard]:
            raise ValueError(
                f"Arc.register({name!r}, reshard={reshard!r}) is invalid: choose one of "
                f"{[r.value for r in Reshard]}"
            )
        if per_rank:
            obj = PerRank(obj, reshard, name=name)
        elif reshard != "error" and self.rank == 0:
            log.warning(
                "arc_dist: Arc.register(%r, reshard=%r) has no effect without per_rank=True: "
                "the state is saved once and every rank loads it", name, reshard,
            )  # fmt: skip
        self.registered[name] = obj
        self._held[name] = copy.deepcopy(obj.state_dict())

    def hold(self) -> None:
        """Every ``step()`` ends here: the registered state the next step's saves write."""
        if self.registered:
            self._held = {n: copy.deepcopy(o.state_dict()) for n, o in self.registered.items()}

    def app_state(self, live: bool = True) -> dict:
        """What a checkpoint holds. ``live=False`` (a save inside ``step()``): the registered
        objects as the previous ``step()`` left them, before the batch in flight was drawn."""
        return {
            "train": self.train,
            "arc": self.arc_state,
            **(self.registered if live else self._held),
        }

    # -- the loop ------------------------------------------------------------------------
    def _allowance(self):
        """``hang_grace`` on top of ``hang_timeout`` for a save, a load or the final flush."""
        return self.watchdog.allow() if self.watchdog is not None else contextlib.nullcontext()

    def save(self, step: int, status: str, *, blocking: bool, live: bool = False) -> None:
        """Collective: a durable checkpoint of the state at ``step``. ``status``: the agreed
        verdict on it (a restart prefers healthy ones)."""
        if self.manager is None:
            raise ValueError("Arc.save() needs Arc(checkpoint_dir=...); none was given")
        if self.on_event is not None:
            self.on_event("checkpoint_start", step, {"blocking": blocking})
        self.saved_step = step
        # a snapshot taken at this step boundary holds host copies of this very state: a
        # background save writes those instead of copying the model and optimizer again
        state = self.app_state(live)
        loan = None if blocking else self.snapshots.lend(step)
        with self._allowance():
            self.manager.save(
                step,
                state,
                verdict={"status": status, "step": step},
                blocking=blocking,
                loan=loan,
            )

    def on_step(self, step: int, status: str) -> None:
        """Every rank, after each applied update (``status``: healthy or warning): counts
        healthy steps towards confirmation and writes the periodic checkpoint when due."""
        if self.manager is None:
            return
        if status == HEALTHY:  # a warning does not count towards confirmation
            targets = self.snapshots.steps()
            self.manager.on_healthy_step(step, rollback_targets=targets)
        every = self.config.checkpoint_every
        # not when this exact state is what the newest checkpoint holds (just resumed, or
        # rolled back to it): re-writing it would uncommit it for nothing
        due = every and step > 0 and step % every == 0
        if due and step != self.saved_step:
            self.save(step, status, blocking=not self.config.async_checkpoint)

    def before_snapshot(self) -> None:
        """The local tier's writer may still read the buffers the next snapshot reuses."""
        if self.local is not None:
            self.local.wait()

    def persist(self, snap: Snapshot) -> None:
        """A verified healthy snapshot: also written to the node-local tier (in the background)."""
        if self.local is None or not self.local.active:
            return
        if self._local_static is None:
            self._local_static = {
                "model_keys": model_keys(self.train.model),
                "optimizer": type(self.train.optimizer).__name__,
            }
        own = own_state(self.arc_state.state_dict(), self._held)
        self.local.submit(snap.step, snap, own=own, static=self._local_static)

    def on_rollback(self, restored_step: int) -> None:
        """Every rank, after a rollback: newer checkpoints and local snapshots belong to the
        failed trajectory."""
        if self.local is not None:
            self.local.on_rollback(restored_step)
        if restored_step != self.saved_step:
            self.saved_step = None  # training will reach that step again along another path
        if self.manager is not None:
            self.manager.on_rollback(restored_step)

    def on_unrecoverable(self) -> None:
        """No retry will resume from the local snapshots: free their memory."""
        if self.local is not None:
            self.local.close(clean=True)

    # -- resume --------------------------------------------------------------------------
    def resume(self) -> Resumed:
        """Collective: load the newest healthy state into the state objects (see resume.py)."""
        if self.manager is None and self.local is None:
            return Resumed(None, None)
        with self._allowance():
            if self.local is None:
                step = self.manager.load(self.app_state())
                out = Resumed(
                    Source.DURABLE if step is not None else None,
                    step,
                    nbytes=self.manager.loaded_bytes if step is not None else 0,
                )
                self.saved_step = step if step is not None else self.saved_step
            else:
                out = self._resume_tiers()
        self.resume_source = out.source
        self.hold()  # the loaded position, for saves before the next step ends
        return out

    def _load_durable(self) -> tuple[int | None, int]:
        if self.manager is None:
            return None, 0
        step = self.manager.load(self.app_state())
        return step, self.manager.loaded_bytes if step is not None else 0

    def _resume_tiers(self) -> Resumed:
        """Every rank: choose, verify, load; activate the tier's writer."""
        tier, rank = self.local, self.rank

        # the training group: resume() is collective on it and nothing else uses it meanwhile
        def gather(obj: Any) -> list:
            return gather_objects(obj, self.group, self.world_size)

        host = host_name()
        t0 = time.monotonic()
        cands, notes = tier.candidates()
        view = durable_view(self.manager) if rank == 0 else None
        token = uuid.uuid4().hex[:12] if rank == 0 else None
        gathered = gather((host, cands, notes, view, token))
        hosts = [x[0] for x in gathered]
        local = [x[1] for x in gathered]
        all_notes = [x[2] for x in gathered]
        view, token = gathered[0][3], gathered[0][4]

        rejected: set[tuple[int, str]] = set()
        while True:
            choice = choose_source(local, view, rejected, all_notes)
            if choice.source != Source.LOCAL:
                break
            payload, why = tier.read(choice.step, choice.lineage)
            if why is None:
                why = check_payload(
                    payload, self.train.model, self.train.optimizer, self.registered
                )
            problems = gather(why)
            if not any(problems):
                break
            rejected.add((choice.step, choice.lineage))
            all_notes = [[f"step_{choice.step}: {p}"] if p else [] for p in problems]
            if rank == 0:
                bad = ", ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
                log.warning("arc_dist: local snapshot step_%d is unusable (%s)", choice.step, bad)

        if choice.source == Source.LOCAL:
            why = None
            try:
                self._restore_local(payload)
            except Exception as e:  # noqa: BLE001 - validated already: a failure is a surprise
                why = f"{type(e).__name__}: {e}"
            problems = gather(why)
            payload = None
            if not any(problems):
                out = Resumed(Source.LOCAL, choice.step, choice.reason)
                # a local resume at a healthy committed step need not save it again
                self.saved_step = choice.step if choice.step in view.healthy_steps else None
            else:
                bad = "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)
                # the live objects are half restored, maybe differently on each rank: only a
                # full durable load over them gives every rank one consistent state
                step, nbytes = self._load_durable()
                if step is None:
                    raise CheckpointError(
                        f"arc_dist: restoring the local snapshot step_{choice.step} failed "
                        f"midway ({bad}) and no durable checkpoint exists to load over the "
                        f"half-restored state; training does not start from it. Fix: remove "
                        f"{tier.root} (or set ArcConfig.local_snapshots=False) to start fresh, "
                        "and report this"
                    )
                reason = f"restoring local step_{choice.step} failed ({bad})"
                out = Resumed(Source.DURABLE, step, reason, nbytes)
                self.saved_step = step
        else:
            step, nbytes = self._load_durable()
            out = Resumed(Source.DURABLE if step is not None else None, step, choice.reason, nbytes)
            self.saved_step = step if step is not None else self.saved_step

        # every rank learns who writes its host's replicated state: the lowest rank on the host
        leader = min(r for r, h in enumerate(hosts) if h == host)
        tier.prune(out.step if out.source == Source.LOCAL else None, host_leader=rank == leader)
        tier.activate(token, shared_writer=leader)
        if rank == 0:
            elapsed = time.monotonic() - t0
            if out.source == Source.LOCAL:
                log.info(
                    "arc_dist: resumed from the local snapshot tier at step %d (%s) in %.2fs; %s",
                    out.step, tier.root, elapsed, out.reason,
                )  # fmt: skip
            elif out.step is not None or any(local) or any(all_notes):  # not a fresh start
                log.info(
                    "arc_dist: local snapshot tier not used: %s; resuming from durable storage%s",
                    out.reason, f" (step {out.step})" if out.step is not None else "",
                )  # fmt: skip
        return out

    def _restore_local(self, payload: dict) -> None:
        """Every rank: put a verified local snapshot into the live objects (as a rollback does)."""
        optimizer = self.train.optimizer
        params = (p for g in optimizer.param_groups for p in g["params"])
        if not optimizer.state and any(is_dtensor(p) for p in params):
            # FSDP2 optimizer state is restored in place, into DTensors that must exist first
            _init_optim_state(optimizer)
        snap = Snapshot(
            step=int(payload["step"]),
            model=list(payload["model"]),
            optim_tensors=list(payload["optim_tensors"]),
            optim_skeleton=decode_skeleton(payload["optim_skeleton"]),
            scheduler=payload["scheduler"],
            scaler=payload["scaler"],
            rng=decode_rng(payload["rng"]),
            extra=payload["extra"],
        )
        # the controller's own state (the step included) comes from its saved state dict
        self.snapshots.restore(snap, lambda extra: None)
        self.arc_state.load_state_dict(payload["arc"])
        for name, obj in self.registered.items():
            obj.load_state_dict(payload["registered"][name])

    # -- lifecycle -----------------------------------------------------------------------
    def wait(self) -> None:
        """Wait for the durable save in flight and the local tier's writer."""
        if self.manager is not None:
            self.manager.wait()
        if self.local is not None:
            self.local.wait()

    def stats(self) -> dict:
        out: dict = {}
        if self.manager is not None:
            out.update(self.manager.stats())
        if self.local is not None:
            out.update(self.local.stats())
        out["resume_source"] = self.resume_source
        return out

    def close(self, clean: bool) -> None:
        """Wait for pending writes and stop the threads. ``clean=False`` (an exception, a
        preemption): a restart follows, keep the local snapshots."""
        try:
            if self.manager is not None:
                with self._allowance():
                    self.manager.close()
            if self.local is not None:
                self.local.close(clean=clean)
        finally:
            if self.local is not None:
                self.local.close(clean=False)  # idempotent: only stops the writer

    def _make_local_tier(self, checkpoint_dir: str | None) -> LocalTier | None:
        """The node-local tier, or None; the same answer on every rank (config and launcher env)."""
        want = self.config.local_snapshots
        if want is False or (want is None and checkpoint_dir is None):
            if self.config.local_dir is not None and self.rank == 0:
                log.warning(
                    "arc_dist: ArcConfig(local_dir=%r) has no effect: local snapshots are off "
                    "(local_snapshots=%r, checkpoint_dir=%r)", self.config.local_dir, want,
                    checkpoint_dir,
                )  # fmt: skip
            return None
        run_id = run_id_from_env()
        if run_id is None:
            if want:
                log.warning(
                    "arc_dist: ArcConfig(local_snapshots=True) has no effect without a run id: "
                    "set ARC_RUN_ID to a value shared by every restart of this job (torchrun sets "
                    "TORCHELASTIC_RUN_ID), so a restart can be told from a new run"
                )
            return None
        ident = Identity(
            run_id=run_id,
            world_size=self.world_size,
            rank=self.rank,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            host=host_name(),
            layout=self.layout,
            config_digest=self.digest,
        )
        root = self.config.local_dir or default_local_dir(checkpoint_dir, run_id)
        return LocalTier(root, ident, keep=self.config.local_keep)
