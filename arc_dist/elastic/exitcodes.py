"""Why a worker ended, written down by the worker and read back by the launcher.

A worker that ends on purpose (``UnrecoverableError``, a hang caught by the watchdog, a device
error, a failed preflight check) writes an error record (the JSON format of torch's
``torch.distributed.elastic.multiprocessing.errors.record``) with one extra ``"arc"`` object
carrying the exit code it chose, its host and rank. torchrun itself exits 1 whatever its workers
did, so ``python -m arc_dist.launch`` reads these records and :func:`decide` turns them into one
:class:`~arc_dist.errors.ExitCode`.

Where the records go is a contract this module owns, not torchrun's log layout: the launcher
sets ``$ARC_ERROR_DIR`` (inherited by every worker), and each worker writes
``<attempt>-<rank>-<pid>.json`` there atomically (attempt from ``TORCHELASTIC_RESTART_COUNT``),
after an empty ``<attempt>-<rank>-<pid>.started`` when ``main_entry`` starts (so an attempt
killed without a record still counts as the newest). The same record also goes to
``$TORCHELASTIC_ERROR_FILE``, where torchrun's own summary looks for it.

This module owns the file format and that decision. It imports neither torch nor anything that
does, so the watchdog can call :func:`write_error_file` from a dying process and the launcher
stays fast to start; :func:`decide` is a pure function, tested without processes.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import traceback
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import ExitCode

#: exception class names that mean "retrying cannot help", for error files written by plain
#: ``@record`` (without the ``"arc"`` object): the class name is all torch keeps.
_NAME_CODES = {
    "UnrecoverableError": ExitCode.UNRECOVERABLE,
    "CheckpointError": ExitCode.UNRECOVERABLE,
    "HardwareError": ExitCode.HARDWARE,
    "BadNodeError": ExitCode.BAD_NODE,
}

#: codes that end the job at once: torchrun's own restart would fail the same way.
STOP_CODES = frozenset({ExitCode.UNRECOVERABLE, ExitCode.BAD_NODE})

#: the folder the launcher reads worker records from (set by the launcher, see above)
ERROR_DIR_ENV = "ARC_ERROR_DIR"
_RECORD_RE = re.compile(r"^(\d+)-(\d+|x)-(\d+)\.(json|started)$")

#: (the trainer whose ``global_step`` error files report, the step it resumed from)
_progress: tuple[weakref.ref, int] | None = None


def track_progress(trainer: object, resumed_from: int) -> None:
    """Error files written by this process from now on report ``trainer.global_step`` and
    ``resumed_from`` (``Arc`` calls it when built and when it resumes): the launcher's
    no-progress rule tells an attempt that failed before passing its resume step from one
    that trained on and failed later."""
    global _progress
    _progress = (weakref.ref(trainer), int(resumed_from))


def _current_progress() -> dict | None:
    trainer = _progress[0]() if _progress is not None else None
    if trainer is None:
        return None  # no trainer in this process (yet): it failed before it could resume
    try:
        return {"resumedFrom": _progress[1], "step": int(trainer.global_step)}
    except Exception:  # noqa: BLE001 - this runs on the way out of a failing process
        return None


def write_error_file(
    error: BaseException | str,
    exit_code: int,
    *,
    path: str | None = None,
    stack: str | None = None,
) -> str | None:
    """Record why this process is about to exit with ``exit_code``; returns the path written.

    ``path`` given: written there only. Otherwise to ``$TORCHELASTIC_ERROR_FILE`` (set by torchrun
    for each worker) and into ``$ARC_ERROR_DIR`` (set by the launcher); the first of those is
    returned, None when neither is set. ``error`` is the exception (its traceback is
    recorded when it is the one being handled) or a message; ``stack`` overrides the recorded
    stack text (the watchdog passes every thread's stack). An exception's ``details`` dict
    (``HardwareError``: device, kind, blamesHost) is added to the ``"arc"`` object. Never
    raises: this runs on the way out of a failing process.
    """
    torch_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    paths = [path] if path else [p for p in (torch_file, _own_record(".json")) if p]
    if not paths:
        return None
    if isinstance(error, BaseException):
        message = f"{type(error).__name__}: {error}"
        error_type = type(error).__name__
        if stack is None:
            stack = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    else:
        message, error_type = str(error), None
    now = time.time()
    details = getattr(error, "details", None)
    details = details if isinstance(details, dict) else {}
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": stack or "", "timestamp": str(int(now))},
            "arc": {
                **details,
                "exitCode": int(exit_code),
                "errorType": error_type,
                "host": socket.gethostname(),
                "rank": _int_env("RANK"),
                "localRank": _int_env("LOCAL_RANK"),
                "restartCount": _int_env("TORCHELASTIC_RESTART_COUNT"),
                "pid": os.getpid(),
                "time": now,
                "progress": _current_progress(),
            },
        }
    }
    written = [p for p in paths if _write_atomic(p, json.dumps(data))]
    return written[0] if written else None


def _write_atomic(path: str, text: str) -> bool:
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fp:
            fp.write(text)
        os.replace(tmp, path)  # a reader polling the folder never sees half a file
    except OSError:
        return False
    return True


def _own_record(suffix: str) -> str | None:
    """This process's file in ``$ARC_ERROR_DIR`` (None when the launcher did not set it)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return None
    attempt, rank = _int_env("TORCHELASTIC_RESTART_COUNT"), _int_env("RANK")
    name = f"{attempt or 0}-{'x' if rank is None else rank}-{os.getpid()}{suffix}"
    return os.path.join(folder, name)


def mark_started() -> None:
    """Say in ``$ARC_ERROR_DIR`` that this worker's attempt started: an attempt whose workers
    were all killed (SIGKILL, the OOM killer) leaves no record but is still the newest."""
    path = _own_record(".started")
    if path:
        _write_atomic(path, "")


def error_recorded() -> bool:
    """Whether this process already wrote its error record (the first one is the root cause)."""
    return any(
        p and os.path.isfile(p)
        for p in (os.environ.get("TORCHELASTIC_ERROR_FILE"), _own_record(".json"))
    )


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """One worker's error file, classified."""

    attempt: int
    local_rank: int
    exit_code: ExitCode
    message: str
    #: seconds since the epoch (sub-second when arc wrote the file)
    time: float
    host: str | None
    rank: int | None
    path: str
    #: the device named by a device error (``HardwareError``), if any
    device: str | None = None
    #: False for device errors that may be a peer's or the program's fault (NCCL timeouts,
    #: device-side asserts, illegal addresses): they count towards the bad-node rule only when
    #: other hosts ran the same attempt without them
    blames_host: bool = True
    #: the exception's class name, when arc-dist wrote the file
    error_type: str | None = None
    #: whether the worker passed the step it resumed from before failing; None: not known
    #: (a file without arc-dist's progress record)
    made_progress: bool | None = None

    @property
    def signature(self) -> str:
        """The error with its numbers blanked: the same bug on another attempt, rank or port."""
        return re.sub(r"\d+", "N", f"{self.error_type}: {self.message}")

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else f"local rank {self.local_rank}"
        where = f" on {self.host}" if self.host else ""
        return (
            f"{who}{where}, attempt {self.attempt}: {self.message} "
            f"-> exit {int(self.exit_code)} ({self.exit_code.name})"
        )


def classify_error_data(data: dict) -> ExitCode:
    """The exit code an error file's contents stand for (see the module docstring)."""
    msg = data.get("message")
    if isinstance(msg, dict):
        arc = msg.get("arc")
        if isinstance(arc, dict):
            try:
                return ExitCode(int(arc.get("exitCode")))
            except (TypeError, ValueError):
                pass
        text = msg.get("message")
        if isinstance(text, str):
            name = text.split(":", 1)[0].strip().rsplit(".", 1)[-1]
            if name in _NAME_CODES:
                return _NAME_CODES[name]
        # torchrun's agent copies the root cause's file and adds the worker's exit status
        try:
            return ExitCode(int(msg.get("errorCode")))
        except (TypeError, ValueError):
            pass
    return ExitCode.RETRY


def read_error_file(path: str, attempt: int = -1, local_rank: int = -1) -> WorkerFailure | None:
    """Parse one error file; None when it is missing or not JSON (e.g. still being written)."""
    try:
        with open(path) as fp:
            data = json.load(fp)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    msg = data.get("message")
    arc: dict = {}
    text, stamp = str(msg), 0.0
    if isinstance(msg, dict):
        arc = msg.get("arc") if isinstance(msg.get("arc"), dict) else {}
        text = str(msg.get("message", ""))
        try:
            stamp = float(msg.get("extraInfo", {}).get("timestamp", 0))
        except (TypeError, ValueError, AttributeError):
            stamp = 0.0
    try:
        stamp = float(arc.get("time", stamp))
    except (TypeError, ValueError):
        pass
    return WorkerFailure(
        attempt=attempt,
        local_rank=local_rank if local_rank >= 0 else _local_rank(arc),
        exit_code=classify_error_data(data),
        message=text.strip().splitlines()[0] if text.strip() else "(no message)",
        time=stamp,
        host=arc.get("host"),
        rank=arc.get("rank"),
        path=path,
        device=arc.get("device"),
        blames_host=arc.get("blamesHost", True) is not False,
        error_type=arc.get("errorType"),
        made_progress=_made_progress(arc),
    )


def _local_rank(arc: dict) -> int:
    value = arc.get("localRank")
    return value if isinstance(value, int) else -1


def _made_progress(arc: dict) -> bool | None:
    if "progress" not in arc:
        return None  # not written by arc-dist's error-file writer
    p = arc["progress"]
    try:
        return p is not None and int(p["step"]) > int(p["resumedFrom"])
    except (TypeError, KeyError, ValueError):
        return None


def scan_error_dir(error_dir: str, ignore: Iterable[str] = ()) -> tuple[int, list[WorkerFailure]]:
    """Every worker record in ``error_dir`` (``<attempt>-<rank>-<pid>.json``, see the module
    docstring), except the file names in ``ignore`` (an earlier run's).

    Returns the highest attempt that started or failed (-1 when none) and the failures, sorted
    by attempt then time.
    """
    try:
        names = os.listdir(error_dir)
    except OSError:
        return -1, []
    skip = set(ignore)
    last_attempt = -1
    failures: list[WorkerFailure] = []
    for name in names:
        m = _RECORD_RE.match(name)
        if not m or name in skip:
            continue
        attempt = int(m.group(1))
        last_attempt = max(last_attempt, attempt)
        if m.group(4) != "json":
            continue
        f = read_error_file(os.path.join(error_dir, name), attempt)
        if f is not None:
            failures.append(f)
    failures.sort(key=lambda f: (f.attempt, f.time, f.local_rank))
    return last_attempt, failures


def root_cause(failures: Sequence[WorkerFailure]) -> WorkerFailure | None:
    """The failure that explains an attempt (all ``failures`` from the same attempt).

    A code other than RETRY is always deliberate (Arc raises ``UnrecoverableError`` on every
    rank; a device error names its own device), while the other ranks' generic errors
    ("connection reset", collective timeouts) are usually its consequences: so the earliest
    deliberate failure wins, else the earliest failure.
    """
    if not failures:
        return None
    deliberate = [f for f in failures if f.exit_code != ExitCode.RETRY]
    return min(deliberate or failures, key=lambda f: (f.time, f.local_rank))


def _blamed_host(failures: Sequence[WorkerFailure]) -> tuple[bool, str | None]:
    """(True, host) when one attempt's failures point at one host's hardware; else (False, None).

    Evidence: a device error that blames its own host (ECC, a lost device, NVLink, an Xid): the
    earliest one's host (None for files that carry no host). Or device errors that do not (an
    illegal address, a launch failure: a kernel bug looks the same) seen on one host only, while
    ranks on other hosts ran the same code and failed otherwise (their peer errors). One host
    running alone, or every host failing alike, is no evidence against the hardware.
    """
    device = [f for f in failures if f.exit_code == ExitCode.HARDWARE]
    blaming = [f for f in device if f.blames_host]
    if blaming:
        return True, min(blaming, key=lambda f: (f.time, f.local_rank)).host
    hosts = {f.host for f in device}
    others = {f.host for f in failures if f.host is not None} - hosts
    if len(hosts) == 1 and None not in hosts and others:
        return True, next(iter(hosts))
    return False, None


def hardware_streak(failures: Sequence[WorkerFailure], last_attempt: int) -> int:
    """How many attempts in a row, ending with ``last_attempt``, failed on a device error that
    points at the same host's hardware.

    An attempt counts when its root cause is a device error (HARDWARE) and its failures point at
    one host (:func:`_blamed_host`: not an NCCL timeout, a device-side assert or a kernel's
    illegal address alone, which a peer or the program may have caused); the streak breaks at an
    attempt that does not count or whose host differs (with a log folder shared by several
    nodes, only one host's failures in a row mean that host is bad).
    """
    streak, host = 0, None
    for attempt in range(last_attempt, -1, -1):
        attempt_failures = [f for f in failures if f.attempt == attempt]
        cause = root_cause(attempt_failures)
        if cause is None or cause.exit_code != ExitCode.HARDWARE:
            break
        blamed, where = _blamed_host(attempt_failures)
        if not blamed or (streak and where != host):
            break
        host = where
        streak += 1
    return streak


#: errors that a peer, the network, the storage or the platform may cause: an attempt that
#: ends on one of them is no evidence that the program itself fails the same way every time
_NOT_PROGRAM_ERRORS = frozenset(
    {"DistError", "DistNetworkError", "DistStoreError", "DistBackendError", "ConnectionError",
     "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
     "BrokenPipeError", "TimeoutError", "HangError", "CheckpointStorageError", "Preempted",
     "SystemExit", "KeyboardInterrupt", "ChildFailedError"}
)  # fmt: skip
_NOT_PROGRAM_TEXT = re.compile(
    r"gloo|nccl|connection (reset|closed|refused|aborted)|pair closure|broken pipe|timed out|"
    r"timeout|rendezvous|socket|preempted|sigterm|out of memory",
    re.IGNORECASE,
)


def _program_error(f: WorkerFailure) -> bool:
    return (
        f.exit_code == ExitCode.RETRY
        and f.made_progress is False
        and f.error_type not in _NOT_PROGRAM_ERRORS
        and not _NOT_PROGRAM_TEXT.search(f.message)
    )


def no_progress_streak(failures: Sequence[WorkerFailure], last_attempt: int) -> int:
    """How many attempts in a row, ending with ``last_attempt``, failed with the same program
    error before passing the step they resumed from.

    An attempt counts when its root cause is an error file from arc-dist's ``main_entry``
    (which records the step resumed from and the step reached) with exit code 10, no progress,
    an error that is not a peer's, the network's, the storage's or the platform's (connection
    and collective errors, timeouts, hangs, storage outages, preemption, out of memory), and
    the same error as the newer attempts (numbers aside). A bug in the training script or its
    data that fires before the first step after every resume counts; a crash that moves on
    does not.
    """
    streak, signature = 0, None
    for attempt in range(last_attempt, -1, -1):
        cause = root_cause([f for f in failures if f.attempt == attempt])
        if cause is None or not _program_error(cause):
            break
        if signature is not None and cause.signature != signature:
            break
        signature = cause.signature
        streak += 1
    return streak


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the launcher exits with, and why (one line for the log)."""

    exit_code: ExitCode
    reason: str
    cause: WorkerFailure | None = None


def decide(
    torchrun_rc: int | None,
    failures: Sequence[WorkerFailure],
    last_attempt: int,
    *,
    signalled: str | None = None,
    agent_message: str | None = None,
    bad_node_after: int = 0,
    no_progress_after: int = 0,
) -> Outcome:
    """Map torchrun's end to one exit code.

    ``torchrun_rc``: torchrun's exit status (None if still running when the launcher stopped
    it); ``failures``/``last_attempt``: from :func:`scan_error_dir`; ``signalled``: the signal
    the launcher forwarded (preemption), if any; ``agent_message``: the agent's own recorded
    error, for the reason text; ``bad_node_after``: with N > 0, N attempts in a row ending in a
    device error on this host mean BAD_NODE; ``no_progress_after``: with N > 0, N attempts in a
    row that failed the same way before passing their resume step mean UNRECOVERABLE
    (:func:`no_progress_streak`).

    Order: a stop code (UNRECOVERABLE, BAD_NODE) in any attempt ends the job with it, because
    the launcher stops torchrun as soon as it sees one; then the bad-node and the no-progress
    rules; then preemption -> RETRY; then success
    -> OK; then the root cause of the last attempt; no error file -> RETRY (a signal, the OOM
    killer, or a rendezvous failure: a restart can help).
    """
    stops = [f for f in failures if f.exit_code in STOP_CODES]
    if stops:
        cause = min(stops, key=lambda f: (f.attempt, f.time))
        return Outcome(cause.exit_code, f"do not retry: {cause.describe()}", cause)
    if bad_node_after > 0 and hardware_streak(failures, last_attempt) >= bad_node_after:
        cause = root_cause([f for f in failures if f.attempt == last_attempt])
        return Outcome(
            ExitCode.BAD_NODE,
            f"{bad_node_after} attempts in a row failed on a device error on host "
            f"{cause.host if cause and cause.host else '?'}; replace the node. "
            f"Last: {cause.describe() if cause else '?'}",
            cause,
        )
    if no_progress_after > 0 and no_progress_streak(failures, last_attempt) >= no_progress_after:
        cause = root_cause([f for f in failures if f.attempt == last_attempt])
        assert cause is not None
        return Outcome(
            ExitCode.UNRECOVERABLE,
            f"{no_progress_after} attempts in a row failed with the same error before passing "
            f"the step they resumed from; a restart cannot help, fix the error. Last: "
            f"{cause.describe()}",
            cause,
        )
    if signalled:
        return Outcome(ExitCode.RETRY, f"preempted: forwarded {signalled} to torchrun")
    if torchrun_rc == 0:
        return Outcome(ExitCode.OK, "training finished")
    cause = root_cause([f for f in failures if f.attempt == last_attempt])
    if cause is not None:
        return Outcome(
            cause.exit_code, f"restarts exhausted; root cause: {cause.describe()}", cause
        )
    how = f"torchrun exited {torchrun_rc}" if torchrun_rc is not None else "torchrun stopped"
    extra = f"; agent: {agent_message}" if agent_message else ""
    return Outcome(
        ExitCode.RETRY,
        f"{how}; attempt {last_attempt} left no error file (killed by a signal or the OOM "
        f"killer, or a rendezvous failure){extra}",
    )
