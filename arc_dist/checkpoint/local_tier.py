"""The node-local snapshot tier: the newest healthy snapshots in ``/dev/shm``, for fast restarts.

A worker that crashed on a node that survived (SIGKILL, OOM kill, a hang caught by the
watchdog) is restarted by the elastic agent on the same node. This module keeps the in-memory
snapshots that passed their health checks (snapshot.py) in node-local shared memory as well, so
the restarted group resumes from a state at most ``snapshot_every`` steps old without touching
remote storage; resume.py decides, with every rank, whether to use it or durable storage.

Layout of the tier (``ArcConfig.local_dir``, by default ``/dev/shm/arc-dist-<user>-<key>``)::

    <dir>/step_<N>/rank_<r>.pt      this rank's own state (torch.save, weights_only-loadable)
    <dir>/step_<N>/rank_<r>.json    its manifest: the commit marker, written last
    <dir>/step_<N>/shared_w<w>.pt   replicated (DDP) state, once per host, written by rank w
    <dir>/step_<N>/shared_w<w>.json its manifest

What goes where: under DDP (``layout == "replicated"``) model, optimizer, scheduler and
GradScaler are identical on every rank, so one rank per host (the lowest rank on it) writes them
to ``shared_w<w>.pt`` and every rank writes only its RNG, Arc's own state and registered objects.
Each host's copy is self-sufficient, so the tier works for multi-node jobs as long as every rank
restarts on the host it ran on. Under FSDP2 and for independent modules every rank writes its
whole local state.

Each manifest (local_format.py) records the step, the lineage (which resume and how many rollbacks produced the
state), the run id (``TORCHELASTIC_RUN_ID``), world size, host, local world size, layout, config
digest and the data file's size and checksum (computed while writing). A file without its
manifest is not a snapshot. Nothing is fsynced: the tier exists for processes that die on a
node that lives; a node that dies takes its memory with it, and durable storage covers that.

Threads: the training thread submits a snapshot (references to the snapshot's host buffers plus
small deep copies); one writer thread per process writes it. ``wait()`` before the next snapshot
overwrites those buffers. The tier never raises into training: write failures are logged and
counted, and a full ``/dev/shm`` switches the tier off for the rest of the run.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from .. import rng
from .local_format import (
    HashingFile,
    Identity,
    check_manifest,
    encode_skeleton,
    make_manifest,
    read_json,
    rm,
    write_json_atomic,
)
from .local_format import checksum as file_checksum
from .manifest import default_algorithm, parse_step_dir, step_dir_name

log = logging.getLogger("arc_dist")


@dataclass(slots=True)
class _Job:
    step: int
    lineage: str
    snap: Any  # snapshot.Snapshot: read by the writer, untouched until wait() returns
    own: dict
    static: dict
    files: list[tuple[str, str, str | None]]  # (kind, stem, the shared stem a rank file needs)

    def payload(self, kind: str, whole: bool) -> dict:
        """What a file holds: ``shared`` the replicated state, ``rank`` this rank's own (plus
        the replicated state when ``whole``: no shared file under this layout)."""
        snap = self.snap
        replicated = {
            **self.static,
            "model": snap.model,
            "optim_tensors": snap.optim_tensors,
            "optim_skeleton": encode_skeleton(snap.optim_skeleton),
            "scheduler": snap.scheduler,
            "scaler": snap.scaler,
        }
        if kind == "shared":
            return replicated
        own = {"step": self.step, "rng": rng.encode(snap.rng), "extra": snap.extra, **self.own}
        return {**replicated, **own} if whole else own


class LocalTier:
    """One process's view of the node-local snapshot tier under ``root``.

    Inactive until :meth:`activate` (called by ``Arc.resume()``, which knows the lineage every
    rank agreed on and which rank writes each host's replicated state): a job that never resumes
    would never read the tier, so it never writes it either.
    """

    def __init__(self, root: str, ident: Identity, *, keep: int = 2, checksum: str | None = None):
        self.root, self.ident, self.keep = root, ident, keep
        self.algorithm = checksum or default_algorithm()
        self.enabled = True
        self.active = False
        self.shared_writer: int | None = None  # the rank writing this host's replicated state
        self._token = uuid.uuid4().hex[:12]  # until resume() agrees on one
        self._generation = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = dict(local_snapshots=0, local_snapshot_failures=0, local_write_s=0.0,
                           local_bytes=0, local_last_step=None)  # fmt: skip
        self._warned = False
        try:
            os.makedirs(root, exist_ok=True)
            probe = os.path.join(root, f".probe-{ident.rank}-{uuid.uuid4().hex[:6]}")
            with open(probe, "wb") as f:
                f.write(b"arc-dist")
            os.remove(probe)
        except OSError as e:
            self.enabled = False
            log.warning(
                "[rank %d] arc_dist: local snapshot dir %s is not writable (%s: %s); restarts "
                "resume from durable storage only. Fix: set ArcConfig.local_dir to a writable "
                "node-local path", ident.rank, root, type(e).__name__, e,
            )  # fmt: skip

    # -- paths ---------------------------------------------------------------------------------
    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, step_dir_name(step))

    def _steps(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted((s for s in map(parse_step_dir, names) if s is not None), reverse=True)

    @property
    def lineage(self) -> str:
        return f"{self._token}.{self._generation}"

    @property
    def shared_stem(self) -> str | None:
        """The replicated-state file this rank reads and writes under: ``shared_w<w>``."""
        if self.ident.layout != "replicated" or self.shared_writer is None:
            return None
        return f"shared_w{self.shared_writer}"

    # -- reading (resume) ------------------------------------------------------------------------
    def candidates(self) -> tuple[list[tuple[int, str]], list[str]]:
        """(step, lineage) pairs this rank could load, newest first, from manifests and file
        sizes alone (no data read); and why the other step directories are unusable."""
        if not self.enabled:
            return [], []
        out, notes = [], []
        for step in self._steps():
            d = self.step_dir(step)
            why, lineage = self._check_step(d, step)
            if why is None:
                out.append((step, lineage))
            else:
                notes.append(f"step_{step}: {why}")
        return out, notes

    def _check_step(self, d: str, step: int) -> tuple[str | None, str]:
        stem = f"rank_{self.ident.rank}"
        try:
            m = read_json(os.path.join(d, f"{stem}.json"))
        except FileNotFoundError:
            return f"no {stem}.json (not written, or written by other ranks only)", ""
        except (OSError, ValueError) as e:
            return f"{stem}.json unreadable ({type(e).__name__}: {e})", ""
        why = check_manifest(m, self.ident, step) or self._check_size(d, m)
        if why is not None:
            return why, ""
        shared = m.get("shared")
        if shared is not None:
            try:
                sm = read_json(os.path.join(d, f"{shared}.json"))
            except FileNotFoundError:
                return f"the host's replicated state {shared}.json is missing", ""
            except (OSError, ValueError) as e:
                return f"{shared}.json unreadable ({type(e).__name__}: {e})", ""
            why = check_manifest(sm, self.ident, step, kind="shared") or self._check_size(d, sm)
            if why is None and sm["lineage"] != m["lineage"]:
                why = f"{shared} belongs to lineage {sm['lineage']}, rank file to {m['lineage']}"
            if why is not None:
                return f"{shared}: {why}", ""
        return None, m["lineage"]

    @staticmethod
    def _check_size(d: str, m: dict) -> str | None:
        name, size = m["file"]["name"], int(m["file"]["size"])
        try:
            actual = os.stat(os.path.join(d, name)).st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, its manifest says {size} (truncated?)"
        return None

    def read(self, step: int, lineage: str) -> tuple[dict | None, str | None]:
        """Verify the checksums of this rank's files of ``step`` and load them (memory-mapped).

        Returns (payload, None), or (None, why). Every file is checked before anything loads.
        """
        d = self.step_dir(step)
        try:
            m = read_json(os.path.join(d, f"rank_{self.ident.rank}.json"))
            manifests = [m]
            if m.get("shared"):
                manifests.insert(0, read_json(os.path.join(d, f"{m['shared']}.json")))
            for mf in manifests:
                if mf["lineage"] != lineage:
                    return None, f"{mf['file']['name']} changed since it was listed"
                f = mf["file"]
                size, digest = file_checksum(os.path.join(d, f["name"]), mf["checksum_algorithm"])
                if size != int(f["size"]) or digest != f["checksum"]:
                    return None, (
                        f"{f['name']} fails its {mf['checksum_algorithm']} check ({size} bytes, "
                        f"{digest}; manifest: {f['size']} bytes, {f['checksum']}): the data "
                        "changed after it was written"
                    )
            payload: dict = {}
            for mf in manifests:
                payload.update(
                    torch.load(
                        os.path.join(d, mf["file"]["name"]),
                        map_location="cpu",
                        weights_only=True,
                        mmap=True,
                    )  # fmt: skip
                )
        except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:
            return None, f"unreadable ({type(e).__name__}: {e})"
        except Exception as e:  # noqa: BLE001 - e.g. an UnpicklingError: never crash a resume
            return None, f"unreadable ({type(e).__name__}: {e})"
        return payload, None

    # -- writing ---------------------------------------------------------------------------------
    def activate(self, token: str, shared_writer: int | None) -> None:
        """After resume: the lineage every rank agreed on, and who writes this host's shared state."""
        self.wait()
        self._token, self._generation = token, 0
        self.shared_writer = shared_writer
        self.active = self.enabled
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="arc-local-tier", daemon=True)
            self._thread.start()

    def submit(self, step: int, snap, *, own: dict, static: dict) -> None:
        """Training thread: write ``snap`` (a healthy snapshot at ``step``) in the background.

        ``own``: this rank's small state (Arc's state, registered objects), already deep-copied;
        ``static``: what describes the model and optimizer (keys, shapes, class), for checks.
        The snapshot's host buffers must stay untouched until :meth:`wait` returns.
        """
        if not self.active:
            return
        rank_stem = f"rank_{self.ident.rank}"
        shared = self.shared_stem
        files: list[tuple[str, str, str | None]] = []
        if shared is not None and self.shared_writer == self.ident.rank:
            files.append(("shared", shared, None))
        files.append(("rank", rank_stem, shared))
        # encoding and serialising happen on the writer thread: the step pays nothing more
        self._queue.put(_Job(step, self.lineage, snap, own, static, files))

    def wait(self) -> None:
        """Block until the snapshot being written (if any) is on disk."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self.active:
                    self._write(job)
            except BaseException as e:  # noqa: BLE001 - the thread must survive anything
                log.error(
                    "[rank %d] arc_dist: local snapshot writer: %s",
                    self.ident.rank,
                    e,
                    exc_info=True,
                )
            finally:
                self._queue.task_done()

    def _write(self, job: _Job) -> None:
        t0 = time.perf_counter()
        d = self.step_dir(job.step)
        written: list[str] = []
        nbytes = 0
        try:
            for kind, stem, shared in job.files:
                payload = job.payload(kind, whole=self.shared_stem is None)
                os.makedirs(d, exist_ok=True)
                manifest_path = os.path.join(d, f"{stem}.json")
                rm(manifest_path)  # uncommit an older write of this step before replacing it
                data_path = os.path.join(d, f"{stem}.pt")
                written.append(data_path)
                # a new file, renamed into place: a reader's memory map of the old one (a
                # restored registered object may still hold its tensors) is never truncated
                tmp = f"{data_path}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    with open(tmp, "wb") as raw:
                        out = HashingFile(raw, self.algorithm)
                        torch.save(payload, out)
                    os.replace(tmp, data_path)
                finally:
                    rm(tmp)
                doc = make_manifest(
                    self.ident, step=job.step, lineage=job.lineage, kind=kind, shared=shared,
                    algorithm=self.algorithm, file=f"{stem}.pt", size=out.size,
                    checksum=out.hexdigest(),
                )  # fmt: skip
                write_json_atomic(manifest_path, doc)
                nbytes += out.size
        except OSError as e:
            for p in written:
                rm(p[:-3] + ".json")
                rm(p)
            with self._lock:
                self._stats["local_snapshot_failures"] += 1
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.warning(
                "[rank %d] arc_dist: local snapshot step_%d not written to %s (%s: %s)%s",
                self.ident.rank, job.step, self.root, type(e).__name__, e,
                "; local snapshots are off for the rest of this run. Fix: make /dev/shm larger "
                "(in Kubernetes an emptyDir with medium: Memory and a sizeLimit) or set "
                "ArcConfig.local_snapshots=False" if full else "",
            )  # fmt: skip
            if full:
                self.active = False
            return
        with self._lock:
            self._stats["local_snapshots"] += 1
            self._stats["local_write_s"] = time.perf_counter() - t0
            self._stats["local_bytes"] = nbytes
            self._stats["local_last_step"] = job.step
        log.debug("[rank %d] arc_dist: local snapshot step_%d written (%.1f MB in %.3fs)",
                  self.ident.rank, job.step, nbytes / 1e6, time.perf_counter() - t0)  # fmt: skip
        self._retain()

    def _own_stems(self) -> list[str]:
        stems = [f"rank_{self.ident.rank}"]
        if self.shared_stem is not None and self.shared_writer == self.ident.rank:
            stems.append(self.shared_stem)
        return stems

    def _own_committed(self, step: int) -> bool:
        return os.path.exists(os.path.join(self.step_dir(step), f"rank_{self.ident.rank}.json"))

    def _retain(self) -> None:
        """Keep this rank's ``keep`` newest committed snapshots; delete its older files."""
        kept = 0
        for step in self._steps():
            if kept < self.keep and self._own_committed(step):
                kept += 1
                continue
            if kept >= self.keep:
                self._remove_own(step)

    def _remove_own(self, step: int) -> None:
        """This rank's files of ``step``: manifests first (uncommit), then data; then the empty dir."""
        d = self.step_dir(step)
        for stem in self._own_stems():
            rm(os.path.join(d, f"{stem}.json"))
        for stem in self._own_stems():
            rm(os.path.join(d, f"{stem}.pt"))
        try:
            for name in os.listdir(d):  # temp files of a write that was killed
                if name.endswith(".tmp") and name.split(".pt.")[0] in self._own_stems():
                    rm(os.path.join(d, name))
            os.rmdir(d)
        except OSError:
            pass  # other ranks' files are still there

    def on_rollback(self, restored_step: int) -> None:
        """Every rank, synchronously: snapshots newer than the restored state leave the tier (they
        belong to a trajectory that failed) and later snapshots get a new lineage."""
        if not self.active:
            return
        self.wait()
        self._generation += 1
        for step in self._steps():
            if step > restored_step:
                self._remove_own(step)

    def prune(self, keep_step: int | None, host_leader: bool) -> None:
        """After resume decided: the tier holds only the state resumed from (if local).

        Every rank removes its own other steps; the host's lowest rank also removes whatever else
        lies in the directory (other runs' leftovers, ranks that no longer exist, partial writes).
        """
        if not self.enabled:
            return
        for step in self._steps():
            if step == keep_step:
                continue
            if host_leader:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)
            else:
                self._remove_own(step)
        if host_leader:
            try:
                for name in os.listdir(self.root):
                    if parse_step_dir(name) is None and not name.startswith(".probe-"):
                        path = os.path.join(self.root, name)
                        if os.path.isdir(path):
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            rm(path)
            except FileNotFoundError:
                pass

    def close(self, clean: bool) -> None:
        """Stop the writer; on a clean end of training also remove this rank's files (and the
        directory, once the last rank of the host has removed its own)."""
        self.wait()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.active = False
        if not (clean and self.enabled):
            return
        for step in self._steps():
            self._remove_own(step)
        try:
            os.rmdir(self.root)
        except OSError:
            pass

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)
