"""Adapters around DCP's fsspec storage: checksums while writing, safe reading.

* ``HashingWriter``: DCP's ``FsspecWriter`` whose streams hash every byte as it is written, so the
  manifest's checksums cost no second read of the data (and torch's own zip CRC32, never checked
  on load, is not computed). Each rank records its own files; the manager gathers the records
  after the save.
* ``SafeReader``: DCP's ``FsspecReader`` that unpickles ``.metadata`` with an allow-list of DCP's
  metadata classes instead of plain ``pickle.load``.
* ``SafeLoadPlanner``: DCP's default load planner, but non-tensor values are read back with
  ``torch.load(weights_only=True)`` (DCP's default uses ``weights_only=False``).

``FsspecWriter``/``FsspecReader`` live in DCP's private ``_fsspec_filesystem`` module; this module
is the only place that imports it, so a rename in a future torch touches one file.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .manifest import FileEntry, new_hasher

#: ``hook(point, detail)`` called at named points of a save; tests use it to kill a rank mid-save
FaultHook = Callable[[str, Any], None]


class _HashingStream:
    """A write-only view of an fsspec file that hashes what passes through it."""

    def __init__(self, raw, hasher, on_write: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._hasher = hasher
        self._on_write = on_write
        self.size = 0
        #: the storage error of a failed write; torch.save's C++ writer reports any failure as
        #: "unexpected pos", so the real cause (ENOSPC, EFBIG, a lost connection) is kept here
        self.error: BaseException | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                # a short write (e.g. at a file size limit) must surface as the OS error of the
                # next write, not as a silently shorter file
                n = self._raw.write(view[done:])
                n = len(view) - done if n is None else n
                if n <= 0:
                    raise OSError(f"short write to a checkpoint file ({done} of {len(view)} bytes)")
                done += n
            self._hasher.update(view)
            self.size += done
            if self._on_write is not None:
                self._on_write(self.size)
        except Exception as e:
            self.error = e
            raise
        return done

    def seek(self, *args):
        # hashing assumes sequential writes; fail loudly rather than record a wrong checksum
        raise io.UnsupportedOperation("arc-dist checkpoint streams are write-once, sequential")

    def seekable(self) -> bool:
        return False

    def fileno(self) -> int:
        # DCP fsyncs through fileno() before it closes the file: flush Python's buffer first, or
        # the file's last block would reach the disk only after the fsync
        self._raw.flush()
        return self._raw.fileno()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str):  # tell, flush, fileno, close, ...
        return getattr(self._raw, name)


@contextmanager
def _no_zip_crc():
    """DCP writes each tensor with ``torch.save``, whose zip writer computes a CRC32 of every
    byte that ``torch.load`` never checks; the manifest's checksum covers them already. The
    setting is per thread (torch's config), so this thread's other ``torch.save`` calls keep it."""
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(saved)


class _HashingFileSystem(FileSystem):
    def __init__(self, fs, algorithm: str, fault_hook: FaultHook | None) -> None:
        super().__init__()
        self.fs = fs
        self.algorithm = algorithm
        self.fault_hook = fault_hook
        self.records: dict[str, FileEntry] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        if not any(c in mode for c in "wa+"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = os.path.basename(os.fspath(path))
        hook = self.fault_hook
        on_write = (lambda n: hook("write", (name, n))) if hook is not None else None
        with super().create_stream(path, mode) as raw, _no_zip_crc():
            stream = _HashingStream(raw, new_hasher(self.algorithm), on_write)
            try:
                yield stream
            except BaseException as e:
                if stream.error is not None and stream.error is not e:
                    raise stream.error from e
                raise
        # only reached when the body and the close (an upload, on object stores) succeeded
        with self._lock:
            self.records[name] = FileEntry(stream.size, stream._hasher.hexdigest())

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        old, new = os.path.basename(os.fspath(path)), os.path.basename(os.fspath(new_path))
        with self._lock:
            if old in self.records:
                self.records[new] = self.records.pop(old)

    def rm_file(self, path) -> None:
        super().rm_file(path)
        with self._lock:
            self.records.pop(os.path.basename(os.fspath(path)), None)


class HashingWriter(FsspecWriter):
    """``FsspecWriter`` that records ``{file name: FileEntry}`` of the files this rank wrote."""

    def __init__(
        self,
        url: str,
        *,
        algorithm: str,
        storage_options: dict,
        sync_files: bool,
        thread_count: int = 1,
        fault_hook: FaultHook | None = None,
    ) -> None:
        super().__init__(url, sync_files=sync_files, thread_count=thread_count, **storage_options)
        self.fs = _HashingFileSystem(self.fs.fs, algorithm, fault_hook)

    #: an error to raise at set-up: fails this save on every rank through DCP's first collective
    poison: BaseException | None = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.poison is not None:
            raise self.poison
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    @property
    def records(self) -> dict[str, FileEntry]:
        return dict(self.fs.records)


#: the only globals a DCP ``.metadata`` pickle may name: DCP's metadata classes (torch 2.4-2.13),
#: the containers and the torch values their fields hold. Exact (module, name) pairs: a module
#: prefix would let a protocol-4 dotted name (``"os.system"`` looked up *in* an allowed module)
#: reach any attribute reachable from it.
_METADATA_GLOBALS = frozenset(
    {
        *(
            ("torch.distributed.checkpoint.metadata", n)
            for n in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
        ("torch", "Size"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id of a local save; no I/O to build
        ("pathlib", "PurePosixPath"),
        *(
            ("builtins", n)
            for n in "dict list tuple set frozenset int float str bytes bool".split()
        ),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``Metadata`` and nothing else (no arbitrary callables).

    Allowed: the exact pairs in ``_METADATA_GLOBALS`` and torch's dtype/layout/memory-format
    values (``torch.float32``: plain objects, nothing callable). Any dotted name is refused.
    """

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in _METADATA_GLOBALS:
                return super().find_class(module, name)
            if module == "torch":
                obj = getattr(torch, name, None)
                if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    return obj
        raise pickle.UnpicklingError(
            f"DCP .metadata references {module}.{name}, which is not DCP metadata"
        )


class SafeReader(FsspecReader):
    def __init__(self, url: str, *, storage_options: dict) -> None:
        super().__init__(url, **storage_options)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(
                f".metadata holds a {type(metadata).__name__}, not DCP Metadata"
            )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that never unpickles arbitrary objects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
