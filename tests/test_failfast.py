"""An error on one rank inside ``Arc.step`` reaches every rank, named (arc_dist/failfast.py).

Real 2-rank gloo groups; rank 1 makes a mistake that rank 0 does not. Where every rank judges
the step through Arc's own collective, the failing rank stays alive after its error (a script
that catches it, or one stuck in its own clean-up) and waits for rank 0 to report its error,
for less than the group's collective timeout (60 s in tests/_dist.py): before fail-fast, rank 0
waited in the collective until that timeout. Where rank 0 judged the step from DDP's ride and
went on, it fails in its next backward as soon as the failing process ends (as an uncaught error
ends it), naming the failing rank too.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig, ExitCode, PeerError
from arc_dist.elastic.exitcodes import read_error_file

from ._dist import run_ranks
from ._workload import Data, make_model

pytestmark = pytest.mark.timeout(150)

CAUSES = {
    "loss": ("ValueError", "needs the scalar loss tensor"),
    "grad_norm": ("TypeError", "takes a tensor or a float, got str"),
}


def _worker(rank, world, layout, fault, fail_at, linger, outdir):
    os.environ["TORCHELASTIC_ERROR_FILE"] = os.path.join(outdir, f"error{rank}.json")
    model = make_model("mlp")
    if layout == "ddp":
        model = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    arc = Arc(model, opt, config=ArcConfig(snapshot_every=10), chaos="")
    data = Data("mlp", rank)
    flag = os.path.join(outdir, "rank0_failed")
    out = dict(steps=0)
    in_step = False
    try:
        while arc.global_step < fail_at + 5:
            loss = data.loss(model, data.next())
            loss.backward()
            in_step = True
            if rank == 1 and arc.global_step == fail_at:
                if fault == "loss":
                    arc.step(loss.reshape(1).expand(2))  # a non-scalar loss on this rank only
                else:
                    arc.step(loss, grad_norm="1.0")  # a bad grad_norm on this rank only
            action = arc.step(loss)
            in_step = False
            if not action.should_skip:
                opt.step()
            opt.zero_grad(set_to_none=True)
            out["steps"] += 1
    except Exception as e:  # noqa: BLE001 - what each rank raised is the test's subject
        out.update(type=type(e).__name__, error=str(e), peer_rank=getattr(e, "rank", None))
        if in_step:  # the ranks are out of step: Arc refuses to go on
            with pytest.raises(RuntimeError, match="out of step"):
                arc.step(loss)
        if rank == 0:
            open(flag, "w").close()
        elif linger:
            deadline = time.monotonic() + 45  # below the 60 s collective timeout
            while not os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.05)
            out["rank0_failed_while_alive"] = os.path.exists(flag)
    return out


def _check(tmp_path, layout, fault, fail_at, linger):
    os.chmod(tmp_path, 0o777)
    r0, r1 = run_ranks(_worker, 2, layout, fault, fail_at, linger, str(tmp_path), timeout=120)
    error_type, cause = CAUSES[fault]
    assert r1["type"] == error_type and cause in r1["error"]  # its own error
    assert f"rank 1 at step {fail_at}: {error_type}" in r0["error"] and cause in r0["error"], r0
    # the exit record of the failing rank, written before it joined or raised
    record = read_error_file(str(tmp_path / "error1.json"))
    assert record.rank == 1 and record.exit_code == ExitCode.RETRY
    assert record.message.startswith(error_type) and cause in record.message
    return r0, r1


@pytest.mark.parametrize(
    "layout,fault,fail_at",
    [
        ("independent", "grad_norm", 3),  # without DDP every step runs Arc's own collective
        ("ddp", "loss", 10),  # a snapshot step: no judging from DDP's ride alone
    ],
)
def test_the_others_raise_at_once_while_the_failing_rank_lingers(tmp_path, layout, fault, fail_at):
    r0, r1 = _check(tmp_path, layout, fault, fail_at, linger=True)
    assert r1["rank0_failed_while_alive"], r0
    assert r0["type"] == PeerError.__name__ and r0["peer_rank"] == 1
    assert r0["steps"] == r1["steps"] == fail_at  # both stopped at the same step


def test_after_a_step_judged_from_the_ride_the_others_fail_in_their_next_backward(tmp_path):
    # step 3 is judged from DDP's ride: rank 0 went on to the next step's backward, whose
    # all-reduce fails when rank 1's process ends, naming rank 1's error
    r0, r1 = _check(tmp_path, "ddp", "loss", 3, linger=False)
    assert r0["steps"] == 4 and r1["steps"] == 3
    assert "PeerError" in r0["error"]  # raised by DDP's communication hook, wrapped by DDP
