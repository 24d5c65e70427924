"""The exception tree for runtime faults and the process exit codes that launchers act on.

Misuse raises ``ValueError``/``TypeError``; faults found while training raise an ``ArcError``.
Each ``ArcError`` carries the exit code a process should end with when it escapes, so the
launcher (and a scheduler above it) can tell "retrying cannot help" from "restart me".
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of worker processes and of ``python -m arc_dist.launch``.

    Schedulers key retry policies on these (see ``k8s/``): RETRY means restart the job
    (possibly elsewhere), UNRECOVERABLE means a restart would fail the same way.
    """

    OK = 0
    #: crash, hang, lost peer or preemption: restarting from the last checkpoint can help.
    RETRY = 10
    #: numeric failure that rollbacks could not fix, or bad configuration: do not retry.
    UNRECOVERABLE = 11
    #: a CUDA/NCCL device error: restart the group, preferably on another node.
    HARDWARE = 12
    #: the node failed its health check (or keeps failing): do not retry on this node.
    BAD_NODE = 13


class ArcError(RuntimeError):
    """Base of arc-dist's runtime faults."""

    exit_code: ExitCode = ExitCode.RETRY


class UnrecoverableError(ArcError):
    """Rollbacks (including to older snapshots) could not restore healthy training.

    Raised on every rank with the same message; retrying the job cannot help.
    """

    exit_code = ExitCode.UNRECOVERABLE


class CheckpointError(ArcError):
    """No usable checkpoint: raised only after every older one was tried; says why each failed."""

    exit_code = ExitCode.UNRECOVERABLE


class ReshardError(ArcError):
    """Per-rank state cannot follow a change of world size without a rule saying how.

    Raised by ``Arc.resume()`` on every rank, before anything is loaded, when an object registered
    with ``per_rank=True`` was saved by another number of ranks and its ``reshard`` choice is
    ``"error"`` (the default). The message names the object and the choices. Retrying at the same
    world size cannot help.
    """

    exit_code = ExitCode.UNRECOVERABLE


class HangError(ArcError):
    """A rank made no progress within ``hang_timeout``."""

    exit_code = ExitCode.RETRY


class HardwareError(ArcError):
    """The device cannot be trusted (a CUDA/NCCL error): restart, preferably elsewhere.

    ``details`` (host, device, kind, blamesHost) go into the worker's error file, where the
    launcher's bad-node rule reads them (see ``arc_dist.health.hardware_error``).
    """

    exit_code = ExitCode.HARDWARE

    def __init__(self, message: str, *, host: str | None = None, device: str | None = None,
                 kind: str | None = None, blames_host: bool = True):  # fmt: skip
        super().__init__(message)
        self.details = {"host": host, "device": device, "kind": kind, "blamesHost": blames_host}
        self.details = {k: v for k, v in self.details.items() if v is not None}


class PeerError(ArcError):
    """Another rank failed inside ``Arc.step`` on its own, so this rank stops too.

    Raised within seconds instead of at the collective timeout (see ``arc_dist/failfast.py``).
    ``rank`` and ``cause`` name the first failure, the one to look at.
    """

    exit_code = ExitCode.RETRY

    def __init__(self, message: str, *, rank: int | None = None, cause: str | None = None):
        super().__init__(message)
        self.rank, self.cause = rank, cause


class BadNodeError(HardwareError):
    """This node failed its preflight health check (``arc_dist.health``): do not retry here."""

    exit_code = ExitCode.BAD_NODE


class Preempted(SystemExit):
    """Raised by ``Arc.step`` on every rank after a SIGTERM (preemption, eviction, scale-down).

    A final checkpoint was written when the state was healthy. It is a ``SystemExit`` with code
    ``ExitCode.RETRY`` so that an unmodified script ends with the exit code that tells the
    launcher and the scheduler to restart the job, and ``finally`` blocks still run.
    """

    exit_code = ExitCode.RETRY

    def __init__(self, message: str):
        super().__init__(int(ExitCode.RETRY))
        self.message = message

    def __str__(self) -> str:
        return self.message
