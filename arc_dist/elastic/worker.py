"""The worker side of ``python -m arc_dist.launch``: :func:`main_entry` turns how a training
process ends into an exit code and an error file the launcher reads.

Decorate a training script's ``main`` with it. It wraps torch's ``@record`` and turns an
escaping :class:`~arc_dist.errors.ArcError` into an error file that names its exit code, then
``sys.exit(err.exit_code)``. Imports torch only inside :func:`main_entry`.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ArcError, ExitCode
from .exitcodes import error_recorded as _error_file_written
from .exitcodes import mark_started as _mark_started
from .exitcodes import write_error_file as _write_error_file

_F = TypeVar("_F", bound=Callable[..., Any])


def main_entry(fn: _F) -> _F:
    """Decorator for a training script's entry point run under torchrun (or alone).

    Records any escaping exception in ``$TORCHELASTIC_ERROR_FILE`` (torch's ``@record``) and in
    the launcher's ``$ARC_ERROR_DIR`` (:mod:`arc_dist.elastic.exitcodes`); an
    :class:`~arc_dist.errors.ArcError` is recorded with its exit code and the process exits
    with ``err.exit_code`` (11 for ``UnrecoverableError``, 12 for ``HardwareError``, ...), and a
    ``SystemExit`` with one of those codes (the script's own ``sys.exit(12)``,
    :class:`~arc_dist.errors.Preempted`) is recorded too, so the launcher can tell "do not
    retry" from "restart". Other exceptions are recorded and end the process with 11
    (UNRECOVERABLE) when arc-dist's own validation raised them (a ``ValueError``/``TypeError``
    such as a bad ``ArcConfig`` value), else 10 (RETRY). Every record carries the step the
    worker resumed from and the step it reached, for the launcher's no-progress rule.
    A failure ``Arc.step`` already recorded (an error on one rank, recorded as it happened, see
    arc_dist/failfast.py) keeps that record: it is the earliest, the root cause.

    Example::

        from arc_dist.launch import main_entry

        @main_entry
        def main():
            ...

        if __name__ == "__main__":
            main()
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    @functools.wraps(fn)
    def arc_wrapper(*args: Any, **kwargs: Any) -> Any:
        _mark_started()
        try:
            return _run_recorded(fn, args, kwargs)
        except BaseException:
            # the process is about to end; its teardown would walk torch's whole heap with the
            # cycle collector (seconds on a busy host, while a crashed peer's group waits for
            # this survivor to exit before it can restart): skip that walk, nothing else changes
            atexit.register(gc.freeze)
            raise

    return record(arc_wrapper)  # type: ignore[return-value]


def _run_recorded(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``; what escapes it is recorded and becomes the exit code (see
    :func:`main_entry`)."""
    try:
        return _call_classified(fn, args, kwargs)
    except ArcError as err:
        _exit_recorded(err, int(err.exit_code))
    except SystemExit as se:
        # a deliberate exit with one of our codes (sys.exit(12), arc_dist.Preempted, ...):
        # record it, so the launcher's summary says why
        code = se.code if isinstance(se.code, int) else None
        if code in _RECORDED_EXITS and not _error_file_written():
            text = str(se)
            _write_error_file(se if text and text != str(code) else f"SystemExit: {code}", code)
        raise
    except Exception as err:
        # arc-dist's own validation (a bad ArcConfig value, a checkpoint_dir that cannot
        # work) fails the same way on every restart: 11; anything else may be transient: 10
        # (the launcher's no-progress rule stops a bug that repeats before any progress)
        code = ExitCode.UNRECOVERABLE if _usage_error(err) else ExitCode.RETRY
        _exit_recorded(err, int(code))
    except BaseException as err:
        # e.g. torch.distributed.checkpoint's CheckpointException derives from
        # BaseException, which @record does not see
        if not isinstance(err, KeyboardInterrupt):
            _write_error_file(err, 1)
        raise


def _exit_recorded(err: BaseException, code: int) -> None:
    """Record ``err`` in the error file (with this process's progress), say why, and exit. A
    record ``Arc.step`` wrote first (an error on one rank) is the root cause and is kept."""
    if not _error_file_written():
        _write_error_file(err, code)
    rank = os.environ.get("RANK", "0")
    sys.stderr.write(
        f"[arc] rank {rank}: {type(err).__name__}: {err} -> exit {code} ({ExitCode(code).name})\n"
    )
    import traceback

    traceback.print_exception(type(err), err, err.__traceback__)
    sys.stderr.flush()
    if code in (ExitCode.HARDWARE, ExitCode.BAD_NODE):
        # the device cannot be trusted: interpreter teardown (NCCL communicators, the
        # CUDA caching allocator) can hang or crash on it, so skip it
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _usage_error(err: BaseException) -> bool:
    """A ``ValueError``/``TypeError`` that arc-dist's own code raised on purpose (a ``raise``
    statement): its validation of what the script passed (``ArcConfig``, ``Arc``,
    ``checkpoint_dir``, ...), which never goes away on a restart. Raised elsewhere (the script,
    torch), or implicitly by a bug, the same types may be transient or data-dependent."""
    import linecache

    if not isinstance(err, (ValueError, TypeError)) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(_PACKAGE_DIR) and (
        linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise ")
    )


def _call_classified(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)``; a CUDA/NCCL device error escaping it (from the forward or
    backward pass, a collective, a checkpoint load) becomes a logged ``HardwareError`` (12)."""
    try:
        return fn(*args, **kwargs)
    except ArcError:
        raise
    except Exception as err:
        from ..health import hardware_error

        hw = hardware_error(err)
        if hw is None:
            raise
        raise hw from err


_RECORDED_EXITS = {int(c) for c in ExitCode if c != ExitCode.OK}
