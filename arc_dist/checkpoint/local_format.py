"""What a node-local snapshot is on disk: where the tier lives, names, manifests, encoding.

Pure pieces of the node-local snapshot tier (local_tier.py), kept apart so that the rules can be
read and tested without threads or files:

* ``default_local_dir``: ``/dev/shm/arc-dist-<user>-<key>`` (the temp dir without /dev/shm);
  ``run_id_from_env``: the id every restart of one job shares;
* ``make_manifest``/``check_manifest``: the JSON commit marker of each data file, and why one
  does not fit this process (another run, another world size or topology, another config);
* ``encode_skeleton``/``decode_skeleton``: the snapshot's optimizer skeleton as values that
  ``torch.load(weights_only=True)`` accepts (nothing is unpickled freely; the RNG streams are
  stored as ``arc_dist.rng.encode`` tensors);
* ``HashingFile``/``checksum``: checksums computed while ``torch.save`` writes, checked on load.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import mmap
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..snapshot import TensorRef
from .manifest import is_plain_name, loads_strict, new_hasher

FORMAT = "arc-dist-local-snapshot"
FORMAT_VERSION = 2  # 2: RNG streams as tensors (arc_dist.rng.encode)
SHM = "/dev/shm"


# -- where the tier lives ----------------------------------------------------------------------
def run_id_from_env(env: dict | None = None) -> str | None:
    """The id shared by every restart of one job: the elastic agent's run id, or ``ARC_RUN_ID``."""
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_RUN_ID") or env.get("ARC_RUN_ID") or None


def default_local_dir(checkpoint_dir: str | None, run_id: str | None, shm: str = SHM) -> str:
    """``<shm>/arc-dist-<user>-<key>``, or the same under the temp dir when ``shm`` is unusable.

    The key hashes ``checkpoint_dir`` (else the run id): a later run of the same job finds the
    leftovers of an earlier one on this node, rejects them (another run id) and removes them,
    so a crashed job does not leave its snapshots in memory forever.
    """
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = str(os.getuid())
    key = hashlib.sha256((checkpoint_dir or f"run:{run_id}").encode()).hexdigest()[:12]
    base = (
        shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else tempfile.gettempdir()
    )
    return os.path.join(base, f"arc-dist-{user}-{key}")


# -- manifests ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Identity:
    """What a snapshot must match to be usable by this process."""

    run_id: str
    world_size: int
    rank: int
    local_world_size: int
    host: str
    layout: str
    config_digest: str


def make_manifest(ident: Identity, *, step: int, lineage: str, kind: str, shared: str | None,
                  algorithm: str, file: str, size: int, checksum: str) -> dict:  # fmt: skip
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "step": step,
        "lineage": lineage, "run_id": ident.run_id, "world_size": ident.world_size,
        "rank": ident.rank, "local_world_size": ident.local_world_size, "host": ident.host,
        "layout": ident.layout, "config_digest": ident.config_digest, "shared": shared,
        "checksum_algorithm": algorithm, "file": {"name": file, "size": size, "checksum": checksum},
        "unix_time": time.time(),
    }  # fmt: skip


def check_manifest(m: Any, ident: Identity, step: int, *, kind: str = "rank") -> str | None:
    """Why the manifest ``m`` (parsed JSON) is unusable by this process at ``step``; None if usable.

    A pure function of its arguments. ``kind="shared"`` checks a host's replicated-state manifest,
    which another rank of this host wrote (no rank or topology check: any replica will do).
    """
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return "not an arc-dist local snapshot manifest"
    if m.get("format_version", 0) != FORMAT_VERSION:
        return f"format_version {m.get('format_version')} is not the {FORMAT_VERSION} this arc-dist reads"
    try:
        if m["kind"] != kind or int(m["step"]) != step:
            return f"manifest is a {m['kind']} manifest of step {m['step']}, not {kind} step {step}"
        if m["run_id"] != ident.run_id:
            return f"from another run (run id {m['run_id']!r}, this run {ident.run_id!r})"
        if int(m["world_size"]) != ident.world_size:
            return f"world size changed (saved at {m['world_size']}, now {ident.world_size})"
        if m["layout"] != ident.layout:
            return f"model layout changed (saved {m['layout']}, now {ident.layout})"
        if m["config_digest"] != ident.config_digest:
            return "ArcConfig changed since it was written"
        if kind == "rank":
            if int(m["rank"]) != ident.rank:
                return f"written by rank {m['rank']}, not rank {ident.rank}"
            if m["host"] != ident.host or int(m["local_world_size"]) != ident.local_world_size:
                return (
                    f"topology changed (saved on {m['host']} with {m['local_world_size']} local "
                    f"ranks, now {ident.host} with {ident.local_world_size})"
                )
        f = m["file"]
        if not is_plain_name(f["name"]) or int(f["size"]) < 0 or not isinstance(f["checksum"], str):
            return "manifest garbles its file entry"
        if not isinstance(m["lineage"], str):
            return "manifest garbles its lineage"
        if m["shared"] is not None and not is_plain_name(m["shared"]):
            return "manifest names a shared file outside its directory"
    except (KeyError, TypeError, ValueError) as e:
        return f"manifest misses or garbles a field ({e!r})"
    return None


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return loads_strict(f.read())


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def rm(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# -- payload encoding: weights_only-loadable ---------------------------------------------------
_REF = "__arc_tensor_ref__"


def encode_skeleton(obj: Any) -> Any:
    """The snapshot's optimizer skeleton with ``TensorRef``s as ``{_REF: index}`` dicts."""
    if isinstance(obj, TensorRef):
        return {_REF: obj.index}
    if isinstance(obj, dict):
        return {k: encode_skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(encode_skeleton(v) for v in obj)
    return obj


def decode_skeleton(obj: Any) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and _REF in obj:
            return TensorRef(int(obj[_REF]))
        return {k: decode_skeleton(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode_skeleton(v) for v in obj)
    return obj


class HashingFile:
    """Write-only, sequential: hashes what torch.save writes through it."""

    def __init__(self, raw, algorithm: str) -> None:
        self._raw, self._hasher, self.size = raw, new_hasher(algorithm), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._raw.write(view)
        self._hasher.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def checksum(path: str, algorithm: str) -> tuple[int, str]:
    h = new_hasher(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return size, h.hexdigest()


def host_name() -> str:
    return socket.gethostname()
