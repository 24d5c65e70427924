"""Node health (arc_dist.health): preflight checks, device-error handling and the bad-node rule.

Three tiers: pure tests (the classifier, chaos parsing, the launcher's host rule over synthetic
error files, single-process preflight and ``Arc.step``); the preflight on 2 real gloo ranks;
and three launcher runs (real torchrun and the ``python -m arc_dist.health`` preflight): a
device error in a step exits 12, a failing preflight exits 13 before any step, both in
``Arc.__init__`` and in the launcher before torchrun starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from arc_dist import Arc, ArcConfig, ArcError, ExitCode
from arc_dist.elastic.exitcodes import (
    decide,
    hardware_streak,
    read_error_file,
    scan_error_dir,
    write_error_file,
)
from arc_dist.errors import BadNodeError, HardwareError
from arc_dist.health import (
    CHECKS,
    FAILED,
    PASSED,
    SKIPPED,
    device_fault,
    hardware_error,
    is_device_error,
    preflight,
    preflight_faults,
    run_local_checks,
)
from arc_dist.health.nvml import Nvml

from ._dist import run_ranks
from ._launchproc import _descendants, clean_env, write_record

WORKER = Path(__file__).parent / "workers" / "health_worker.py"
DEVICE_CHECKS = ("device_count", "alloc", "matmul", "memory", "nvml")


# ---------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------

DEVICE_ERRORS = [
    # what a kernel bug looks like too: not evidence against the host by itself
    ("CUDA error: an illegal memory access was encountered", "illegal_memory_access", False),
    ("CUDA error: unspecified launch failure", "launch_failure", False),
    ("CUDA error: device-side assert triggered", "device_assert", False),
    ("CUDA error: misaligned address", "misaligned_address", False),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`", "cublas_execution_failed", False),
    ("CUDA error: operation not permitted when stream is capturing", "cuda", False),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO)", "nccl_cuda", False),
    # evidence that points at the hardware
    ("CUDA error: uncorrectable ECC error encountered", "ecc", True),
    ("Unable to determine the device handle for GPU 0000:3B:00.0: GPU is lost.", "device_lost", True),
    ("CUDA error: uncorrectable NVLink error detected during the execution", "nvlink", True),
    ("NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, GPU has fallen off the bus.", "device_lost", True),
    ("NVRM: Xid (PCI:0000:3b:00): 48, pid=1234, An uncorrectable double bit error", "xid", True),
    # a peer or the network
    ("[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=81, OpType=ALLREDUCE) ran for 600012 milliseconds before timing out.", "nccl_timeout", False),
    ("NCCL communicator was aborted on rank 2.", "nccl", False),
    ("NCCL timeout in: ProcessGroupNCCL.cpp", "nccl_timeout", False),
]  # fmt: skip

NOT_DEVICE_ERRORS = [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "CUDA error: no kernel image is available for execution on the device",
    "CUDA error: invalid device ordinal",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:3921",
    "mat1 and mat2 shapes cannot be multiplied (16x8 and 4x1)",
]


@pytest.mark.parametrize("message,kind,blames", DEVICE_ERRORS)
def test_device_errors_are_classified(message, kind, blames):
    fault = device_fault(RuntimeError(message))
    assert fault is not None and (fault.kind, fault.blames_host) == (kind, blames)
    assert is_device_error(message)  # messages from error files classify the same way


@pytest.mark.parametrize("message", NOT_DEVICE_ERRORS)
def test_other_errors_are_not_device_errors(message):
    assert device_fault(RuntimeError(message)) is None
    assert hardware_error(RuntimeError(message)) is None


def test_classifier_types_and_cause_chain():
    assert device_fault(torch.OutOfMemoryError("CUDA out of memory")) is None
    fault = device_fault(torch.AcceleratorError("something new"))
    assert fault.kind == "accelerator" and fault.blames_host is False
    # arc-dist's own errors are already classified, whatever their text says
    assert device_fault(HardwareError("CUDA error: an illegal memory access")) is None
    # a device error wrapped by the user's code is still found
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("batch 17 failed") from inner
    except ValueError as outer:
        assert device_fault(outer).kind == "illegal_memory_access"
    hw = hardware_error(RuntimeError("NCCL error: remote process exited"), rank=5, step=9)
    assert isinstance(hw, HardwareError) and hw.exit_code == ExitCode.HARDWARE
    assert "rank 5" in str(hw) and "at step 9" in str(hw) and "device cpu" in str(hw)
    assert hw.details["blamesHost"] is False and hw.details["kind"] == "nccl"


# ---------------------------------------------------------------------------------------------
# Chaos and the single-process checks
# ---------------------------------------------------------------------------------------------


def test_preflight_fault_spec():
    assert preflight_faults(1, "matmul/1 allreduce, nvml/0+2") == {"matmul", "allreduce"}
    assert preflight_faults(2, "matmul/1 allreduce, nvml/0+2") == {"allreduce", "nvml"}
    assert preflight_faults(0, "") == frozenset()
    for bad in ("matmull", "matmul/x", "matmul@3"):
        with pytest.raises(ValueError, match="ARC_CHAOS_PREFLIGHT"):
            preflight_faults(0, bad)
    assert set(DEVICE_CHECKS) | {"allreduce"} == set(CHECKS)


def test_preflight_on_cpu_skips_device_checks(monkeypatch):
    monkeypatch.delenv("ARC_CHAOS_PREFLIGHT", raising=False)
    report = preflight()  # no process group: a single process
    assert report.ok and report.world_size == 1
    for name in DEVICE_CHECKS + ("allreduce",):
        assert report.status(name) == [SKIPPED], report.format()
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_injected_device_faults_fail_the_real_checks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    checks = {c.name: c for c in run_local_checks(inject=frozenset(DEVICE_CHECKS), alloc_mb=1)}
    assert all(c.status == FAILED for c in checks.values())
    assert "1 of 262144 elements" in checks["matmul"].detail  # the comparison found it
    assert "bytes read back wrong" in checks["alloc"].detail
    assert "1 CUDA devices visible" in checks["device_count"].detail
    assert checks["matmul"].device == "cpu" and "dcgmi diag" in checks["matmul"].fix
    monkeypatch.setenv("ARC_CHAOS_PREFLIGHT", "matmul")
    with pytest.raises(BadNodeError) as err:
        preflight(matmul_size=64)
    msg = str(err.value)
    assert err.value.exit_code == ExitCode.BAD_NODE
    assert "check 'matmul' on cpu" in msg and "rank 0" in msg and "Fix:" in msg


def test_nvml_without_a_driver_is_skipped():
    status, detail = Nvml(True).check(torch.device("cpu"), False, "")
    assert status == SKIPPED and ("pynvml not installed" in detail or "NVML unavailable" in detail)
    assert Nvml(True).check(torch.device("cpu"), True, "")[0] == FAILED


def test_config_preflight_is_validated():
    with pytest.raises(ValueError, match="ArcConfig.preflight"):
        ArcConfig(preflight="yes")


def test_device_error_in_step_raises_hardware_error_without_rollback():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    arc = Arc(model, opt, chaos="device_error@2")
    with pytest.raises(HardwareError) as err:
        for _ in range(5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            arc.step(loss)
            opt.step()
            opt.zero_grad()
    arc.close()
    assert err.value.exit_code == ExitCode.HARDWARE
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "rank 0 on host" in str(err.value) and "device error at step 2" in str(err.value)
    assert err.value.details["kind"] == "illegal_memory_access"
    assert arc.global_step == 2 and arc.stats()["rollbacks"] == 0
    assert arc.chaos.fired == [("device_error", 2, 0)]


# ---------------------------------------------------------------------------------------------
# The launcher's bad-node rule over synthetic error files
# ---------------------------------------------------------------------------------------------


def _error_files(tmp_path, attempts: list[list[tuple]]) -> str:
    """attempts[a] = [(rank, error, host, time)] -> the launcher's error folder."""
    for a, failures in enumerate(attempts):
        for rank, err, host, t in failures:
            write_record(tmp_path, a, rank, err, host=host, time=t)
    return str(tmp_path)


def _hw(text: str, blames: bool = True) -> HardwareError:
    return HardwareError(text, device="cuda:1", kind="ecc", blames_host=blames)


def test_same_host_in_consecutive_root_causes_means_bad_node(tmp_path):
    runs = _error_files(tmp_path, [
        [(0, _hw("ECC"), "node-a", 1.0)],
        [(1, RuntimeError("Connection reset by peer"), "node-a", 2.0), (0, _hw("ECC"), "node-a", 2.1)],
        [(0, _hw("ECC"), "node-a", 3.0)],
    ])  # fmt: skip
    last, failures = scan_error_dir(runs)
    assert failures[0].device == "cuda:1" and failures[0].blames_host is True
    assert hardware_streak(failures, last) == 3
    out = decide(1, failures, last, bad_node_after=3)
    assert out.exit_code == ExitCode.BAD_NODE and "node-a" in out.reason
    assert "replace the node" in out.reason
    assert decide(1, failures, last, bad_node_after=4).exit_code == ExitCode.HARDWARE


@pytest.mark.parametrize(
    "attempts,streak",
    [
        # the host changed: only the newest run of one host counts
        ([("node-b", True), ("node-a", True), ("node-a", True)], 2),
        ([("node-a", True), ("node-b", True), ("node-a", True)], 1),
        # an NCCL timeout may be a peer's fault: it breaks the streak
        ([("node-a", True), ("node-a", True), ("node-a", False)], 0),
        ([("node-a", True), ("node-a", False), ("node-a", True)], 1),
        # an attempt that ended otherwise (no device error) breaks it too
        ([("node-a", True), None, ("node-a", True)], 1),
    ],
)
def test_host_streak_breaks(tmp_path, attempts, streak):
    spec = []
    for i, a in enumerate(attempts):
        err = RuntimeError("Connection reset by peer") if a is None else _hw("x", a[1])
        spec.append([(0, err, a[0] if a else "node-a", float(i))])
    last, failures = scan_error_dir(_error_files(tmp_path, spec))
    assert hardware_streak(failures, last) == streak
    expected = ExitCode.BAD_NODE if streak >= 2 else None
    out = decide(1, failures, last, bad_node_after=2)
    assert (out.exit_code == ExitCode.BAD_NODE) == (expected is not None), out.reason


def test_kernel_bug_is_not_blamed_on_the_host_unless_other_hosts_ran_clean(tmp_path):
    def illegal():
        return hardware_error(RuntimeError("CUDA error: an illegal memory access was encountered"))

    peer = RuntimeError("Connection reset by peer")
    # the same kernel error on every attempt of a single host: a bug in the code, not the node
    alone = [[(0, illegal(), "node-a", float(i))] for i in range(3)]
    last, failures = scan_error_dir(_error_files(tmp_path / "alone", alone))
    assert hardware_streak(failures, last) == 0
    assert decide(1, failures, last, bad_node_after=2).exit_code == ExitCode.HARDWARE
    # every host fails alike (shared log folder): still the code
    both = [
        [(0, illegal(), "node-a", i + 0.1), (1, illegal(), "node-b", i + 0.2)] for i in range(3)
    ]
    last, failures = scan_error_dir(_error_files(tmp_path / "both", both))
    assert hardware_streak(failures, last) == 0
    # only node-a's ranks hit it while node-b ran the same steps and lost its peer: the node
    one = [[(0, illegal(), "node-a", i + 0.1), (1, peer, "node-b", i + 0.2)] for i in range(2)]
    last, failures = scan_error_dir(_error_files(tmp_path / "one", one))
    assert hardware_streak(failures, last) == 2
    out = decide(1, failures, last, bad_node_after=2)
    assert out.exit_code == ExitCode.BAD_NODE and "node-a" in out.reason


def test_error_file_carries_device_and_blame(tmp_path):
    path = tmp_path / "error.json"
    err = hardware_error(RuntimeError("[Rank 1] Watchdog caught collective operation timeout: "
                                      "WorkNCCL(OpType=ALLREDUCE)"), rank=1)  # fmt: skip
    write_error_file(err, err.exit_code, path=str(path))
    f = read_error_file(str(path))
    assert f.exit_code == ExitCode.HARDWARE and f.blames_host is False and f.device == "cpu"
    write_error_file(BadNodeError("matmul failed on cuda:3"), 13, path=str(path))
    assert read_error_file(str(path)).exit_code == ExitCode.BAD_NODE
    # a plain @record file only has the class name
    path.write_text(json.dumps({"message": {"message": "BadNodeError: matmul", "extraInfo": {}}}))
    assert read_error_file(str(path)).exit_code == ExitCode.BAD_NODE


# ---------------------------------------------------------------------------------------------
# 2 real gloo ranks
# ---------------------------------------------------------------------------------------------


def _preflight_scenarios(rank: int, world_size: int) -> dict:
    out = {}
    report = preflight()
    out["clean"] = (report.ok, {c.name: c.status for c in report.checks}, report.world_size)
    os.environ["ARC_CHAOS_PREFLIGHT"] = "matmul/1"
    try:
        preflight(matmul_size=64)
        out["matmul"] = None
    except ArcError as e:
        out["matmul"] = (type(e).__name__, int(e.exit_code), str(e))
    model = nn.Linear(4, 1)
    try:  # the preflight runs inside Arc.__init__, so no Arc (and no step) exists
        Arc(model, torch.optim.SGD(model.parameters(), lr=0.1), config=ArcConfig(preflight=True))
        out["arc"] = None
    except ArcError as e:
        out["arc"] = (type(e).__name__, int(e.exit_code))
    os.environ["ARC_CHAOS_PREFLIGHT"] = "allreduce/0"
    report = preflight(raise_on_failure=False)
    out["allreduce"] = (report.ok, report.status("allreduce"), report.failed_ranks)
    del os.environ["ARC_CHAOS_PREFLIGHT"]
    out["again"] = preflight().ok  # the group is still usable
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_preflight_on_two_gloo_ranks():
    r0, r1 = run_ranks(_preflight_scenarios, 2)
    for r in (r0, r1):
        ok, statuses, world = r["clean"]
        assert ok and world == 2
        assert statuses["allreduce"] == PASSED
        assert all(statuses[n] == SKIPPED for n in DEVICE_CHECKS)
        assert r["again"] is True
        # a wrong sum is seen by every rank, whichever rank corrupted it
        assert r["allreduce"] == (False, [FAILED], ())
    # rank 1's matmul failed: it is the bad node (13), rank 0 exits for a restart (10)
    name, code, msg = r1["matmul"]
    assert (name, code) == ("BadNodeError", 13)
    assert "rank 1" in msg and "check 'matmul' on cpu" in msg
    name, code, msg = r0["matmul"]
    assert (name, code) == ("ArcError", 10) and "ranks [1] failed" in msg
    assert r1["arc"] == ("BadNodeError", 13) and r0["arc"] == ("ArcError", 10)


# ---------------------------------------------------------------------------------------------
# The launcher: real torchrun and the preflight command
# ---------------------------------------------------------------------------------------------


class _Launch:
    def __init__(self, tmp_path: Path, flags: list[str], mode: str, **env: str):
        self.markers = tmp_path / "markers"
        self.markers.mkdir()
        self.log_dir = tmp_path / "logs"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arc_dist.launch", f"--log-dir={self.log_dir}", *flags,
             str(WORKER), mode, str(self.markers)],
            cwd=tmp_path, env=clean_env(tmp_path, **env), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

    def wait(self, timeout: float = 150) -> tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            return self.proc.returncode, out
        finally:
            for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.proc.wait()

    def markers_named(self, prefix: str) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir() if p.name.startswith(prefix))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_device_error_in_a_step_exits_12_under_torchrun(tmp_path):
    """Also runs the launcher's preflight first, which passes on this CPU machine."""
    run = _Launch(tmp_path, ["--nproc-per-node=2", "--max-restarts=0", "--bad-node-after=0",
                             "--preflight"], "device_error")  # fmt: skip
    rc, out = run.wait()
    assert rc == ExitCode.HARDWARE, out
    assert "arc_dist preflight: healthy (2 local ranks)" in out
    # both workers really exited 12 (torchrun's own failure summary)
    exits = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s+exitcode\s*: (\d+)", out)
    assert sorted(exits) == [("0", "12"), ("1", "12")], out
    _, failures = scan_error_dir(str(run.log_dir / "arc-errors"))  # the launcher's folder
    by_rank = {f.rank: f for f in failures}
    assert set(by_rank) == {0, 1} and all(f.exit_code == ExitCode.HARDWARE for f in failures)
    assert "device error at step 3 (illegal_memory_access)" in by_rank[0].message
    assert "(launch_failure)" in by_rank[1].message  # raised by the forward, caught by main_entry
    # an illegal address and a launch failure are what a kernel bug looks like: no blame
    assert all(f.device == "cpu" and f.host and not f.blames_host for f in failures)
    # steps 0-2 completed on both ranks, step 3 on none: no rollback was attempted
    assert run.markers_named("step-") == [f"step-{r}-{s}" for r in (0, 1) for s in range(3)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_failing_preflight_in_arc_exits_13_before_any_step(tmp_path):
    run = _Launch(tmp_path, ["--nproc-per-node=2", "--max-restarts=3"], "preflight",
                  ARC_CHAOS_PREFLIGHT="matmul/1")  # fmt: skip
    rc, out = run.wait()
    assert rc == ExitCode.BAD_NODE, out
    assert "check 'matmul' on cpu" in out and "stopping torchrun instead of restarting" in out
    assert run.markers_named("start-0-")  # the workers ran ...
    assert run.markers_named("step-") == []  # ... and no training step did
    _, failures = scan_error_dir(str(run.log_dir / "arc-errors"))  # the launcher's folder
    first = {f.rank: f.exit_code for f in failures if f.attempt == 0}
    assert first == {0: ExitCode.RETRY, 1: ExitCode.BAD_NODE}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_launcher_preflight_failure_exits_13_without_starting_torchrun(tmp_path):
    run = _Launch(tmp_path, ["--nproc-per-node=2", "--preflight"], "preflight",
                  ARC_CHAOS_PREFLIGHT="allreduce/1")  # fmt: skip
    rc, out = run.wait()
    assert rc == ExitCode.BAD_NODE, out
    assert "torchrun not started" in out and "running:" not in out
    assert "BAD NODE" in out and "differ from the known sum" in out
    assert run.markers_named("start-") == []
    report = json.loads(next(run.log_dir.glob("preflight-*.json")).read_text())
    assert report["ok"] is False
    assert [r["checks"][-1]["status"] for r in report["ranks"]] == [FAILED, FAILED]
