"""SIGTERM (preemption, eviction, scale-down) turned into an orderly, agreed exit.

The handler only sets a flag: no I/O, no collectives in a signal handler. The flag travels in
the next step's agreed signal row (``Col.PREEMPT``), so all ranks see that *some* rank was asked
to stop and leave together after a final checkpoint, even when the signal reached one rank only.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("arc_dist")


class PreemptionHandler:
    """Installs a SIGTERM handler in the main thread; ``requested`` becomes True on SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info(
                "arc_dist: not in the main thread; SIGTERM is not handled (no final checkpoint)"
            )
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def uninstall(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False
