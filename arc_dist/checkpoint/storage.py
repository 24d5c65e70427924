"""fsspec URL handling: one ``Storage`` per checkpoint root URL.

Paths stay ``str`` URLs end to end (a ``pathlib.Path`` would collapse ``s3://`` to ``s3:/``) and
fsspec is the only I/O layer, so any fsspec URL works: a local path, ``file://``, ``memory://``
(world size 1 only: it is per process), ``s3://``, ``gs://``, ... ``storage_options`` go to
``fsspec.url_to_fs`` unchanged (e.g. ``endpoint_url``, ``key``, ``secret`` for s3fs); they are
never logged or written anywhere. Every log line and error names :func:`redact` of the URL.

Small files (manifest, sidecars) are written atomically: temp file + fsync + rename on local disks,
a single PUT on object stores (where rename is a copy, and one object appears whole or not at all).
"""

from __future__ import annotations

import os
import re
import uuid
from urllib.parse import urlsplit, urlunsplit

from .manifest import new_hasher

_CHUNK = 8 << 20
#: fsspec protocols without directories, where a missing root means a missing bucket
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def redact(url: str) -> str:
    """``s3://key:secret@bucket/x`` -> ``s3://***@bucket/x``: credentials never reach a log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return url


class Storage:
    """A checkpoint root: ``<url>/step_<N>/...``."""

    def __init__(self, url: str, storage_options: dict | None = None):
        if not isinstance(url, str) or not url:
            raise TypeError(
                f"checkpoint_dir must be a non-empty str URL or path, got {type(url).__name__}; "
                "pass str(path) for a pathlib.Path"
            )
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/") or url
        self.options = dict(storage_options or {})
        try:
            self.fs, root = url_to_fs(self.url, **self.options)
        except (ValueError, ImportError, TypeError) as e:
            raise ValueError(
                f"checkpoint_dir={redact(self.url)!r} cannot be opened with fsspec: {e}. "
                "Install the filesystem's package (e.g. s3fs for s3://, gcsfs for gs://) and "
                "check storage_options"
            ) from None
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.protocol = (
            self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        )

    def __repr__(self) -> str:
        return f"Storage({redact(self.url)!r})"

    @property
    def display(self) -> str:
        return redact(self.url)

    # -- paths -----------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def step_path(self, step: int) -> str:
        return self.join(f"step_{step}")

    def to_url(self, path: str) -> str:
        """A full URL for ``path`` (what DCP's fsspec writer/reader expect)."""
        return self.fs.unstrip_protocol(path)

    # -- listing ---------------------------------------------------------------------------
    def list_tree(self) -> dict[str, dict[str, int]]:
        """``{step_dir_name: {file_name: size}}`` for every directory under the root, fresh.

        One recursive listing (one LIST call series on object stores) instead of a HEAD per file;
        fsspec's listing cache is dropped first because other ranks and processes write here.
        """
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, maxdepth=2, withdirs=True, detail=True)
        except FileNotFoundError:
            return {}
        tree: dict[str, dict[str, int]] = {}
        prefix = self.root + "/"
        for path, info in found.items():
            path = path.rstrip("/")
            if not path.startswith(prefix):
                # some filesystems return paths without the leading "/" the root has
                alt = "/" + path
                if not alt.startswith(prefix):
                    continue
                path = alt
            rel = path[len(prefix) :].split("/")
            if len(rel) == 1:
                if info.get("type") == "directory":
                    tree.setdefault(rel[0], {})
            elif len(rel) == 2 and info.get("type") != "directory":
                tree.setdefault(rel[0], {})[rel[1]] = int(info.get("size") or 0)
        return tree

    # -- small files -----------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        if self.is_local:
            directory = os.path.dirname(path)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself must survive a power loss
            finally:
                os.close(fd)
        else:
            self.fs.pipe_file(path, data)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def rm_file(self, path: str) -> None:
        """Remove one file; a file that is already gone is fine."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def rm_tree(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        if self.is_local and os.path.isdir(path):  # fsspec leaves empty dirs on some versions
            os.rmdir(path)

    def probe_writable(self) -> None:
        """Create the root and write/remove a probe file; raises the filesystem's error.

        On object stores nothing is created first: there are no directories, and creating the
        root would create a bucket that does not exist (a misspelt name) instead of failing.
        """
        if self.protocol not in _OBJECT_STORES:
            self.makedirs(self.root)
        probe = self.join(f".arc_probe_{uuid.uuid4().hex[:8]}")
        self.fs.pipe_file(probe, b"arc-dist write probe")
        self.rm_file(probe)

    # -- checksums -------------------------------------------------------------------------
    def checksum(self, path: str, algorithm: str) -> tuple[int, str]:
        """(size, checksum) of a file, streamed in 8 MB chunks."""
        h = new_hasher(algorithm)
        size = 0
        with self.fs.open(path, "rb", block_size=_CHUNK) as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                h.update(chunk)
        return size, h.hexdigest()


#: packages whose exceptions are storage or network faults (object store clients, HTTP stacks)
_IO_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "adlfs", "azure", "google", "aiohttp",
     "urllib3", "requests", "http", "ssl", "socket", "fsspec"}
)  # fmt: skip


def storage_fault(e: BaseException) -> bool:
    """True when ``e`` is the storage failing to answer (an outage, a timeout, expired
    credentials, access denied on one node), not a file that is missing or damaged.

    Reading a checkpoint that fails this way says nothing about the checkpoint: it must not be
    thrown away for an older one, and a restart may succeed. ``FileNotFoundError`` is not one
    (the file is gone: that is damage); other ``OSError``s and the exceptions of object-store
    clients and HTTP stacks (botocore's are not ``OSError``s) are. A path that is a directory
    where a file should be (or the reverse) is damage too.
    """
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, OSError):
        return True
    return any(c.__module__.split(".")[0] in _IO_PACKAGES for c in type(e).__mro__[:-2])


_SAFE_KEY = re.compile(r"(secret|token|password|key|credential)", re.IGNORECASE)


def describe_options(options: dict) -> str:
    """Storage options for a log line: names only for anything that may be a credential."""
    parts = []
    for k, v in sorted(options.items()):
        parts.append(
            f"{k}=***" if _SAFE_KEY.search(str(k)) or isinstance(v, dict) else f"{k}={v!r}"
        )
    return ", ".join(parts)
