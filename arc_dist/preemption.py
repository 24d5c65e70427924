"""SIGTERM (preemption, eviction, scale-down) turned into an orderly, agreed exit.

The handler only counts the signal: no I/O, no collectives in a signal handler. The flag travels
in the next step's agreed signal row (``Col.PREEMPT``), so all ranks see that *some* rank was
asked to stop and leave together after a final checkpoint, even when the signal reached one rank
only.

One process-wide handler (``_on_sigterm``) does the counting and then calls the Python handler it
replaced (Lightning's, a user's), so installing arc-dist's takes nothing away; ``SIG_DFL`` and
``SIG_IGN`` are not called (the process would die before its final checkpoint, or the previous
setting ignored the signal anyway). While an ``Arc`` watches, a replaced handler that ends the
process (``sys.exit``, as Ray's driver handler does) is held back: its exit is the one ``Arc``
takes at the next step, after the agreed final checkpoint (:class:`~arc_dist.Preempted`).

Python runs signal handlers in the main thread only, and only the main thread may install them.
``Arc`` built in another thread polls the process-wide handler when the main thread installed it
(``install_process_handler()``, e.g. at the start of a program that trains in a thread), and
otherwise leaves SIGTERM alone with an INFO line. Under Ray Train the training function runs in a
thread of a Ray worker whose main thread sits in Ray's task loop with Ray's own SIGTERM handler
(installed by the worker's main loop, after any setup hook): a SIGTERM raises ``SystemExit`` there
and the worker exits at once, without a final checkpoint. Ray Train then restarts the worker group
(``FailureConfig``) and ``Arc.resume()`` continues from the newest committed healthy checkpoint,
at most ``checkpoint_every`` steps back (docs/ray.md).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("arc_dist")

#: SIGTERMs the process-wide handler has received
_count = 0
#: the handler ``_on_sigterm`` replaced; called after counting when it is a Python callable
_previous: Any = None
#: PreemptionHandlers watching now: while any does, the previous handler may not end the process
_watchers = 0


def _on_sigterm(signum, frame) -> None:
    global _count
    _count += 1
    if callable(_previous):  # SIG_DFL / SIG_IGN / None (a handler not set from Python) are not
        try:
            _previous(signum, frame)
        except (SystemExit, KeyboardInterrupt):
            if not _watchers:
                raise
            # an Arc exits at its next step, after the final checkpoint this exit would lose


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install_process_handler() -> bool:
    """Install the counting, chaining SIGTERM handler (main thread only; idempotent).

    Returns False in another thread. Call it from the main thread when ``Arc`` is built in
    another one (a training thread), so that ``Arc`` there sees SIGTERM.
    """
    global _previous
    if not _main_thread():
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous = current
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


class PreemptionHandler:
    """``requested`` becomes True once SIGTERM arrives after ``install()``."""

    def __init__(self) -> None:
        self._seen: int | None = None  # _count at install; None: not watching
        self._restore: Any = None
        self._installed = False

    def install(self) -> None:
        if _main_thread():
            self._restore = signal.getsignal(signal.SIGTERM)
            install_process_handler()
            self._installed = True
        elif signal.getsignal(signal.SIGTERM) is not _on_sigterm:
            log.info(
                "arc_dist: Arc was built outside the main thread, where SIGTERM cannot be handled; "
                "a SIGTERM does what the process's own handler does (in a Ray Train worker: the "
                "worker exits at once, no final checkpoint; the restarted group resumes from the "
                "newest checkpoint). To checkpoint on SIGTERM, call "
                "arc_dist.preemption.install_process_handler() in the main thread first"
            )
            return
        global _watchers
        if self._seen is None:
            _watchers += 1
        self._seen = _count

    @property
    def requested(self) -> bool:
        return self._seen is not None and _count > self._seen

    def uninstall(self) -> None:
        global _watchers
        if self._seen is not None:
            _watchers -= 1
        self._seen = None
        if self._installed and _main_thread():
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, self._restore or signal.SIG_DFL)
            self._installed = False
