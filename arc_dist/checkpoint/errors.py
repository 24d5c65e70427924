"""Checkpoint storage errors and how a failure is classified: retry, give up, or skip.

A storage fault (an outage, expired credentials) is never mistaken for a damaged checkpoint:
``classify`` tells the two apart, so a load raises instead of silently falling back to an older
checkpoint, and a save retries only what waiting can fix.
"""

from __future__ import annotations

import errno

from ..errors import ArcError, ExitCode
from .storage import storage_fault


class CheckpointStorageError(ArcError):
    """Checkpoint storage could not be written, listed or read; older checkpoints are untouched.

    Restarting can help (an outage ends, space is freed), so the exit code is ``RETRY``;
    except for a ``checkpoint_dir`` that cannot work as configured (permission denied, a file
    where the directory should be, a bucket that does not exist), which is ``UNRECOVERABLE``.
    """

    exit_code = ExitCode.RETRY

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CommitFailed(Exception):
    """Rank 0 could not write the manifest; every rank raises it, with rank 0's error kind."""

    def __init__(self, detail: str, kind: str | None) -> None:
        super().__init__(detail)
        self.kind = kind


def error_kind(e: BaseException) -> str | None:
    """What class of storage fault ``e`` is, for the retry decision and the fix hint."""
    if isinstance(e, CommitFailed):
        return e.kind
    if isinstance(e, PermissionError):
        return "permission"
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "nospace"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return "toolarge"
    return None


def flatten_failures(e: BaseException) -> list[BaseException]:
    """The underlying exceptions, also those DCP wrapped per rank in a ``CheckpointException``."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        out = []
        for v in failures.values():
            out.append(
                v[0] if isinstance(v, tuple) and v and isinstance(v[0], BaseException) else v
            )
        return out
    return [e]


def describe(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        parts = []
        for rank, v in sorted(failures.items()):
            exc = v[0] if isinstance(v, tuple) else v
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    if isinstance(e, CommitFailed):
        return str(e)
    return f"{type(e).__name__}: {e}"


def fix_hint(e: BaseException) -> str:
    kinds = {error_kind(x) for x in flatten_failures(e)}
    if "permission" in kinds:
        return "make checkpoint_dir writable by this user (or pass another checkpoint_dir)"
    if "nospace" in kinds:
        return "free space on the checkpoint file system or lower keep_checkpoints"
    if "toolarge" in kinds:
        return "raise the file size limit (ulimit -f) or use a file system that allows larger files"
    return "check that the checkpoint storage is reachable and storage_options are right"


def config_fault(e: BaseException) -> str | None:
    """The fix, when a ``checkpoint_dir`` that failed its start-up probe cannot work as
    configured (a restart would fail the same way); None for faults that may pass."""
    if isinstance(e, PermissionError):
        return "make checkpoint_dir writable by this user (or pass another checkpoint_dir)"
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return "checkpoint_dir (or a folder above it) is a file: pass a directory path"
    if isinstance(e, FileNotFoundError):
        return "create the bucket (arc-dist never creates one) or fix the URL's bucket name"
    return None


def retriable(e: BaseException) -> bool:
    # a permission problem does not go away by waiting; everything else may (outage, full disk
    # that retention or an operator frees)
    return "permission" not in {error_kind(x) for x in flatten_failures(e)}


def classify(e: BaseException, what: str) -> tuple[str | None, str | None]:
    """(why the checkpoint is unusable, None) or (None, the storage fault that hid it)."""
    if any(storage_fault(x) for x in flatten_failures(e)):
        return None, describe(e)
    return f"{what}: {describe(e)}", None
