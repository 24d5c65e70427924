"""The hang watchdog: a rank that stops making progress dumps its stacks and exits.

A hung rank (a deadlocked data loader, a collective whose peer died without the process group
noticing, a stuck filesystem) blocks the whole job forever; torchrun only restarts a group
when a worker *exits*. :class:`Watchdog` runs a daemon thread that checks a deadline; the
training loop moves the deadline with :meth:`Watchdog.beat` (one stored float per step, no lock,
no syscall beyond ``time.monotonic``). When the deadline passes it logs, dumps every thread's
stack (``faulthandler`` to stderr, formatted frames to the logger and to the torchelastic error
file) and ends the process with ``os._exit(ExitCode.RETRY)`` so the elastic agent restarts the
group from the last checkpoint.

Timeout hierarchy (see docs/elastic.md): process-group collective timeout < ``hang_timeout``
< rendezvous timeouts. A collective stuck on a dead peer should fail first, with its own
error; the watchdog is the backstop for everything else.

If the hung thread holds the GIL (a C extension that never releases it), no Python thread can
run, so the watchdog thread also arms ``faulthandler.dump_traceback_later`` (a C thread that
needs no GIL) a little after its own deadline; if the Python side never gets to act, that
backstop dumps the stacks and exits with status 1, which the launcher also maps to RETRY.
This replaces any ``dump_traceback_later`` timer set elsewhere in the process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator

from .elastic.exitcodes import write_error_file
from .errors import ExitCode, HangError

_log = logging.getLogger(__name__)


class Watchdog:
    """Exit the process when no progress is reported for ``timeout`` seconds.

    ``grace`` is the extra allowance for the first step (process-group warm-up, compilation,
    checkpoint load); :meth:`allow` grants the same kind of allowance around other long
    operations (saves, loads, evaluation). The thread starts at construction; :meth:`stop` ends
    it (also a context manager). Thread-safety: :meth:`beat` may be called from any thread;
    :meth:`allow` regions may nest and overlap.

    ``exit_code`` is what the process exits with (default RETRY); ``backstop`` is how many
    seconds after the deadline the GIL-free faulthandler timer described in the module docstring
    fires (None: not armed).
    """

    def __init__(
        self,
        timeout: float,
        grace: float = 0.0,
        logger: logging.Logger | None = None,
        *,
        exit_code: int = ExitCode.RETRY,
        backstop: float | None = 30.0,
        name: str = "arc-watchdog",
    ):
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"Watchdog timeout={timeout!r} is invalid: use seconds > 0")
        if not (isinstance(grace, (int, float)) and grace >= 0):
            raise ValueError(f"Watchdog grace={grace!r} is invalid: use seconds >= 0")
        self.timeout = float(timeout)
        self.grace = float(grace)
        self.logger = logger or _log
        self.exit_code = int(exit_code)
        if backstop is not None and not backstop > 0:
            raise ValueError(f"Watchdog backstop={backstop!r} is invalid: use seconds > 0 or None")
        self._backstop = backstop
        # ``_last`` is the time progress was last reported; the first step gets ``grace`` by
        # dating it in the future, so beat() stays a single store.
        self._last = time.monotonic() + self.grace
        self._allowances: dict[int, float] = {}  # token -> monotonic time the allowance ends
        self._allow_until = 0.0
        self._next_token = 0
        self._lock = threading.Lock()  # guards the allowances only; beat() never takes it
        self._stopped = threading.Event()
        self._interval = max(0.05, min(1.0, self.timeout / 10))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- called by the training loop ---------------------------------------------------------

    def beat(self) -> None:
        """Report progress (call after every step): the next deadline is ``timeout`` from now."""
        self._last = time.monotonic()

    def extend(self, seconds: float) -> None:
        """Allow ``seconds`` more than ``timeout`` until the next :meth:`beat` (e.g. a slow step)."""
        self._last = max(self._last, time.monotonic() + seconds)

    @contextlib.contextmanager
    def allow(self, seconds: float | None = None) -> Iterator[None]:
        """Allow ``seconds`` (default: ``grace``) plus ``timeout`` for the enclosed operation.

        Leaving the block counts as progress (the operation finished); an allowance still
        pending (the first step's grace, :meth:`extend`) is kept.
        """
        seconds = self.grace if seconds is None else float(seconds)
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._allowances[token] = time.monotonic() + seconds
            self._allow_until = max(self._allowances.values())
        try:
            yield
        finally:
            with self._lock:
                del self._allowances[token]
                self._allow_until = max(self._allowances.values(), default=0.0)
            # progress, without cutting a pending allowance (the first step's grace after a
            # load in resume(), or an extend())
            self._last = max(self._last, time.monotonic())

    def stop(self) -> None:
        """Stop watching (idempotent); disarms the faulthandler backstop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._backstop is not None:
            faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def seconds_left(self) -> float:
        """Seconds until the watchdog fires (negative: overdue)."""
        return max(self._last, self._allow_until) + self.timeout - time.monotonic()

    # -- the watching thread -----------------------------------------------------------------

    def _run(self) -> None:
        armed_until = 0.0  # monotonic time the backstop would fire
        while not self._stopped.wait(self._interval):
            left = self.seconds_left
            if left < 0:
                self._fire(-left)
                return
            now = time.monotonic()
            # Re-armed only when the deadline has moved well past it (about every backstop / 2
            # seconds while steps keep coming): arming starts a C thread.
            margin = self._backstop
            if margin is not None and armed_until < now + left + margin / 2:
                faulthandler.dump_traceback_later(
                    left + margin, repeat=False, file=sys.stderr, exit=True
                )
                armed_until = now + left + margin

    def _fire(self, overdue: float) -> None:
        waited = self.timeout + overdue
        rank = os.environ.get("RANK", "?")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        err = HangError(
            f"rank {rank} (pid {os.getpid()}, restart {restart}) made no progress for "
            f"{waited:.1f} s (hang_timeout={self.timeout:g} s, grace={self.grace:g} s); "
            f"exiting with {self.exit_code} so the elastic agent restarts the group. If this "
            f"step or operation is legitimately slow, raise ArcConfig.hang_timeout/hang_grace."
        )
        stacks = _format_all_stacks()
        # Lock-free steps first: the hung thread may hold a logging handler's lock (e.g. stuck
        # writing to a full pipe). If a later step blocks anyway, the backstop timer still ends
        # the process.
        write_error_file(err, self.exit_code, stack=stacks)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"arc-dist watchdog: {err}\n")
            sys.stderr.flush()
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with contextlib.suppress(Exception):
            self.logger.error("%s\n%s", err, stacks)
            for h in logging.getLogger().handlers + self.logger.handlers:
                h.flush()
        os._exit(self.exit_code)


def _format_all_stacks() -> str:
    """Every thread's Python stack, most recent call last, with thread names."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n")
        parts.extend(traceback.format_stack(frame))
    return "".join(parts)
