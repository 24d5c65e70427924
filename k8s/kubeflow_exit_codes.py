"""Run a command and translate arc-dist's exit codes for Kubeflow's ``restartPolicy: ExitCode``.

Kubeflow's training operator reads the exit code of the ``pytorch`` container: 1-127 is a
permanent error (the job fails), 128-255 is retryable (the pod is deleted and created again).
Every code of ``arc_dist.errors.ExitCode`` is below 128, so without translation a preempted
pod (exit 10, RETRY) would fail the whole job. Usage, as in ``arc_dist/k8s/manifests/pytorchjob.yaml``::

    python kubeflow_exit_codes.py python -m arc_dist.launch ... -- train.py ...

The command's exit code passes through unchanged except:

* RETRY (10) and HARDWARE (12) become 128 + code (138, 140): retryable.
* A child killed by signal N becomes 128 + N (137 after an OOM kill), as a shell reports it.

SIGTERM, SIGINT and SIGHUP are forwarded to the child, which must act on them (the launcher
writes a final checkpoint); this wrapper then waits for it and exits with its translated code.

Standard library only, and deliberately not importing ``arc_dist`` (that would import torch
into a process that only waits); ``tests/test_k8s.py`` checks the codes against ``ExitCode``.
"""

from __future__ import annotations

import signal
import subprocess
import sys

#: ``ExitCode.RETRY`` and ``ExitCode.HARDWARE``: restarting can help.
RETRYABLE_CODES = frozenset({10, 12})
#: Kubeflow treats exit codes at or above this as retryable.
RETRYABLE_BASE = 128
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def translate(returncode: int) -> int:
    """Map a child's ``Popen.returncode`` to the exit code Kubeflow should see."""
    if returncode < 0:  # killed by signal -returncode
        return RETRYABLE_BASE + (-returncode)
    if returncode in RETRYABLE_CODES:
        return RETRYABLE_BASE + returncode
    return returncode


def main(argv: list[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("usage: kubeflow_exit_codes.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    # Popen.wait retries on EINTR after the handler has run, so this returns only when the
    # child has exited.
    returncode = child.wait()
    code = translate(returncode)
    if code != returncode:
        print(
            f"kubeflow_exit_codes: command exited with {returncode}; exiting {code} so that "
            "restartPolicy: ExitCode retries it",
            file=sys.stderr,
            flush=True,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
