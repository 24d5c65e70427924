"""The worker entrypoint torchrun runs under ``python -m arc_dist.launch --warm-start``.

``python _shim.py ADDRESS (--|-m) SCRIPT [ARGS...]``: asks the node's zygote
(:mod:`arc_dist.elastic.zygote`, abstract Unix socket ``ADDRESS``) to fork the worker with this
process's argv, environment, working folder and stdio (the descriptors travel with
``SCM_RIGHTS``), relays the signals torchrun sends to the worker, and ends the way the worker
ended: the same exit status, or the same signal raised on itself. torchrun's supervision, error
files, restarts and exit codes see a worker like any other. When the zygote cannot be reached or
does not answer, this process becomes the worker itself (``exec`` of a normal Python start), so
a missing zygote costs time, never the run.

Exactly one worker runs: the forked child waits for this process's go (one byte, sent once the
zygote's answer arrived in time) before it runs anything, and the zygote SIGKILLs a child whose
shim closed the connection without it. A shim that gave up and started the worker itself never
sends it.

Run by path, not imported: standard library only, so it starts in milliseconds.
"""

import json
import os
import signal
import socket
import struct
import sys

#: signals torchrun (or a user) may send a worker; relayed to the forked worker
RELAYED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
#: seconds to wait for each step of the exchange with the zygote (connect, request, answer); it
#: may still be importing at job start
CONNECT_TIMEOUT = float(os.environ.get("ARC_WARM_TIMEOUT", "300"))
#: what the shim sends once it has the worker's pid: the child may run (see the module docstring)
GO = b"g"


def _normal_start(module: bool, target: str, args: list[str]) -> None:
    """Become the worker: the command torchrun would have run without the zygote."""
    argv = [sys.executable, "-u", *(["-m"] if module else []), target, *args]
    os.execv(sys.executable, argv)


def _request(address: str, module: bool, target: str, args: list[str]) -> socket.socket | None:
    """Connect and hand over the request; None when no zygote listens."""
    body = json.dumps({"module": module, "target": target, "args": args, "cwd": os.getcwd(),
                       "env": dict(os.environ)}).encode()  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)  # a zygote that never accepts: its backlog or buffer is full
    try:  # a zygote that goes away meanwhile is a missing one: start normally
        sock.connect("\0" + address)
        socket.send_fds(sock, [struct.pack("!I", len(body))], [0, 1, 2])
        sock.sendall(body)
    except OSError:
        sock.close()
        return None
    return sock


def _lines(sock: socket.socket):
    buf = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def main() -> None:
    address, mode, target, *args = sys.argv[1:]
    module = mode == "-m"
    sock = _request(address, module, target, args)
    if sock is None:
        sys.stderr.write(f"[arc-warm] no zygote listening: starting {target} normally\n")
        _normal_start(module, target, args)
    replies = _lines(sock)
    try:
        pid = next(replies)["pid"]
        sock.sendall(GO)  # past this point the forked worker runs: no more normal start
    except (StopIteration, KeyError, OSError, ValueError):  # OSError: TimeoutError included
        sys.stderr.write(f"[arc-warm] the zygote did not start {target}: starting it normally\n")
        sock.close()  # a child forked meanwhile never got the go: the zygote SIGKILLs it
        _normal_start(module, target, args)
    sock.settimeout(None)

    def relay(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for name in RELAYED:
        signal.signal(getattr(signal, name), relay)
    status = next((r["status"] for r in replies if "status" in r), None)
    if status is None:  # the zygote died; its workers die with it (parent-death signal)
        sys.stderr.write(f"[arc-warm] lost the zygote while {target} ran (pid {pid})\n")
        os._exit(1)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these cannot be caught anyway
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal that does not end a process by default
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
