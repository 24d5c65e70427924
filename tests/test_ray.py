"""arc-dist under Ray: helpers (fast), and a real local Ray cluster (marker ``ray``).

The cluster tests share one session-scoped ``ray start --head`` cluster on loopback with 2 CPUs
(tests/raycluster.py; stopped by process group, never ``ray stop``). They run
``examples/train_ray.py``'s own ``TorchTrainer`` (so the example never rots) and
``launch/ray_submit.py``:

* (a) 2 workers, a NaN on worker 1: Arc rolls back in place; no Ray restart; identical replicas;
* (b) worker 1 SIGKILLs itself (chaos ``crash``, fresh runs only): Ray restarts the group, the
  loop resumes from the newest healthy checkpoint and finishes at the right step;
* (c) ``ray_submit.py`` streams a job's logs and returns 0 / the job's non-zero exit code.

Run only these: ``pytest -m ray tests/test_ray.py`` (about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SUBMIT = REPO / "launch" / "ray_submit.py"

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="Ray is not installed: pip install 'arc-dist[ray]'"
)
HAVE_JOBS = HAVE_RAY and importlib.util.find_spec("aiohttp") is not None
needs_jobs = pytest.mark.skipif(
    not HAVE_JOBS, reason="Ray's job SDK needs ray[default]: pip install 'arc-dist[ray]'"
)


# -- helpers without a cluster -----------------------------------------------------------------
def _run_without_ray(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``import ray`` fails."""
    prelude = "import sys; sys.modules['ray'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_without_ray_helpers_name_the_extra():
    proc = _run_without_ray(
        """
        import arc_dist.ray as arc_ray          # importing the module itself needs no Ray
        assert arc_ray.checkpoint_dir("/tmp/runs", "exp") == "/tmp/runs/exp/arc"
        try:
            arc_ray.checkpoint_dir()
        except ImportError as e:
            print("ERR", e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERR arc_dist.ray needs Ray Train" in proc.stdout
    assert "pip install 'arc-dist[ray]'" in proc.stdout


def test_submit_without_ray_exits_4_naming_the_extra():
    proc = _run_without_ray(
        f"""
        import runpy
        sys.argv = ["ray_submit.py", "--address", "http://127.0.0.1:1", "--", "true"]
        runpy.run_path({str(SUBMIT)!r}, run_name="__main__")
        """
    )
    assert proc.returncode == 4, proc.stderr
    assert "pip install 'arc-dist[ray]'" in proc.stderr


def test_checkpoint_dir_explicit_and_bad_input():
    import arc_dist.ray as arc_ray

    assert arc_ray.checkpoint_dir("s3://bucket/runs/", "gpt-1") == "s3://bucket/runs/gpt-1/arc"
    with pytest.raises(ValueError, match="name"):
        arc_ray.checkpoint_dir("/tmp/runs", "a/b")
    with pytest.raises(TypeError, match="storage_path"):
        arc_ray.checkpoint_dir("", "x")


def test_check_storage_unwritable_fails_fast(tmp_path):
    import arc_dist.ray as arc_ray
    from arc_dist.checkpoint import CheckpointStorageError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    t0 = time.monotonic()
    with pytest.raises(CheckpointStorageError, match="not writable") as err:
        arc_ray.check_storage(str(blocker / "runs"))
    assert str(blocker) in str(err.value)
    assert time.monotonic() - t0 < 10


def test_submit_usage_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--", "python", "x.py"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "no cluster address" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--address", "http://127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "no entrypoint" in proc.stderr


@needs_ray
def test_checkpoint_dir_outside_a_worker_says_where_to_call_it():
    import arc_dist.ray as arc_ray

    with pytest.raises(RuntimeError, match="train_loop_per_worker"):
        arc_ray.checkpoint_dir()


@needs_ray
def test_storage_url_from_ray_storage_context(tmp_path):
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train import RunConfig
    from ray.train.v2._internal.execution.storage import StorageContext

    import arc_dist.ray as arc_ray

    local = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp")
    assert arc_ray.storage_url(local) == str(tmp_path)
    mem = PyFileSystem(FSSpecHandler(fsspec.filesystem("memory")))
    wrapped = StorageContext(storage_path="runs", experiment_dir_name="exp", storage_filesystem=mem)
    assert arc_ray.storage_url(wrapped) == "memory://runs"

    # the driver-side check of a RunConfig probes <storage_path>/<name>/arc
    url = arc_ray.check_storage(RunConfig(storage_path=str(tmp_path / "store"), name="run"))
    assert url == f"{tmp_path}/store/run/arc"
    assert (tmp_path / "store" / "run" / "arc").is_dir()


def _local_mode_loop(config: dict) -> None:
    """Ray Train local mode runs this in the test process (no cluster)."""
    import torch

    import arc_dist.ray as arc_ray
    from arc_dist import Arc, ArcConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = arc_ray.checkpoint_dir(storage_path=config["store"])  # name: the run's
    config["seen"]["checkpoint_dir"] = ckpt
    cfg = ArcConfig(checkpoint_every=2, async_checkpoint=False)
    with Arc(model, opt, checkpoint_dir=ckpt, config=cfg) as arc:
        arc.resume()
        while arc.global_step < 4:
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            action = arc.step(loss)
            if not action.should_skip:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sent = arc_ray.report(arc, {"loss_tensor": loss.detach()}, action=action)
        config["seen"]["last"] = sent
        with pytest.raises(TypeError, match="numbers or strings"):
            arc_ray.report(arc, {"weights": model.weight.detach()})


@needs_ray
def test_report_in_ray_local_mode(tmp_path, caplog):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    seen: dict = {}
    trainer = TorchTrainer(
        _local_mode_loop,
        train_loop_config={"store": str(tmp_path / "arc"), "seen": seen},
        scaling_config=ScalingConfig(num_workers=0),  # local mode: no cluster, this process
        run_config=RunConfig(name="local-run", storage_path=str(tmp_path / "ray")),
    )
    with caplog.at_level("WARNING", logger="arc_dist"):
        result = trainer.fit()
    assert seen["checkpoint_dir"] == f"{tmp_path}/arc/local-run/arc"
    last = seen["last"]
    assert last["step"] == 4 and last["arc/checkpoints"] == 1
    assert last["arc/status"] == "healthy" and last["arc/rolled_back"] is False
    assert isinstance(last["loss_tensor"], float)  # tensors become numbers for Ray
    assert result.metrics["step"] == 4
    # local mode has no storage context: metrics go to Ray, checkpoints are not listed
    assert result.checkpoint is None
    assert sum("reporting metrics only" in r.message for r in caplog.records) == 1


@needs_jobs
def test_submit_unreachable_cluster_exits_4():
    from tests.raycluster import free_ports, ray_env

    (port,) = free_ports(1)
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--address", f"http://127.0.0.1:{port}", "--", "true"],
        capture_output=True, text=True, env=ray_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "could not submit" in proc.stderr


# -- a real cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster():
    """``ray start --head`` on loopback (2 CPUs, dashboard on 127.0.0.1), stopped at the end."""
    from tests.raycluster import RayHead

    head = RayHead(num_cpus=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_AUTH_MODE", "disabled")  # local tests only (docs/ray.md)
        head.start()
        try:
            yield head
        finally:
            if sys.modules.get("ray") is not None:
                import ray

                ray.shutdown()
            head.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This process as a driver of the test cluster."""
    import ray

    ray.init(address=ray_cluster.gcs_address, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_ray():
    sys.path.insert(0, str(EXAMPLES))
    import train_ray

    return train_ray


def _fit(train_ray, tmp_path: Path, name: str, *flags: str):
    events_path = tmp_path / "events.jsonl"
    args = train_ray.build_parser().parse_args(
        [
            "--workers", "2", "--corpus-bytes", "300000",
            "--snapshot-every", "10", "--report-every", "10", "--log-every", "10",
            "--storage-path", str(tmp_path / "store"), "--name", name,
            "--report", str(events_path), *flags,
        ]
    )  # fmt: skip
    t0 = time.monotonic()
    result = train_ray.make_trainer(args).fit()
    elapsed = time.monotonic() - t0
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    return result, events, elapsed


def _by(events: list[dict], kind: str, rank: int) -> list[dict]:
    return [e for e in events if e["event"] == kind and e["rank"] == rank]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_fault_on_one_worker_rolled_back_in_place(ray_driver, train_ray, tmp_path):
    steps = 30
    result, events, elapsed = _fit(
        train_ray, tmp_path, "nan",
        "--steps", str(steps), "--checkpoint-every", "10", "--confirm-after", "5",
        "--checkpoint-mode", "blocking",  # step_20 is committed before the report at step 30
        "--chaos", "lr_spike@15/1",  # against the scheduler: damaged state, rolled back
        "--max-failures", "0",  # a restart would fail the run: Arc must handle this alone
    )  # fmt: skip
    print(f"fit with an in-place rollback: {elapsed:.1f}s")
    assert result.error is None
    for rank in (0, 1):
        assert len(_by(events, "start", rank)) == 1, "Ray restarted the worker group"
        (done,) = _by(events, "done", rank)
        assert done["step"] == steps
        assert done["stats"]["rollbacks"] == 1 and done["stats"]["failures"] == 1
    digests = {e["digest"] for e in events if e["event"] == "done"}
    assert len(digests) == 1, "the replicas differ after the rollback"

    # what Ray recorded: arc-dist's metrics and its final checkpoint, not a copy of it
    assert result.metrics["step"] == steps and result.metrics["arc/rollbacks"] == 1
    assert result.metrics["arc/checkpoint_step"] == steps
    ckpt = Path(result.checkpoint.path)
    assert ckpt == tmp_path / "store" / "nan" / "arc" / f"step_{steps}"
    assert (ckpt / "arc_manifest.json").is_file()
    listed = [Path(c.path).name for c, _ in result.best_checkpoints]
    assert listed[-1] == f"step_{steps}" and "step_20" in listed


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_ray
def test_worker_sigkill_ray_restarts_and_arc_resumes(ray_driver, train_ray, tmp_path):
    steps, crash_at = 40, 28
    result, events, elapsed = _fit(
        train_ray, tmp_path, "crash",
        "--steps", str(steps), "--checkpoint-every", "10", "--confirm-after", "3",
        "--checkpoint-mode", "blocking",  # step_20 is confirmed by step 23, well before 28
        "--chaos", f"crash@{crash_at}/1",  # SIGKILLs worker 1; fresh runs only
        "--max-failures", "2",
    )  # fmt: skip
    print(f"fit with a SIGKILL and a Ray restart: {elapsed:.1f}s")
    assert result.error is None
    for rank in (0, 1):
        starts = _by(events, "start", rank)
        assert [s["step"] for s in starts] == [0, 20], starts  # one restart, from step_20
        assert starts[0]["pid"] != starts[1]["pid"]
        (done,) = _by(events, "done", rank)
        assert done["step"] == steps and done["resumed_from"] == 20
        assert done["stats"]["rollbacks"] == 0
    digests = {e["digest"] for e in events if e["event"] == "done"}
    assert len(digests) == 1

    arc_dir = tmp_path / "store" / "crash" / "arc"
    assert (arc_dir / "step_20" / "arc_confirmed.json").is_file()  # what resume() chose
    assert result.metrics["step"] == steps
    assert Path(result.checkpoint.path) == arc_dir / f"step_{steps}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_jobs
def test_submit_example_job_streams_logs_and_succeeds(ray_cluster, tmp_path):
    from tests.raycluster import ray_env

    store = tmp_path / "store"
    cmd = [
        sys.executable, str(SUBMIT), "--address", ray_cluster.dashboard_url,
        "--working-dir", str(REPO), "--exclude", "runs",
        "--env", "ARC_CHAOS=lr_spike@5",  # reaches the workers only through the runtime_env
        "--", "python", "examples/train_ray.py", "--workers", "1", "--steps", "12",
        "--checkpoint-every", "10", "--corpus-bytes", "200000", "--log-every", "6",
        "--storage-path", str(store), "--name", "job",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(), timeout=280)
    print(f"ray_submit of the example: {time.monotonic() - t0:.1f}s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "lr_spike: rolled back" in proc.stdout  # the job's own log lines, streamed
    assert "done: step 12" in proc.stdout
    assert "SUCCEEDED -> exit 0" in proc.stderr
    assert (store / "job" / "arc" / "step_12" / "arc_manifest.json").is_file()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_jobs
def test_submit_failing_job_returns_its_exit_code(ray_cluster, tmp_path):
    from tests.raycluster import ray_env

    (tmp_path / "fail.py").write_text("import sys\nprint('failing on purpose')\nsys.exit(3)\n")
    env = ray_env(RAY_ADDRESS=ray_cluster.dashboard_url)  # the address from the environment
    proc = subprocess.run(
        [sys.executable, str(SUBMIT), "--working-dir", str(tmp_path), "--", "python", "fail.py"],
        capture_output=True, text=True, env=env, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    assert "failing on purpose" in proc.stdout
    assert "FAILED" in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_jobs
def test_submit_timeout_stops_the_job_and_exits_3(ray_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from tests.raycluster import ray_env

    (tmp_path / "hang.py").write_text(
        "import time\nprint('started', flush=True)\ntime.sleep(600)\n"
    )
    cmd = [sys.executable, str(SUBMIT), "--address", ray_cluster.dashboard_url,
           "--working-dir", str(tmp_path), "--submission-id", "arc-timeout", "--timeout", "15",
           "--", "python", "hang.py"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ray_env(), timeout=110)
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-3000:]
    assert "ran past --timeout 15 s" in proc.stderr
    info = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info("arc-timeout")
    assert info.status.value == "STOPPED"
