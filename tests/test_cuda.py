"""On a GPU: the paths written for CUDA that the CPU suite cannot reach.

Without a GPU the device-generic tests run on the CPU (so they keep working where CI runs) and
the CUDA-only ones are skipped. One command runs them on a GPU machine with the GPU benchmarks:
``bash benchmarks/gpu_check.sh``.

What they cover there: snapshots' non-blocking device-to-host copies and their restore (exact
state after a rollback), the fault kinds recovering as on the CPU, durable checkpoints of device
tensors through the pinned staging buffers and their resume (CUDA RNG state included), fp16
autocast with a ``GradScaler`` (overflow skips, no false failure), DDP with the ride on device
buckets (gloo on one GPU; NCCL with a GPU per rank), the CUDA preflight checks, and a real
device-side error inside ``arc.step`` becoming ``HardwareError`` (exit code 12).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.errors import ExitCode

from ._dist import run_ranks
from ._launchproc import clean_env
from ._workload import EVERY_FAULT, EVERY_FAULT_EVENTS, Data, make_model, params_digest, train

_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.timeout(300)
needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs a GPU: the CUDA-only path itself")


def _device(rank: int = 0) -> torch.device:
    """This rank's GPU, or the CPU where there is none."""
    if not _CUDA:
        return torch.device("cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


class DeviceData(Data):
    """The shared workload's batches, on ``device``."""

    def __init__(self, kind: str, rank: int, device: torch.device, **kw):
        super().__init__(kind, rank, **kw)
        self.device = device
        self.eval = tuple(t.to(device) for t in self.eval)

    def next(self):
        return tuple(t.to(self.device) for t in super().next())


def _eval(model, data) -> float:
    with torch.no_grad():
        return float(data.loss(model, data.eval))


def _setup(device, chaos="", **cfg):
    model = make_model("mlp").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    arc = Arc(model, opt, sched, config=ArcConfig(snapshot_every=10, **cfg), chaos=chaos)
    return model, opt, sched, arc, DeviceData("mlp", 0, device)


def test_every_fault_kind_recovers_on_the_device():
    device = _device()
    ref_model, ref_opt, ref_sched, ref_arc, ref_data = _setup(device)
    assert train(ref_model, ref_opt, ref_arc, ref_data, 120, sched=ref_sched) == []
    model, opt, sched, arc, data = _setup(device, EVERY_FAULT)
    events = train(model, opt, arc, data, 120, max_calls=400, sched=sched)
    assert [(e[1], e[2], e[4]) for e in events] == EVERY_FAULT_EVENTS
    assert arc.global_step == 120 and arc.stats()["rollbacks"] == 3
    assert all(p.device == device for p in model.parameters())
    assert math.isfinite(_eval(model, data))
    assert _eval(model, data) <= 1.5 * _eval(ref_model, ref_data) + 0.02
    arc.close()
    ref_arc.close()


def test_a_rollback_restores_the_exact_device_state():
    device = _device()
    model, opt, _, arc, data = _setup(device, max_skips=0)
    train(model, opt, arc, data, 10)
    loss = data.loss(model, data.next())
    loss.backward()
    assert arc.step(loss).status == "healthy"  # snapshots step 10 (copied off the device)
    digest, state = params_digest(model), copy.deepcopy(opt.state_dict())
    opt.step()
    opt.zero_grad()
    loss = data.loss(model, data.next()) * float("nan")
    loss.backward()
    action = arc.step(loss)
    assert action.rolled_back and arc.global_step == 10
    assert params_digest(model) == digest
    assert all(p.device == device for p in model.parameters())
    for k, st in state["state"].items():
        for name, v in st.items():
            restored = opt.state_dict()["state"][k][name]
            assert restored.device == v.device and torch.equal(restored, v), (k, name)
    arc.close()


def test_device_checkpoints_resume_exactly_with_their_rng_state(tmp_path):
    device = _device()
    url = str(tmp_path / "ck")
    model, opt, sched, _, data = _setup(device)
    arc = Arc(model, opt, sched, checkpoint_dir=url, config=ArcConfig(checkpoint_every=10),
              chaos="")  # fmt: skip

    def settle(step):  # the previous background write ends before the next save is due
        if (step + 1) % 10 == 0:
            arc._durability.manager.wait()

    train(model, opt, arc, data, 25, sched=sched, before_step=settle)  # background saves: 10, 20
    torch.rand(3, device=device)  # the streams move on past their seeded start
    arc.save(blocking=True)  # step 25, as the state is now
    saved_params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    saved_rng = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    arc.close()  # every write has ended
    stats = arc.stats()
    assert stats["checkpoints"] == 3 and stats["rollbacks"] == 0

    torch.manual_seed(1234)  # another process's streams, another model
    if device.type == "cuda":
        torch.cuda.manual_seed_all(1234)
    fresh = make_model("mlp", seed=7).to(device)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=3e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0)
    again = Arc(fresh, fresh_opt, fresh_sched, checkpoint_dir=url, chaos="")
    assert again.resume() == 25
    for k, v in fresh.state_dict().items():
        assert v.device == device and torch.equal(v.cpu(), saved_params[k]), k
    assert torch.equal(torch.get_rng_state(), saved_rng)
    if saved_cuda is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), saved_cuda)
    # and training goes on from there
    assert train(fresh, fresh_opt, again, data, 35, sched=fresh_sched) == []
    again.close()


@needs_cuda
def test_fp16_autocast_with_a_grad_scaler_skips_overflows_and_never_fails():
    device = _device()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.GELU(), nn.Linear(256, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # a scale far too high: the first steps overflow in float16 until the scaler backs off
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)
    arc = Arc(model, opt, scaler=scaler, config=ArcConfig(snapshot_every=10), chaos="")
    data = DeviceData("mlp", 0, device)
    overflows = 0
    for _ in range(300):
        if arc.global_step >= 100:
            break
        x, y = data.next()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        action = arc.step(loss, grad_norm=norm)
        assert not action.rolled_back and action.status != "failure", action
        overflows += action.reason == "amp_overflow"
        if not action.should_skip:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
    assert arc.global_step == 100 and overflows >= 1
    assert arc.stats()["rollbacks"] == 0 and arc.stats()["failures"] == 0
    assert scaler.get_scale() < 2.0**24
    assert all(torch.isfinite(p).all() for p in model.parameters())
    arc.close()


def _ddp_worker(rank, world, chaos):
    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = make_model("mlp").to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    arc = Arc(ddp, opt, config=ArcConfig(snapshot_every=10), chaos=chaos)
    data = DeviceData("mlp", rank, device)
    events = train(ddp, opt, arc, data, 60, max_calls=200)
    out = dict(events=events, digest=params_digest(model), fast=arc._ride.fast_steps,
               backend=str(dist.get_backend()), eval=_eval(ddp, data))  # fmt: skip
    arc.close()
    return out


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",  # both ranks on one GPU: the ride on device buckets, the device row
        pytest.param(
            "nccl",
            marks=pytest.mark.skipif(
                not _CUDA or torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank"
            ),
        ),
    ],
)
def test_ddp_on_the_device_rides_and_recovers_with_identical_replicas(backend):
    clean = run_ranks(_ddp_worker, 2, "", backend=backend)
    faulty = run_ranks(
        _ddp_worker, 2, "nan_loss@20/1 grad_explosion@35/1 nan_weights@45/1", backend=backend
    )
    for results in (clean, faulty):
        r0, r1 = results
        assert r0["events"] == r1["events"]  # the same verdicts on both ranks
        assert r0["digest"] == r1["digest"]  # identical replicas
        assert r0["fast"] > 0 and r0["backend"] == backend  # most steps judged from the ride
    assert clean[0]["events"] == []
    assert [(e[2], e[4]) for e in faulty[0]["events"]] == [
        ("nonfinite_loss", False),
        ("grad_explosion", False),
        ("nonfinite_loss", False),  # NaN weights: first a NaN loss, skipped; the step after a
        ("nonfinite_weights", True),  # skip checks the weights and rolls back
    ]
    assert faulty[0]["eval"] <= 1.5 * clean[0]["eval"] + 0.02


@needs_cuda
def test_the_preflight_passes_on_a_healthy_gpu_and_finds_an_injected_fault(monkeypatch):
    from arc_dist.health import preflight

    report = preflight(devices=[_device()], nvml=False)
    assert report.ok, report
    ran = {c.name: c.status for c in report.checks}
    assert all(ran[name] == "passed" for name in ("device_count", "alloc", "matmul")), ran
    monkeypatch.setenv("ARC_CHAOS_PREFLIGHT", "matmul/0")
    report = preflight(devices=[_device()], raise_on_failure=False)
    assert not report.ok


@needs_cuda
def test_nvml_reads_the_gpu():
    pytest.importorskip("pynvml")  # the [nvml] extra (nvidia-ml-py)
    from arc_dist.health import preflight

    report = preflight(devices=[_device()])
    nvml = [c for c in report.checks if c.name == "nvml"]
    assert nvml and nvml[0].status == "passed", report


@needs_cuda
def test_a_real_device_side_error_inside_step_is_a_hardware_error(tmp_path):
    script = tmp_path / "assert_in_step.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        from arc_dist import Arc
        from arc_dist.launch import main_entry

        @main_entry
        def main():
            model = nn.Linear(4, 1).cuda()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            arc = Arc(model, opt, chaos="")
            for step in range(3):
                loss = model(torch.randn(8, 4, device="cuda")).pow(2).mean()
                loss.backward()
                if step == 2:  # an out-of-range index: a device-side assert, raised at the
                    # next synchronising call, which is inside arc.step
                    torch.zeros(1, device="cuda")[torch.tensor([5], device="cuda")]
                action = arc.step(loss)
                if not action.should_skip:
                    opt.step()
                opt.zero_grad()

        main()
    """)
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env=clean_env(tmp_path))  # fmt: skip
    assert proc.returncode == ExitCode.HARDWARE, proc.stderr[-3000:]
    assert "device-side assert" in proc.stderr, proc.stderr[-3000:]
