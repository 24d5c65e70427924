"""The training job of benchmarks/kill_soak.py: 2 DDP ranks, async checkpoints every few steps.

``python -m arc_dist.launch --nproc-per-node=2 _soak_worker.py --ckpt DIR --markers DIR ...``

Each rank appends what it does to ``MARKERS/rank<r>.jsonl`` (one JSON object a line, flushed):
``resuming`` (rank 0 adds the catalog of the checkpoint root as it is before the load: every
step directory's state and whether its files verify), ``resumed`` (the step and source),
``step`` (rank 0, every step), ``save_write`` (the first bytes of a save reached storage),
``done``. The soak kills processes on these cues and checks the claims against the catalog.

``--slow-write S`` sleeps S seconds in every write of a checkpoint file (a save stays in flight
long enough to be hit); ``--self-kill POINT:STEP`` makes rank 0 SIGKILL itself at the
manager's ``before_manifest``/``after_manifest`` point of the first save from that step on (a
save due while another writes is skipped), in the first attempt only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig
from arc_dist.launch import main_entry


def _catalog(url: str) -> list[dict]:
    from arc_dist.checkpoint import Storage, scan, verify

    storage = Storage(url)
    out = []
    for info in scan(storage):
        problems = verify(storage, info) if info.committed else []
        out.append({"step": info.step, "state": info.state, "problems": problems})
    return out


@main_entry
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--markers", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--throttle", type=float, default=0.03)
    p.add_argument("--slow-write", type=float, default=0.0)
    p.add_argument("--self-kill", default="")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    out = open(os.path.join(args.markers, f"rank{rank}.jsonl"), "a")  # noqa: SIM115

    def mark(ev: str, **kw) -> None:
        rec = {"ev": ev, "rank": rank, "restart": restart, "pid": os.getpid(), "t": time.time()}
        out.write(json.dumps({**rec, **kw}) + "\n")
        out.flush()

    torch.manual_seed(0)
    w = args.width
    model = DDP(nn.Sequential(nn.Linear(w, 4 * w), nn.Tanh(), nn.Linear(4 * w, w)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = ArcConfig(
        checkpoint_every=args.every,
        confirm_after=2,
        keep_checkpoints=2,
        local_snapshots=False,
        hang_timeout=120,
    )
    arc = Arc(model, opt, checkpoint_dir=args.ckpt, config=config)
    kill_point, _, kill_step = args.self_kill.partition(":")
    written: set[int] = set()

    def hook(point: str, detail) -> None:
        if point == "write":
            job = arc._durability.manager._current  # the save in flight
            step = job.step if job is not None else -1
            if step not in written:
                written.add(step)
                mark("save_write", step=step)
            if args.slow_write:
                time.sleep(args.slow_write)
        elif point == kill_point and restart == 0 and int(detail) >= int(kill_step):
            mark("self_kill", point=point, step=int(detail))
            os.kill(os.getpid(), signal.SIGKILL)

    arc._durability.manager.fault_hook = hook  # the manager's test-only fault injector
    mark("resuming", catalog=_catalog(args.ckpt) if rank == 0 else None)
    start = arc.resume()
    mark("resumed", step=start, source=arc.stats()["resume_source"])
    g = torch.Generator().manual_seed(1234 + rank)
    while arc.global_step < args.steps:
        x = torch.randn(32, w, generator=g)
        loss = (model(x) - x.flip(1)).pow(2).mean()
        loss.backward()
        if not arc.step(loss).should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            mark("step", step=arc.global_step)
        time.sleep(args.throttle)
    arc.close()
    mark("done", step=arc.global_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
