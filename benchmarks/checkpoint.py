"""Checkpoint speed on this machine, in one invocation: save throughput, async stall, resume time.

For each model size (an MLP with AdamW, so the checkpoint holds ~3x the parameter bytes) and
``--rounds`` rounds, medians of:

* **sync save**: ``CheckpointManager.save(blocking=True)``: DCP write with checksums computed
  while writing, fsync, manifest commit;
* **raw write**: the same number of bytes written sequentially to one file with one fsync (the
  disk's ceiling);
* **torch.save**: ``torch.save`` of the same state dict to one file, plus fsync;
* **async stall**: how long ``save(blocking=False)`` of a bare ``CheckpointManager`` holds the
  training thread (state dict + copy to the reused CPU staging buffers); the write itself
  overlaps training;
* **Arc stall**: as ``Arc`` sees it: the extra time of an ``arc.step`` that checkpoints (in the
  background) over the previous snapshot step that does not; a checkpoint step that is also a
  snapshot step writes the snapshot's host copies, so the state is not copied twice;
* **resume**: ``load`` into a fresh model and optimizer, checksums verified (and without).

    python benchmarks/checkpoint.py                       # sizes 5M,25M params, 9 rounds
    python benchmarks/checkpoint.py --sizes 5M --rounds 3 --dir /mnt/nvme/tmp --json out.json
    python benchmarks/checkpoint.py --device cuda        # the state on the GPU (pinned staging)

Targets: sync save throughput >= 80% of the raw write; async stall <= 5% of the sync save.
The Arc stall is paired with the sync save of the same round.
Ratios are medians of per-round ratios (each round measures the pair back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from torch import nn

from arc_dist import Arc, ArcConfig
from arc_dist.checkpoint import CheckpointManager, TrainState

SIZES = {"5M": 1120, "25M": 2500, "50M": 3536}  # hidden width of a 4-layer square MLP
DEVICE = torch.device("cpu")  # --device


def make(width: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)]).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=DEVICE)).sum().backward()
    opt.step()  # optimizer state exists, as in a real run
    opt.zero_grad(set_to_none=True)
    return model, opt


def fsync_write(path: str, chunks) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def arc_step_times(width: int, rounds: int, url: str) -> tuple[list[float], list[float]]:
    """``arc.step`` times of snapshot steps without and with a background checkpoint, paired."""
    model, opt = make(width)
    cfg = ArcConfig(
        snapshot_every=2, checkpoint_every=4, confirm_after=0, keep_checkpoints=2,
        local_snapshots=False,
    )  # fmt: skip
    arc = Arc(model, opt, checkpoint_dir=url, config=cfg)
    x = torch.randn(2, width, device=DEVICE)
    plain, ckpt = [], []
    while len(ckpt) < rounds:
        step = arc.global_step
        loss = model(x).pow(2).mean()
        loss.backward()
        t0 = time.perf_counter()
        action = arc.step(loss)
        dt = time.perf_counter() - t0
        if not action.should_skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if step and step % 4 == 0 and len(plain) > len(ckpt):
            ckpt.append(dt)
            arc._durability.manager.wait()  # the next checkpoint is not skipped
        elif step and step % 4 == 2:
            plain.append(dt)
    arc.close()
    return plain[: len(ckpt)], ckpt


def bench(name: str, width: int, rounds: int, root: str) -> dict:
    model, opt = make(width)
    app = {"train": TrainState(model, opt)}
    nparams = sum(p.numel() for p in model.parameters())
    url = os.path.join(root, f"ck-{name}")
    mgr = CheckpointManager(url, keep=2, confirm_after=0)
    sync, raw, tsave, stall, async_total, load_v, load_nv = [], [], [], [], [], [], []
    nbytes = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        mgr.save(2 * r, app, blocking=True)
        sync.append(time.perf_counter() - t0)
        nbytes = mgr.stats()["checkpoint_bytes"]

        blob = bytearray(os.urandom(1 << 20)) * (nbytes >> 20) + bytearray(nbytes % (1 << 20))
        path = os.path.join(root, "raw.bin")
        t0 = time.perf_counter()
        fsync_write(
            path, [memoryview(blob)[i : i + (8 << 20)] for i in range(0, len(blob), 8 << 20)]
        )
        raw.append(time.perf_counter() - t0)
        del blob
        os.remove(path)

        sd = app["train"].state_dict()
        path = os.path.join(root, "torch_save.pt")
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        tsave.append(time.perf_counter() - t0)
        os.remove(path)
        del sd

        t0 = time.perf_counter()
        mgr.save(2 * r + 1, app, blocking=False)
        stall.append(time.perf_counter() - t0)
        mgr.wait()
        async_total.append(time.perf_counter() - t0)

    for verify, out in ((True, load_v), (False, load_nv)):
        for _ in range(rounds):
            fresh, fopt = make(width, seed=1)
            m2 = CheckpointManager(
                url, confirm_after=0, verify_on_load=verify, check_writable=False
            )
            t0 = time.perf_counter()
            step = m2.load({"train": TrainState(fresh, fopt)})
            out.append(time.perf_counter() - t0)
            m2.close()
            assert step == 2 * rounds - 1
            assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    mgr.close()
    plain, ckpt = arc_step_times(width, rounds, os.path.join(root, f"arc-{name}"))
    extra = [c - p for p, c in zip(plain, ckpt)]
    med = statistics.median
    res = {
        "size": name,
        "params": nparams,
        "checkpoint_mb": nbytes / 1e6,
        "sync_save_s": med(sync),
        "raw_write_s": med(raw),
        "torch_save_s": med(tsave),
        "async_stall_s": med(stall),
        "arc_stall_s": med(extra),
        "arc_snapshot_step_s": med(plain),
        "async_total_s": med(async_total),
        "resume_s": med(load_v),
        "resume_noverify_s": med(load_nv),
    }
    res["save_mb_s"] = res["checkpoint_mb"] / res["sync_save_s"]
    res["raw_mb_s"] = res["checkpoint_mb"] / res["raw_write_s"]
    # ratios are paired per round (measured back to back) and then the median is taken: on a
    # shared machine the disk's speed drifts more between rounds than within one
    res["throughput_vs_raw"] = med(r / s for r, s in zip(raw, sync))
    res["throughput_vs_torch_save"] = med(t / s for t, s in zip(tsave, sync))
    res["stall_vs_sync"] = med(a / s for a, s in zip(stall, sync))
    res["arc_stall_vs_sync"] = med(e / s for e, s in zip(extra, sync))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5M,25M", help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model and optimizer state live")  # fmt: skip
    args = ap.parse_args()
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible (torch.cuda.is_available() is False)")
    DEVICE = torch.device(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    root = tempfile.mkdtemp(prefix="arc-ckpt-bench-", dir=args.dir)
    try:
        results = [bench(s, SIZES[s], args.rounds, root) for s in args.sizes.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs (load average {load}), state on "
        f"{args.device}, medians of "
        f"{args.rounds} rounds, dir {args.dir or tempfile.gettempdir()}"
    )
    print(
        f"{'size':>5} {'ckpt MB':>8} {'save MB/s':>9} {'raw MB/s':>9} {'vs raw':>7} "
        f"{'torch.save s':>12} {'vs t.save':>9} {'sync s':>7} {'stall s':>8} {'stall/sync':>10} "
        f"{'arc stall s':>11} {'/sync':>6} {'resume s':>8} {'(no verify)':>11}"
    )
    for r in results:
        print(
            f"{r['size']:>5} {r['checkpoint_mb']:>8.0f} {r['save_mb_s']:>9.0f} {r['raw_mb_s']:>9.0f} "
            f"{r['throughput_vs_raw']:>7.0%} {r['torch_save_s']:>12.3f} {r['throughput_vs_torch_save']:>9.0%} "
            f"{r['sync_save_s']:>7.3f} {r['async_stall_s']:>8.3f} {r['stall_vs_sync']:>10.1%} "
            f"{r['arc_stall_s']:>11.3f} {r['arc_stall_vs_sync']:>6.1%} "
            f"{r['resume_s']:>8.3f} {r['resume_noverify_s']:>11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
