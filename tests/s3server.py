"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1 and a free port.

``MotoServer.start()``/``stop()`` run ``moto_server`` as a subprocess, so tests can take the
storage away in the middle of training (moto keeps its data in memory: a restarted server is
empty, and tests recreate their bucket). ``storage_options`` are what ``Arc``/``CheckpointManager``
pass to s3fs; the secret is a recognisable string so tests can assert it never reaches a log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests._dist import free_port

SECRET = "s3cr3t-never-log-me"
KEY = "AKIAARCDISTTEST"


class MotoServer:
    def __init__(self, log_path: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "moto.server"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def storage_options(self) -> dict:
        """s3fs options: fail fast (one attempt, short timeouts) so outage tests stay quick."""
        return {
            "key": KEY,
            "secret": SECRET,
            "endpoint_url": self.endpoint,
            "config_kwargs": {
                "connect_timeout": 1,
                "read_timeout": 5,
                "retries": {"max_attempts": 1, "mode": "standard"},
            },
            "skip_instance_cache": True,
        }

    def make_bucket(self, name: str) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options())
        try:
            fs.mkdir(name)
        except FileExistsError:  # e.g. recreated meanwhile by a writer's makedirs
            pass
