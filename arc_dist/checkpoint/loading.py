"""Loading a durable checkpoint: choose, verify, build the templates DCP loads into, agree.

``Loading`` is the load half of :class:`~arc_dist.checkpoint.manager.CheckpointManager` (a
mixin: it uses the manager's storage, rank, groups and lifecycle). Every rank reaches the same
answer for each checkpoint tried (one ``all_gather_object`` per phase), so ranks never split
between a checkpoint and an older one.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import CheckpointError, ReshardError
from .catalog import CheckpointInfo, scan, verify
from .dcp_io import SafeLoadPlanner, SafeReader
from .errors import CheckpointStorageError, classify
from .lifecycle import resume_order, trusted


def rebuild(key: str, fqns: list[str], loaded: dict, md, current: Any) -> Any:
    """The nested state of a dynamic object from its flat checkpoint values.

    DCP drops empty dicts when it flattens (they have no leaves), so containers that exist in the
    object's current state but not in the checkpoint come back empty rather than missing.
    """
    planner_data = md.planner_data or {}
    root: dict = {}
    for fqn in fqns:
        set_element(root, planner_data.get(fqn, (key, fqn[len(key) + 1 :])), loaded[fqn])
    value = root.get(key, {})
    fill_empty(value, current)
    return value


def fill_empty(value: Any, template: Any) -> None:
    if isinstance(value, dict) and isinstance(template, dict):
        for k, t in template.items():
            if k not in value and isinstance(t, dict):
                value[k] = {}
            if k in value:
                fill_empty(value[k], t)


def load_template(app_state: dict, md) -> tuple[dict, dict[str, list[str]], str | None]:
    """What DCP loads into, the checkpoint keys of each dynamic object, and what does not match.

    Objects with ``state_dict_for_load`` (``TrainState``, ``PerRank``) and plain values have a
    known structure: their current state is the template, compared key by key and shape by
    shape. Other ``Stateful`` objects (the controller's statistics, user objects) hold state
    whose shape is not known in advance; it is rebuilt from the checkpoint's own metadata.
    """
    saved = md.state_dict_metadata
    templates: dict[str, Any] = {}
    dynamic: dict[str, list[str]] = {}
    missing_objects = []
    strict: list[str] = []
    for key, obj in app_state.items():
        prefix = f"{key}."
        if hasattr(obj, "state_dict_for_load"):
            rel = {k[len(prefix) :] for k in saved if k.startswith(prefix)}
            templates[key] = obj.state_dict_for_load(rel)
            strict += [prefix + p for p in getattr(obj, "strict_prefixes", ())]
        elif hasattr(obj, "state_dict"):
            dynamic[key] = [k for k in saved if k == key or k.startswith(prefix)]
            if not dynamic[key]:
                missing_objects.append(key)
        else:
            templates[key] = obj
    flat, _ = flatten_state_dict(templates)
    missing = [k for k in flat if k not in saved]
    mismatched = []
    for k, v in flat.items():
        m = saved.get(k)
        if m is None:
            continue
        if isinstance(v, torch.Tensor):
            if not isinstance(m, TensorStorageMetadata):
                mismatched.append(f"{k}: a tensor here, not a tensor in the checkpoint")
            elif tuple(m.size) != tuple(v.size()):
                mismatched.append(f"{k}: checkpoint {list(m.size)} vs model {list(v.size())}")
        elif isinstance(m, TensorStorageMetadata):
            mismatched.append(f"{k}: a tensor in the checkpoint, not here")
    unexpected = [k for k in saved if k not in flat and any(k.startswith(p) for p in strict)]
    reasons = []
    if missing_objects:
        reasons.append(f"no state for {missing_objects} in the checkpoint")
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatch", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            reasons.append(f"{label}: {shown}")
    load_sd = dict(templates)
    for keys in dynamic.values():
        for k in keys:
            m = saved[k]
            # a top-level key that is the flat FQN itself: DCP's flattening maps it to itself
            load_sd[k] = (
                torch.empty(m.size, dtype=m.properties.dtype)
                if isinstance(m, TensorStorageMetadata)
                else None
            )
    why = "does not match the model: " + "; ".join(reasons) if reasons else None
    return load_sd, dynamic, why


class Loading:
    """The manager's load path (see the module docstring)."""

    def load(self, app_state: dict) -> int | None:
        """Collective: load the newest usable checkpoint into ``app_state``; its step, or None."""
        self._check_open()
        self.wait()
        wire: Any = None
        if self.rank == 0:
            try:
                wire = [i.to_wire() for i in scan(self.storage)]
            except Exception as e:
                wire = f"{type(e).__name__}: {e}"
        wire = self._broadcast(wire, self._io_group)
        if isinstance(wire, str):
            raise CheckpointStorageError(
                f"arc_dist: cannot list checkpoints in {self.storage.display}: {wire}. Fix: check "
                "that the storage is reachable and storage_options are right"
            )
        infos = [CheckpointInfo.from_wire(w) for w in wire]
        committed = [i for i in infos if i.committed]
        if not committed:
            if self.rank == 0:
                partial = len(infos)
                self.log.info(
                    "arc_dist: no checkpoint in %s%s; starting fresh",
                    self.storage.display,
                    f" ({partial} incomplete step directories ignored)" if partial else "",
                )
            return None
        order = resume_order(infos)
        if not trusted(order[0]) and self.rank == 0:
            self.log.warning(
                "arc_dist: no checkpoint in %s was saved under a healthy verdict or confirmed; "
                "loading the newest committed one",
                self.storage.display,
            )
        tried = []
        for info in order:
            t0 = time.perf_counter()
            why = self._try_load(info, app_state)
            if why is None:
                self._after_load(info, infos, time.perf_counter() - t0)
                return info.step
            tried.append(f"step_{info.step} ({info.state}): {why}")
            if self.rank == 0:
                self.log.warning(
                    "arc_dist: checkpoint step_%d in %s is unusable: %s; trying an older one",
                    info.step,
                    self.storage.display,
                    why,
                )
        raise CheckpointError(
            f"arc_dist: no usable checkpoint in {self.storage.display}; tried {len(tried)}:\n  "
            + "\n  ".join(tried)
            + "\nFix: point checkpoint_dir at this model's checkpoints, or move damaged ones away "
            "(`arc-dist verify URL` lists what is wrong with each)"
        )

    def _try_load(self, info: CheckpointInfo, app_state: dict) -> str | None:
        """Every rank: None on success, else why ``info`` is unusable (the same on every rank).

        A checkpoint that is damaged or does not fit is skipped (the caller tries an older one);
        one that any rank could not *read* (``storage_fault``: an outage, expired credentials,
        a node without access) raises ``CheckpointStorageError`` on every rank: nothing says it
        is damaged, and falling back would silently lose the newest progress.
        """
        if info.manifest is None:
            if info.read_error is not None:
                self._unreadable(info, [f"rank 0: {info.read_error}"])
            return info.manifest_error or "manifest missing"
        names = sorted(info.manifest.files)
        why = fault = None
        if self.verify_on_load:
            try:
                why = "; ".join(verify(self.storage, info, names[self.rank :: self.world_size]))
            except Exception as e:  # every rank must still reach the gather below
                why, fault = classify(e, "verification failed")
        why = self._agree_on(info, why or None, fault)
        if why:
            return why

        url = self.storage.to_url(info.path)
        why = fault = None
        try:
            md = SafeReader(url, storage_options=self.storage.options).read_metadata()
            load_sd, dynamic, why = load_template(app_state, md)
        except ReshardError:
            raise  # the job must choose; every rank raises it here (same keys), nothing loaded
        except Exception as e:
            why, fault = classify(e, "DCP metadata unusable")
        why = self._agree_on(info, why, fault)
        if why:
            return why
        if info.manifest.world_size != self.world_size and self.rank == 0:
            self.log.info(
                "arc_dist: resharding step_%d from world size %d to %d",
                info.step,
                info.manifest.world_size,
                self.world_size,
            )
        why = fault = None
        try:
            # tensors load in place into the templates (the model's own parameters where
            # get_state_dict returns them); other values are set into the nested templates
            dcp.load(
                load_sd,
                storage_reader=SafeReader(url, storage_options=self.storage.options),
                planner=SafeLoadPlanner(flatten_sharded_tensors=False),
                **self._dcp_kwargs(),
            )
            for key, obj in app_state.items():
                if key in dynamic:
                    obj.load_state_dict(rebuild(key, dynamic[key], load_sd, md, obj.state_dict()))
                elif hasattr(obj, "load_state_dict"):
                    obj.load_state_dict(load_sd[key])
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            why, fault = classify(e, "loading failed")
        return self._agree_on(info, why, fault)

    def _agree_on(self, info: CheckpointInfo, why: str | None, fault: str | None) -> str | None:
        """Every rank: share each rank's outcome; raise on all when any rank could not read."""
        gathered = self._all_gather((why, fault))
        faults = [f"rank {r}: {f}" for r, (_, f) in enumerate(gathered) if f]
        if faults:
            self._unreadable(info, faults)
        return next((w for w, _ in gathered if w), None)

    def _unreadable(self, info: CheckpointInfo, faults: list[str]) -> None:
        raise CheckpointStorageError(
            f"arc_dist: checkpoint step_{info.step} in {self.storage.display} could not be read "
            f"({'; '.join(faults)}). It was not skipped for an older one: nothing says it is "
            "damaged. Fix: check that every node reaches the storage with valid credentials and "
            "read access; a restart (exit code 10) tries it again"
        )

    def _after_load(
        self, info: CheckpointInfo, infos: list[CheckpointInfo], elapsed: float
    ) -> None:
        self._loaded_step, self.loaded_bytes = info.step, info.nbytes
        with self._lock:
            self._lifecycle.loaded(infos, info.step)
            self._stats["last_committed_step"] = info.step
            if info.confirmed:
                self._stats["last_confirmed_step"] = info.step
        if self.rank == 0:
            newer = [f"step_{i.step}" for i in infos if i.committed and i.step > info.step]
            self.log.info(
                "arc_dist: resumed from step_%d (%s%s, saved at world size %d) in %.2fs%s",
                info.step,
                info.state,
                "" if trusted(info) else f", verdict {info.manifest.verdict.get('status')}",
                info.manifest.world_size if info.manifest else -1,
                elapsed,
                f"; newer {', '.join(newer)} left in place" if newer else "",
            )
