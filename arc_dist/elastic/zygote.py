"""Warm start: a per-node zygote that forks workers with torch already imported.

A fresh worker spends most of a restart importing torch (seconds; more on a busy host). Under
``python -m arc_dist.launch --warm-start`` the launcher starts one zygote per node
(``python -m arc_dist.elastic.zygote ADDRESS MODULE...``) that imports torch, arc-dist and the
modules the user names once, starts no Python thread and no CUDA context (torch's own native
threads idle at fork, as under a DataLoader's fork), and then forks a worker for each request.
torchrun runs the torch-free shim (``_shim.py``) as the worker entrypoint; the shim hands the
zygote its argv, environment, working folder and stdio descriptors over an abstract Unix socket
(peer uid checked), relays signals to the worker and exits with the worker's status, so
torchrun's supervision, error files, restarts and exit codes are unchanged. A forked child runs
nothing until its shim says go, so a shim that gave up waiting (and started the worker itself)
never gets a second copy of its rank.

What the forked worker gets: a new session, a parent-death SIGKILL (the zygote's), the shim's
environment, folder and stdio, default signal handlers, fresh seeds for ``random`` and numpy's
global generator, a new ``__main__``. What it shares with its siblings: modules imported once
under the launcher's environment (less any per-worker variable), and Python's string-hash seed.
At exit it joins its threads and runs ``atexit`` handlers as the interpreter would, without the
interpreter's teardown.

The zygote SIGKILLs a worker whose shim is gone (torchrun killed it), and all its workers when it
is stopped; the launcher stops it when torchrun ends and its death signal stops it when the
launcher dies. Linux only (:func:`unavailable` says why not elsewhere); anything that keeps the
zygote from answering makes the shim start the worker normally.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

#: torchrun's worker entrypoint under warm start (run by path: no package import, no torch)
SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shim.py")
#: imported before any fork: what every arc-dist worker imports anyway (DDP's constructor
#: imports torch._dynamo: most of a second)
DEFAULT_IMPORTS = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo",
                   "torch.distributed.checkpoint", "arc_dist", "arc_dist.controller")  # fmt: skip

_PREFIX = "[arc-zygote]"
#: seconds a connected client has to send its request (a shim sends it at once); until then
#: the zygote serves the others
REQUEST_WAIT = 10.0
#: the byte that lets a forked child run, written to its pipe on its shim's go
_GO = b"g"


def _say(msg: str) -> None:
    sys.stderr.write(f"{_PREFIX} {msg}\n")
    sys.stderr.flush()


def unavailable() -> str | None:
    """Why warm start cannot work on this platform; None when it can."""
    if not sys.platform.startswith("linux"):
        return f"warm start needs Linux (fork, abstract Unix sockets), not {sys.platform}"
    return None


def death_signal(sig: int) -> None:
    """Get ``sig`` when the parent dies (Linux prctl PR_SET_PDEATHSIG); best effort elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))
    except Exception:  # noqa: BLE001 - not Linux
        pass


# ---------------------------------------------------------------- the launcher's side


#: per-worker variables of torchrun (and those a scheduler such as Kubeflow sets for it)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME",
             "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT")  # fmt: skip
_RANK_PREFIXES = ("TORCHELASTIC_", "PET_")


def _zygote_env(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without torchrun's per-worker variables: the zygote's imports must not see one
    rank's values (each worker gets its own environment at fork)."""
    return {
        k: v for k, v in environ.items() if k not in _RANK_VARS and not k.startswith(_RANK_PREFIXES)
    }


def start(imports: list[str]) -> tuple[subprocess.Popen, str]:
    """Start a zygote (not waiting for its imports: early shims queue on its socket) with this
    process's environment less any per-worker variable; returns the process and its address."""
    address = f"arc-zygote-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-u", "-m", "arc_dist.elastic.zygote", address,
           *DEFAULT_IMPORTS, *imports]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_zygote_env(dict(os.environ)), start_new_session=True,
                            preexec_fn=lambda: death_signal(signal.SIGTERM))  # fmt: skip
    return proc, address


def wait_listening(address: str, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """Wait until the zygote listens (it binds before its imports: a fraction of a second), so
    the first workers queue on it instead of starting without it; False if it did not."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open("/proc/net/unix") as f:
                if f"@{address}\n" in f.read():
                    return True
        except OSError:
            return False
        time.sleep(0.02)
    return False


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the zygote (it SIGKILLs its workers), SIGKILL it if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the zygote


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """Read a request from a readable connection; the rest of it must follow promptly."""
    conn.settimeout(2.0)
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    if len(head) != 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed request")
    try:
        (size,) = struct.unpack("!I", head)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("truncated request")
            body += chunk
        conn.settimeout(None)
        return json.loads(body), fds
    except BaseException:  # the shim's stdio must not stay open in the long-lived zygote
        for fd in fds:
            os.close(fd)
        raise


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _shim_waits(conn: socket.socket) -> bool:
    """The shim still waits for its answer: it sends nothing more until then, so end of stream
    means it gave up (a request queued while the zygote was busy) and started the worker itself."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class Zygote:
    """The server loop: accept requests, fork workers, report their exit status."""

    def __init__(self, address: str):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + address)
        self.listener.listen(256)
        self.workers: dict[int, socket.socket | None] = {}  # pid -> its shim's connection
        self.go: dict[int, int] = {}  # pid -> the pipe that lets the child run (until released)
        #: connections whose request has not arrived yet -> when the zygote drops them
        self.pending: dict[socket.socket, float] = {}
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()

    def serve(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "child")
        try:
            while True:
                wait = None
                if self.pending:
                    wait = max(0.0, min(self.pending.values()) - time.monotonic())
                for key, _ in self.sel.select(wait):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "request":
                        self._request(key.fileobj)
                    elif key.data == "child":
                        self._reap()
                    else:
                        self._shim_readable(key.fileobj, key.data)
                self._drop_silent()
        finally:
            for pid in self.workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _accept(self) -> None:
        """Take a connection; its request is read once it arrives (:meth:`_request`), so a
        client that connects and says nothing holds up no one."""
        conn, _ = self.listener.accept()
        try:
            if _peer_uid(conn) != os.getuid():
                raise PermissionError("request from another user")
        except OSError as e:
            _say(f"request refused: {e}")
            conn.close()
            return
        self.pending[conn] = time.monotonic() + REQUEST_WAIT
        self.sel.register(conn, selectors.EVENT_READ, "request")

    def _drop_silent(self) -> None:
        now = time.monotonic()
        for conn in [c for c, deadline in self.pending.items() if deadline <= now]:
            _say(f"request refused: nothing sent within {REQUEST_WAIT:g} s of connecting")
            self.sel.unregister(conn)
            del self.pending[conn]
            conn.close()

    def _request(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        del self.pending[conn]
        try:
            req, fds = _recv_request(conn)
        except (OSError, ValueError) as e:
            _say(f"request refused: {e}")
            conn.close()
            return
        if not _shim_waits(conn):  # gone while queued; one that gives up later never says go
            _say(f"the shim of {req.get('target')} gave up waiting and started it itself")
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            self._become_worker(conn, req, fds, go_r)  # never returns
        for fd in (*fds, go_r):
            os.close(fd)
        self.workers[pid], self.go[pid] = conn, go_w
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:  # the shim is gone already
            self._orphaned(pid, conn)
            return
        self.sel.register(conn, selectors.EVENT_READ, pid)

    def _shim_readable(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if data:  # the shim's go: the child may run
            self._release(pid, _GO)
        else:  # the shim gave up or died (torchrun SIGKILLed it): its worker goes too
            self.sel.unregister(conn)
            self._orphaned(pid, conn)

    def _release(self, pid: int, message: bytes = b"") -> None:
        """Close the child's go pipe, after ``message`` (empty: the child ends without running)."""
        fd = self.go.pop(pid, None)
        if fd is not None:
            try:
                if message:
                    os.write(fd, message)
            except OSError:  # the child is gone already
                pass
            os.close(fd)

    def _orphaned(self, pid: int, conn: socket.socket) -> None:
        self._release(pid)
        conn.close()
        self.workers[pid] = None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._release(pid)
            conn = self.workers.pop(pid, None)
            if conn is not None:
                self.sel.unregister(conn)
                try:
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()

    def _become_worker(self, conn: socket.socket, req: dict, fds: list[int], go: int) -> None:
        """In the forked child: turn into the worker the request describes once ``go`` says so
        (the pipe closes without a word when the shim gave up); exits."""
        code = 1
        try:
            # the zygote's handlers first: the shim may relay a SIGTERM as soon as it has the pid
            signal.set_wakeup_fd(-1)
            for s in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            zygote = os.getppid()
            os.setsid()
            death_signal(signal.SIGKILL)
            if os.getppid() != zygote:  # the zygote died before the death signal was set
                os._exit(1)
            self.sel.close()
            for sock in (self.listener, conn, *self.pending,
                         *(c for c in self.workers.values() if c)):  # fmt: skip
                sock.close()
            for fd in (self.wake_r, self.wake_w, *self.go.values()):
                os.close(fd)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            _refresh_process_state()
            if os.read(go, 1) != _GO:  # the shim did not take this worker: run nothing
                os._exit(1)
            os.close(go)
            code = run_main(req["module"], req["target"], req["args"])
        except BaseException:  # noqa: BLE001 - the child must never return into the loop
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)


def _refresh_process_state() -> None:
    """What a fresh interpreter would not share with its siblings: seeds, thread settings."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if "torch" in sys.modules and threads.isdigit() and int(threads) > 0:
        sys.modules["torch"].set_num_threads(int(threads))


def run_main(module: bool, target: str, args: list[str]) -> int:
    """Run ``target`` as ``python [-m] target args`` would, in this (forked) process; returns the
    exit status after joining threads and running ``atexit`` handlers."""
    import atexit
    import builtins
    import io
    import runpy
    import threading
    import types

    main_module = types.ModuleType("__main__")
    main_module.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main_module
    sys.argv = [target, *args]
    interrupted = False
    try:
        if module:
            sys.path[0] = os.getcwd()
            runpy._run_module_as_main(target, alter_argv=True)  # what python -m runs
        else:
            path = os.path.abspath(target)
            sys.path[0] = os.path.dirname(os.path.realpath(target))
            main_module.__file__ = path
            with io.open_code(path) as f:
                code = compile(f.read(), path, "exec")
            exec(code, main_module.__dict__)
        status = 0
    except SystemExit as e:
        status = _exit_status(e.code)
    except BaseException as e:  # noqa: BLE001 - reported as the interpreter would
        sys.excepthook(type(e), e, e.__traceback__)
        interrupted, status = isinstance(e, KeyboardInterrupt), 1
    threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    if interrupted:  # as CPython: end by the signal, so the parent sees it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    address, *imports = argv
    zygote = Zygote(address)  # bound first: shims arriving during the imports queue here
    t0 = time.monotonic()
    for name in dict.fromkeys(imports):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the workers import it themselves
            _say(f"cannot import {name} ({type(e).__name__}: {e}); workers will import it")
    import threading

    if threading.active_count() > 1:  # forking with Python threads running copies a broken state
        _say(f"threads started by the imports ({threading.enumerate()}): workers start normally")
        return 1
    _say(f"ready in {time.monotonic() - t0:.1f} s ({len(imports)} modules imported)")
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
