"""The baseline for benchmarks/recovery.py: the same GPT and data (examples/gpt.py) under plain DDP,
with a ``torch.save`` checkpoint every ``--checkpoint-every`` steps (rank 0 writes to a temporary
name and renames it) and ``torch.load`` on every (re)start. No arc-dist in the loop. Writes the
JSON events of tests/workers/train_worker.py (start, first_step, step) to ``--report``.
"""

from __future__ import annotations

# ruff: noqa: E402 (the first line takes a timestamp before the imports)
import time

T_MAIN = time.time()  # before the imports, as in train_worker.py

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests", "workers")]
from gpt import GPT, get_batch, load_corpus, loss_fn  # noqa: E402
from train_ddp import setup  # noqa: E402
from train_worker import build_parser, process_started, report  # noqa: E402


def main() -> None:
    stamps = {"t_process": process_started(), "t_main": T_MAIN, "t_imported": time.time()}
    args = build_parser("plain DDP + torch.save baseline").parse_args()
    device, rank, world = setup(args)
    stamps["t_pg"] = time.time()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    data = load_corpus(args.corpus_bytes)
    torch.manual_seed(args.seed)
    model = DDP(GPT(args.block_size, args.n_layer, args.n_head, args.n_embd))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    path = os.path.join(args.checkpoint_dir, "ckpt.pt")
    step = 0
    stamps["t_resume"] = time.time()
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu")
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    report(
        args.report,
        event="start",
        rank=rank,
        pid=os.getpid(),
        restart=restart,
        world=world,
        step=step,
        **stamps,
    )
    first = True
    while step < args.steps:
        x, y = get_batch(data, step=step, rank=rank, batch_size=args.batch_size,
                         block_size=args.block_size, seed=args.seed)  # fmt: skip
        loss = loss_fn(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if rank == 0 and step % args.checkpoint_every == 0:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            torch.save(
                {"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step},
                path + ".tmp",
            )
            os.replace(path + ".tmp", path)
        if first:
            report(args.report, event="first_step", rank=rank, restart=restart, step=step)
            first = False
        if args.throttle:
            time.sleep(args.throttle)
        if rank == 0 and step % args.log_every == 0:
            report(
                args.report,
                event="step",
                rank=rank,
                restart=restart,
                world=world,
                step=step,
                loss=float(loss),
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
