"""What is in a checkpoint root, and whether a checkpoint is intact.

``scan`` lists ``<root>/step_<N>/`` directories in one listing and reads the manifests: a directory
with a parseable manifest is *committed*, one with the confirmation sidecar too is *confirmed*,
one without a manifest is *partial* (a save that crashed, failed or was uncommitted) and is not a
checkpoint. ``verify`` re-reads files and compares sizes and checksums with the manifest. Used by
the manager (save bookkeeping, load with fallback), retention and the ``arc-dist`` command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest import (
    CONFIRMED_NAME,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    parse_step_dir,
)
from .storage import Storage, storage_fault


@dataclass(slots=True)
class CheckpointInfo:
    step: int
    path: str
    #: file name -> size, from the listing
    files: dict[str, int] = field(default_factory=dict)
    manifest: Manifest | None = None
    #: why the manifest could not be used (it exists but is garbled)
    manifest_error: str | None = None
    #: the storage error that kept the manifest from being read (the checkpoint may be intact)
    read_error: str | None = None

    @property
    def committed(self) -> bool:
        return MANIFEST_NAME in self.files

    @property
    def confirmed(self) -> bool:
        return self.committed and CONFIRMED_NAME in self.files

    @property
    def state(self) -> str:
        if not self.committed:
            return "partial"
        return "confirmed" if self.confirmed else "committed"

    @property
    def nbytes(self) -> int:
        return sum(self.files.values())

    def to_wire(self) -> dict:
        """A picklable plain-dict form, for broadcasting rank 0's scan to the other ranks."""
        return {
            "step": self.step,
            "path": self.path,
            "files": dict(self.files),
            "manifest": self.manifest.to_json() if self.manifest is not None else None,
            "manifest_error": self.manifest_error,
            "read_error": self.read_error,
        }

    @classmethod
    def from_wire(cls, d: dict) -> CheckpointInfo:
        m = Manifest.from_json(d["manifest"]) if d["manifest"] is not None else None
        return cls(d["step"], d["path"], d["files"], m, d["manifest_error"], d["read_error"])


def scan(storage: Storage, *, read_manifests: bool = True) -> list[CheckpointInfo]:
    """Every ``step_<N>`` directory under the root, oldest first."""
    infos = []
    for name, files in storage.list_tree().items():
        step = parse_step_dir(name)
        if step is None:
            continue
        info = CheckpointInfo(step, storage.join(name), files)
        if read_manifests and info.committed:
            read_manifest(storage, info)
        infos.append(info)
    infos.sort(key=lambda i: i.step)
    return infos


def read_manifest(storage: Storage, info: CheckpointInfo) -> None:
    try:
        m = Manifest.from_json(storage.read_bytes(f"{info.path}/{MANIFEST_NAME}"))
    except ManifestError as e:
        info.manifest_error = str(e)
        return
    except FileNotFoundError:
        info.files.pop(MANIFEST_NAME, None)  # removed since the listing: no longer committed
        return
    except Exception as e:
        if not storage_fault(e):
            raise
        info.read_error = f"manifest unreadable ({type(e).__name__}: {e})"
        return
    if m.step != info.step:
        info.manifest_error = f"manifest says step {m.step} but the directory is step_{info.step}"
        return
    info.manifest = m


def verify(storage: Storage, info: CheckpointInfo, names: list[str] | None = None) -> list[str]:
    """Problems with ``names`` (default: every file in the manifest); empty when intact.

    A storage fault (``storage.storage_fault``: an outage, access denied) is raised, not
    reported: it says nothing about the checkpoint.
    """
    if not info.committed:
        return ["no manifest (an incomplete save)"]
    if info.manifest is None:
        return [info.manifest_error or info.read_error or "manifest missing"]
    m = info.manifest
    problems = []
    for name in sorted(m.files) if names is None else names:
        want = m.files[name]
        path = f"{info.path}/{name}"
        try:
            size, digest = storage.checksum(path, m.checksum_algorithm)
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        except IsADirectoryError:
            problems.append(f"{name} is a directory, not a file")
            continue
        except ValueError as e:  # a checksum this installation cannot compute
            problems.append(str(e))
            break
        if size != want.size:
            problems.append(f"{name} has {size} bytes, the manifest says {want.size} (truncated?)")
        elif digest != want.checksum:
            problems.append(
                f"{name} fails its {m.checksum_algorithm} check ({digest} != {want.checksum}): "
                "the data changed after it was written"
            )
    return problems
