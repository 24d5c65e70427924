"""A real single-node Ray cluster for tests: ``ray start --head`` on loopback, stopped by PID.

Every Ray process of the cluster lives in the process group of the ``ray start`` command (run
in a session of its own), so :meth:`RayHead.stop` ends exactly this cluster with ``killpg`` and
never touches other Ray instances on the host (``ray stop`` would end all of them). Job drivers
run in sessions of their own: ``stop`` stops every unfinished job through the job API first.

Ray 2.60 replaces ``--node-ip-address=127.0.0.1`` with the host's address for its node
addresses and its gRPC servers listen on every interface; the dashboard (job API) is bound to
127.0.0.1. Token auth is switched off (``RAY_AUTH_MODE=disabled``): for local tests only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(**extra: str) -> dict:
    """The environment for Ray processes and clients of a local test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "ARC_"))}
    env.update(
        RAY_AUTH_MODE="disabled",  # local tests only; see docs/ray.md
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class RayHead:
    def __init__(self, num_cpus: int = 2) -> None:
        # a short path: Ray's Unix sockets live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="arcray-", dir="/tmp")
        self.num_cpus = num_cpus
        self.gcs_port, self.dashboard_port, agent_port, client_port = free_ports(4)
        self._ports = (agent_port, client_port)
        self.pgid: int | None = None
        self.log_path = Path(self.temp_dir) / "ray_start.log"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return self._gcs_address

    def start(self, timeout: float = 120.0) -> None:
        agent_port, client_port = self._ports
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--ray-client-server-port={client_port}",
            "--disable-usage-stats",
        ]
        with open(self.log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True
            )
            self.pgid = proc.pid  # the group every process of this cluster inherits
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop()
                raise RuntimeError(
                    f"ray start did not finish in {timeout}s; see {self.log_path}"
                ) from None
        if rc != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({rc}):\n{self.log_path.read_text()[-3000:]}")
        address_file = Path(self.temp_dir) / "ray_current_cluster"
        self._gcs_address = address_file.read_text().strip()

    def _stop_jobs(self) -> None:
        try:
            from ray.job_submission import JobStatus, JobSubmissionClient

            client = JobSubmissionClient(self.dashboard_url)
            running = [j for j in client.list_jobs() if not j.status.is_terminal()]
            for job in running:
                client.stop_job(job.submission_id)
            deadline = time.monotonic() + 30
            while running and time.monotonic() < deadline:
                time.sleep(0.5)
                running = [
                    j
                    for j in running
                    if client.get_job_status(j.submission_id)
                    not in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)
                ]
        except Exception as e:  # the cluster may be half-dead already
            print(f"raycluster: could not stop jobs: {e}", file=sys.stderr)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # the group id was reused by someone else's processes
            return False

    def stop(self, grace: float = 5.0) -> None:
        if self.pgid is None:
            return
        if self._group_alive():
            self._stop_jobs()
            os.killpg(self.pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._group_alive():
                os.killpg(self.pgid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while self._group_alive() and time.monotonic() < deadline:
                    time.sleep(0.1)
        self.pgid = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
