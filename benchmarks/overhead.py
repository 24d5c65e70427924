"""Step-time overhead of Arc against the same loop without it, in one invocation.

For each model size, plain and Arc-protected loops alternate (``--rounds`` times, ``--steps``
each) in the same processes, and the median step times are compared. Also reports collectives
and host syncs per step, snapshot time against a plain memcpy of the same bytes, and rollback
latency.

    python benchmarks/overhead.py                    # 1 process
    torchrun --standalone --nproc-per-node 2 benchmarks/overhead.py   # 2-rank DDP (gloo)

With the original single-process ARC installed (``pip install arc-training scipy``: AGPL,
used here as a benchmark baseline only, never a dependency), ``--with-arc-training`` adds a
third twin under its ``arc.core.controller.Controller`` on the same loop.
``--divergence-every 0,10,100`` adds Arc twins with those replica-divergence intervals (the
check only runs under DDP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig

SIZES = {"1M": 512, "4M": 1024, "25M": 2560}  # hidden width of a 4-layer MLP


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(256, width), nn.GELU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers += [nn.Linear(width, 256)]
    return nn.Sequential(*layers)


CLIP = None  # --clip: every twin clips its gradients; Arc reuses the norm


def run(model, opt, arc, x, y, steps: int) -> float:
    """Median seconds per step over ``steps`` steps (``arc``: any controller whose
    ``step(loss)`` returns an object with ``should_skip``, or None)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) if CLIP else None
        if arc is None:
            skip = False
        elif norm is not None and isinstance(arc, Arc):
            skip = arc.step(loss, grad_norm=norm).should_skip
        else:
            skip = arc.step(loss).should_skip
        if not skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(
    name: str,
    width: int,
    rounds: int,
    steps: int,
    batch: int,
    other: bool = False,
    divergence: tuple[int, ...] = (),
) -> dict:
    """Two identical replicas of the job, one plain and one under Arc, trained in alternation."""
    distributed = dist.is_initialized()

    def job():
        net = mlp(width)
        model = DDP(net) if distributed else net
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    plain_model, plain_opt = job()
    model, opt = job()
    nparams = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(dist.get_rank() if distributed else 0)
    x, y = torch.randn(batch, 256, generator=g), torch.randn(batch, 256, generator=g)
    arc = Arc(model, opt, config=ArcConfig(snapshot_every=100), chaos="")
    twins = [(plain_model, plain_opt, None), (model, opt, arc)]
    if other:
        from arc.core.controller import Controller  # the original ARC (arc-training)

        other_model, other_opt = job()
        twins.append((other_model, other_opt, Controller(other_model, other_opt)))
    for every in divergence:  # the same job under Arc with other divergence-check intervals
        m_, o_ = job()
        cfg = ArcConfig(snapshot_every=100, divergence_every=every)
        twins.append((m_, o_, Arc(m_, o_, config=cfg, chaos="")))
    for m_, o_, c_ in twins:
        run(m_, o_, c_, x, y, 3)  # warm-up (and Arc's first snapshot)
    times: list[list[float]] = [[] for _ in twins]
    calls0, syncs0, coll0 = arc._calls, arc.stats()["host_syncs"], arc.stats()["collectives"]
    for _ in range(rounds):
        for t, (m_, o_, c_) in zip(times, twins):
            t.append(run(m_, o_, c_, x, y, steps))
    plain, with_arc = times[0], times[1]
    st = arc.stats()
    calls = arc._calls - calls0
    # snapshot cost against a memcpy of the same bytes
    snap_t, copy_t = [], []
    tensors = [t.detach() for t in model.state_dict().values()] + [
        v
        for s in opt.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    ]
    dst = [torch.empty_like(t) for t in tensors]
    for _ in range(5):
        t0 = time.perf_counter()
        arc._take_snapshot()
        snap_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for d, s in zip(dst, tensors):
            d.copy_(s)
        copy_t.append(time.perf_counter() - t0)
    # rollback latency: a NaN loss forces one
    loss = nn.functional.mse_loss(model(x), y) * float("nan")
    loss.backward()
    t0 = time.perf_counter()
    action = arc.step(loss)
    rollback = time.perf_counter() - t0
    assert action.rolled_back
    opt.zero_grad(set_to_none=True)
    arc.close()
    p, a = statistics.median(plain), statistics.median(with_arc)
    extra = {}
    if other:
        o = statistics.median(times[2])
        extra = dict(arc_training_ms=1e3 * o, arc_training_overhead_pct=100 * (o / p - 1))
    first = 3 if other else 2
    extra["divergence"] = {
        every: 100 * (statistics.median(t) / p - 1) for every, t in zip(divergence, times[first:])
    }
    return dict(
        **extra,
        model=name,
        params=nparams,
        plain_ms=1e3 * p,
        arc_ms=1e3 * a,
        overhead_pct=100 * (a / p - 1),
        collectives_per_step=(st["collectives"] - coll0) / calls,
        host_syncs_per_step=(st["host_syncs"] - syncs0) / calls,
        snapshot_ms=1e3 * statistics.median(snap_t),
        memcpy_ms=1e3 * statistics.median(copy_t),
        rollback_ms=1e3 * rollback,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,4M,25M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--clip",
        type=float,
        default=None,
        help="every twin clips gradients to this norm; Arc reuses the norm it returns",
    )
    ap.add_argument(
        "--divergence-every",
        default="",
        help="comma-separated divergence-check intervals to time as extra Arc twins "
        "(0 = off), e.g. 0,10,100",
    )
    ap.add_argument(
        "--with-arc-training",
        action="store_true",
        help="also time the original ARC (pip install arc-training scipy)",
    )
    args = ap.parse_args()
    if "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
    torch.set_num_threads(1 if dist.is_initialized() else 2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    global CLIP
    CLIP = args.clip
    divergence = tuple(int(v) for v in args.divergence_every.split(",") if v.strip())
    rows = [
        bench(s, SIZES[s], args.rounds, args.steps, args.batch, args.with_arc_training, divergence)
        for s in args.sizes.split(",")
    ]
    if rank == 0:
        if args.json:
            print(json.dumps(rows))
        clip = f", all twins clip to {args.clip} (Arc reuses the norm)" if args.clip else ""
        print(
            f"world size {world}, batch {args.batch}/rank, median of {args.rounds} rounds x {args.steps} steps{clip}"
        )
        print(
            "| model | params | plain ms/step | Arc ms/step | overhead | collectives/step | host syncs/step | snapshot ms | memcpy ms | rollback ms |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['plain_ms']:.1f} | {r['arc_ms']:.1f} | "
                f"{r['overhead_pct']:+.1f}% | {r['collectives_per_step']:.0f} | {r['host_syncs_per_step']:.0f} | "
                f"{r['snapshot_ms']:.1f} | {r['memcpy_ms']:.1f} | {r['rollback_ms']:.1f} |"
            )
        if divergence:
            print("\n| model | " + " | ".join(f"divergence_every={v}" for v in divergence) + " |")
            print("|---|" + "---|" * len(divergence))
            for r in rows:
                print(
                    f"| {r['model']} | "
                    + " | ".join(f"{r['divergence'][v]:+.1f}%" for v in divergence)
                    + " |"
                )
        if args.with_arc_training:
            print("\n| model | original ARC ms/step | original ARC overhead |\n|---|---|---|")
            for r in rows:
                print(
                    f"| {r['model']} | {r['arc_training_ms']:.1f} | {r['arc_training_overhead_pct']:+.1f}% |"
                )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
