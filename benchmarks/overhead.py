"""Step-time overhead of Arc against the same loop without it, in one invocation.

For each model size, plain and Arc-protected loops alternate (``--rounds`` times, ``--steps``
each) in the same processes, and the median step times are compared. Also reports collectives
and host syncs per step, snapshot time against a plain memcpy of the same bytes, and rollback
latency.

    python benchmarks/overhead.py                    # 1 process
    torchrun --standalone --nproc-per-node 2 benchmarks/overhead.py   # 2-rank DDP (gloo)
    torchrun --standalone --nproc-per-node 2 benchmarks/overhead.py --paired 300 --sizes 1M,4M

``--paired N`` alternates single steps of the twins for N pairs and reports the median and p99
of the per-pair ratios to the plain step, which stays meaningful when other jobs load the
machine. The twins: plain, Arc, Arc with ``ride_ddp=False``, and benchmark code only: a naive
one-collective design (a per-step all-reduce of the loss and gradient norm plus its host sync),
the floor (its gradient-norm pass alone, nothing shared) and an overlap sketch (:class:`Overlap`).
``--attribution N`` times the parts of the overhead over N steps of each twin (DDP's C++ hook
against torch's and Arc's Python hooks, with and without the per-bucket norms, the division
pass any comm hook adds, one fused norm pass, ``Arc.step`` on ordinary, deep-check and snapshot
steps with and without the ride, a naive all-reduce + host sync, Python heap and torch ops per
``Arc.step``).

With the original single-process ARC installed (``pip install arc-training scipy``: AGPL,
used here as a benchmark baseline only, never a dependency), ``--with-arc-training`` adds a
third twin under its ``arc.core.controller.Controller`` on the same loop.
``--divergence-every 0,10,100`` adds Arc twins with those replica-divergence intervals (the
check only runs under DDP).

``--device cuda`` runs the models on the GPU (one per rank under torchrun, NCCL when there is
one per rank, else gloo); every twin's timed step then ends with a device synchronisation, so
a step's time includes its kernels (``--attribution`` stays CPU-only).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import tracemalloc

import torch
import torch.distributed as dist
import torch.utils._python_dispatch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig

SIZES = {"1M": 512, "4M": 1024, "25M": 2560, "80M": 5120}  # hidden width of a 5-layer MLP


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(256, width), nn.GELU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers += [nn.Linear(width, 256)]
    return nn.Sequential(*layers)


CLIP = None  # --clip: every twin clips its gradients; Arc reuses the norm
DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    """End of a timed step: the device's queued kernels are done (nothing to do on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def wrap(net: nn.Module) -> nn.Module:
    """``net`` on the benchmark's device, under DDP when torch.distributed is initialized."""
    net = net.to(DEVICE)
    if not dist.is_initialized():
        return net
    return DDP(net, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)


def job(width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One twin: the MLP of ``width`` (see :func:`wrap`) and its AdamW."""
    model = wrap(mlp(width))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's fixed batch, on the device."""
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    x, y = torch.randn(batch, 256, generator=g), torch.randn(batch, 256, generator=g)
    return x.to(DEVICE), y.to(DEVICE)


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
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive_step(model, opt, x, y, agree: bool = True) -> float:
    """One step of the naive design: after backward, one small all-reduce of (loss, gradient
    squared norm) and the host sync to read it; skip the update on a non-finite value.

    ``agree=False`` is the floor of any design that checks the gradients: the norm pass (or the
    loop's clipping) and reading it, nothing shared (under DDP the averaged gradients, hence
    their norm, are the same on every rank; the ranks' losses stay unseen)."""
    t0 = time.perf_counter()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if CLIP:
        sq = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).square()
    else:
        sq = torch.stack(torch._foreach_norm(grads)).square().sum()
    sig = torch.stack([loss.detach(), sq])
    if agree and dist.is_initialized():
        dist.all_reduce(sig)
    if all(math.isfinite(v) for v in sig.tolist()):
        opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


class Overlap:
    """A design sketch, benchmark code only: DDP keeps its C++ path (no comm hook), and a small
    all-reduce of what is known before backward (the previous step's loss, a flag) starts on a
    side group as backward begins, so it overlaps the backward pass; after backward one norm pass
    of the averaged gradients (the same on every rank), the wait (done by then) and one host
    read."""

    def __init__(self, model, opt) -> None:
        self.model, self.opt = model, opt
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.sig = torch.zeros(2)
        self.prev_loss = 0.0

    def step(self, x, y) -> float:
        t0 = time.perf_counter()
        out = self.model(x)
        work = []
        if self.group is not None:
            self.sig[0], self.sig[1] = self.prev_loss, 1.0

            def launch(grad):  # the first thing backward computes: the output's gradient
                work.append(dist.all_reduce(self.sig, group=self.group, async_op=True))

            out.register_hook(launch)
        loss = nn.functional.mse_loss(out, y)
        loss.backward()
        if CLIP:
            sq = torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP).square()
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            sq = torch.stack(torch._foreach_norm(grads)).square().sum()
        for w in work:
            w.wait()
        vals = self.sig.tolist() + torch.stack([sq, loss.detach().reshape(())]).tolist()
        if all(math.isfinite(v) for v in vals):
            self.opt.step()
        self.prev_loss = vals[-1]
        self.opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def paired(name: str, width: int, pairs: int, batch: int, other: bool = False) -> dict:
    """Single steps of plain, Arc, naive (and the original ARC) twins in alternation; per-pair
    ratios to the plain step. The twins' order rotates so no twin always follows another."""
    x, y = inputs(batch)
    plain, with_arc, naive, floor = (job(width) for _ in range(4))
    overlap = Overlap(*job(width))
    arc = Arc(*with_arc, config=ArcConfig(snapshot_every=100), chaos="")
    collective = job(width)
    arc_coll = Arc(*collective, config=ArcConfig(snapshot_every=100, ride_ddp=False), chaos="")
    steps = {
        "plain": lambda: run(*plain, None, x, y, 1),
        "arc": lambda: run(*with_arc, arc, x, y, 1),
        "arc, ride_ddp=False": lambda: run(*collective, arc_coll, x, y, 1),
        "naive": lambda: naive_step(*naive, x, y),
        "floor": lambda: naive_step(*floor, x, y, agree=False),
        "overlap": lambda: overlap.step(x, y),
    }
    if other:
        from arc.core.controller import Controller  # the original ARC (arc-training)

        o_model, o_opt = job(width)
        ctrl = Controller(o_model, o_opt)
        steps["arc-training"] = lambda: run(o_model, o_opt, ctrl, x, y, 1)
    for _ in range(5):  # warm-up (and Arc's first snapshot)
        for f in steps.values():
            f()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    snapshot_pair: list[bool] = []
    for i in range(pairs):
        snapshot_pair.append(arc.global_step % arc.config.snapshot_every == 0)
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(steps[n]())
    arc.close()
    arc_coll.close()
    base = times["plain"]
    out = dict(model=name, params=sum(p.numel() for p in plain[0].parameters()), pairs=pairs)
    out["plain_ms"] = 1e3 * statistics.median(base)
    for n in names[1:]:
        r = [t / b for t, b in zip(times[n], base)]
        r_ns = [v for v, snap in zip(r, snapshot_pair) if not snap]
        out[n] = dict(
            ms=1e3 * statistics.median(times[n]),
            median=statistics.median(r),
            p99=pct(r, 0.99),
            max_no_snapshot=max(r_ns),
            over_1_5=sum(v > 1.5 for v in r_ns),
        )
    return out


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops dispatched inside it."""

    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _sum_hook(pg, bucket):
    """A Python comm hook that all-reduces without dividing (timing only: sums, not means)."""
    fut = dist.all_reduce(bucket.buffer(), group=pg, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def attribution(name: str, width: int, steps: int, batch: int) -> dict:
    """Where Arc's step overhead goes: each part timed in one run, twins in alternation."""
    if not dist.is_initialized():
        raise SystemExit("--attribution needs torchrun (2 ranks): the parts are DDP's")
    if DEVICE.type != "cpu":
        raise SystemExit("--attribution times CPU steps without device synchronisation: CPU only")

    x, y = inputs(batch)
    plain, hooked, hooked_nonorm, py_hook, py_sum = (job(width) for _ in range(5))
    # torch's own Python all-reduce hook: what any Python comm hook costs against DDP's C++ one
    py_hook[0].register_comm_hook(None, default_hooks.allreduce_hook)
    # the same hook without its division pass (timing only: its gradients are sums). Without a
    # comm hook DDP divides while copying the gradients into the buckets; with any hook it
    # copies, and the hook divides: one more pass over the gradients
    py_sum[0].register_comm_hook(None, _sum_hook)
    cfg = ArcConfig(snapshot_every=100, ride_ddp=False)
    ride = ArcConfig(snapshot_every=100, ride_ddp=True)
    arcs = {}  # Arc's own collective per step, and riding on DDP's all-reduce
    for key, c in (("arc", cfg), ("arc_ride", ride)):
        m_, o_ = job(width)
        arcs[key] = (m_, o_, Arc(m_, o_, config=c, chaos=""))
    rides = {}
    for key, twin in (("hook", hooked), ("hook_nonorm", hooked_nonorm)):
        rides[key] = Arc(*twin, config=ride, chaos="")._ride  # its hook only; step() never runs
    t: dict[str, list[float]] = {
        k: []
        for k in (
            "plain_bwd", "norm", "naive_coll", "hook_bwd", "hook_nonorm_bwd", "py_hook_bwd",
            "py_sum_bwd", "arc_bwd",
            "arc_ride_bwd",
        )
    }  # fmt: skip
    by_kind = {key: {"fast": [], "deep": [], "snapshot": []} for key in arcs}
    sig = torch.zeros(2)

    def fwd_bwd(model) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss, time.perf_counter() - t0

    for i in range(steps + 5):
        keep = i >= 5  # the first five warm up
        model, opt = plain
        loss, dt = fwd_bwd(model)
        t0 = time.perf_counter()
        sq = torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).square().sum()
        t1 = time.perf_counter()
        sig[0], sig[1] = loss.detach(), sq
        dist.all_reduce(sig)
        sig.tolist()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if keep:
            t["plain_bwd"].append(dt)
            t["norm"].append(t1 - t0)
            t["naive_coll"].append(t2 - t1)
        for key, (model, opt) in (
            ("hook", hooked), ("hook_nonorm", hooked_nonorm), ("py_hook", py_hook),
            ("py_sum", py_sum),
        ):  # fmt: skip
            _, dt = fwd_bwd(model)
            if key in rides:  # the norm of the reduced buckets is taken after backward
                t0 = time.perf_counter()
                taken = rides[key].take()
                if key == "hook":
                    rides[key].with_grad_norm(taken, None)
                dt += time.perf_counter() - t0
            opt.step()
            opt.zero_grad(set_to_none=True)
            if keep:
                t[key + "_bwd"].append(dt)
        for key, (model, opt, arc) in arcs.items():
            kind = (
                "snapshot"
                if arc.global_step % cfg.snapshot_every == 0
                else "deep"
                if arc._calls % cfg.deep_check_every == 0
                else "fast"
            )
            loss, dt = fwd_bwd(model)
            t0 = time.perf_counter()
            skip = arc.step(loss).should_skip
            t1 = time.perf_counter()
            if not skip:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if keep:
                t[key + "_bwd"].append(dt)
                by_kind[key][kind].append(t1 - t0)
    # Python heap and torch ops inside Arc.step on ordinary steps of both twins (traced apart:
    # tracing slows; no comm-hook callbacks run on other threads while Arc.step runs)
    # tracing stays on across the loop: starting and stopping it per step crashed here
    heap: dict[str, list[int]] = {key: [] for key in arcs}
    ops: dict[str, list[int]] = {key: [] for key in arcs}
    tracemalloc.start()
    for _ in range(20):
        for key, (model, opt, arc) in arcs.items():
            loss, _ = fwd_bwd(model)
            if arc._calls % cfg.deep_check_every == 0 or arc.global_step % cfg.snapshot_every == 0:
                arc.step(loss)
            else:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                with _CountOps() as counter:
                    arc.step(loss)
                heap[key].append(tracemalloc.get_traced_memory()[1] - before)
                ops[key].append(counter.n)
            opt.step()
            opt.zero_grad(set_to_none=True)
    tracemalloc.stop()
    for _, _, a in arcs.values():
        a.close()
    med = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    kinds = {
        key: {k: 1e3 * statistics.median(v) if v else float("nan") for k, v in kv.items()}
        for key, kv in by_kind.items()
    }
    n = sum(len(v) for v in by_kind["arc"].values())
    share = {k: len(v) / n for k, v in by_kind["arc"].items()}
    return dict(
        model=name,
        params=sum(p.numel() for p in plain[0].parameters()),
        steps=steps,
        **med,
        arc_step=kinds,
        arc_step_share=share,
        heap_bytes_per_arc_step={k: statistics.median(v) for k, v in heap.items() if v},
        torch_ops_per_arc_step={k: statistics.median(v) for k, v in ops.items() if v},
    )


def print_attribution(rows: list[dict]) -> None:
    for r in rows:
        s = r["arc_step_share"]
        print(f"\n{r['model']} ({r['params'] / 1e6:.1f}M params), medians of {r['steps']} steps")
        print("| part | ms/step |\n|---|---|")
        for label, v in (
            ("plain DDP forward+backward (C++ all-reduce hook)", r["plain_bwd"]),
            ("+ torch's Python allreduce_hook instead", r["py_hook_bwd"] - r["plain_bwd"]),
            ("  of which its division pass", r["py_hook_bwd"] - r["py_sum_bwd"]),
            ("+ Arc's Python comm hook, no norms", r["hook_nonorm_bwd"] - r["plain_bwd"]),
            ("+ per-bucket norms of the reduced buckets", r["hook_bwd"] - r["hook_nonorm_bwd"]),
            ("ride_ddp=False twin forward+backward, minus plain", r["arc_bwd"] - r["plain_bwd"]),
            ("riding Arc twin forward+backward, minus plain", r["arc_ride_bwd"] - r["plain_bwd"]),
            ("one fused norm pass (_foreach_norm + stack), standalone", r["norm"]),
            ("naive: all-reduce of 2 floats + host sync", r["naive_coll"]),
            *(
                row
                for key, twin in (("arc", "ride_ddp=False"), ("arc_ride", "riding"))
                for k in (r["arc_step"][key],)
                for row in (
                    (f"{twin}: Arc.step, other steps ({100 * s['fast']:.0f}%)", k["fast"]),
                    (f"{twin}: Arc.step, deep-check steps ({100 * s['deep']:.0f}%)", k["deep"]),
                    (
                        f"{twin}: Arc.step, snapshot steps ({100 * s['snapshot']:.0f}%)",
                        k["snapshot"],
                    ),
                    (f"{twin}: Arc.step amortised", sum(k[x] * s[x] for x in k if s[x])),
                )
            ),
        ):
            print(f"| {label} | {v:.3f} |")
        for key, twin in (("arc_ride", "riding"), ("arc", "ride_ddp=False")):
            heap, ops = r["heap_bytes_per_arc_step"][key], r["torch_ops_per_arc_step"][key]
            print(f"| {twin}: Python heap peak per ordinary Arc.step | {heap / 1e3:.1f} kB |")
            print(f"| {twin}: torch ops per ordinary Arc.step | {ops:.0f} |")


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
    plain_model, plain_opt = job(width)
    model, opt = job(width)
    nparams = sum(p.numel() for p in model.parameters())
    x, y = inputs(batch)
    arc = Arc(model, opt, config=ArcConfig(snapshot_every=100), chaos="")
    twins = [(plain_model, plain_opt, None), (model, opt, arc)]
    if other:
        from arc.core.controller import Controller  # the original ARC (arc-training)

        other_model, other_opt = job(width)
        twins.append((other_model, other_opt, Controller(other_model, other_opt)))
    for every in divergence:  # the same job under Arc with other divergence-check intervals
        m_, o_ = job(width)
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
    # a snapshot lives in host memory: the memcpy it is compared with goes there too (pinned)
    pin = DEVICE.type == "cuda"
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
    for _ in range(5):
        t0 = time.perf_counter()
        arc._take_snapshot()
        sync()
        snap_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for d, s in zip(dst, tensors):
            d.copy_(s, non_blocking=pin)
        sync()
        copy_t.append(time.perf_counter() - t0)
    # rollback latency: NaN losses are skipped up to max_skips times, the next one rolls back
    for _ in range(arc.config.max_skips + 1):
        loss = nn.functional.mse_loss(model(x), y) * float("nan")
        loss.backward()
        t0 = time.perf_counter()
        action = arc.step(loss)
        sync()
        rollback = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
    assert action.rolled_back, action
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


def print_paired(rows: list[dict], world: int, args) -> None:
    if args.json:
        print(json.dumps(rows))
    clip = f", every twin clips to {args.clip} (Arc reuses the norm)" if args.clip else ""
    print(f"world size {world}, {args.device}, batch {args.batch}/rank, {args.paired} pairs of "
          f"single steps{clip}")  # fmt: skip
    print("| model | params | twin | plain ms | twin ms | median ratio | p99 ratio | "
          "max ratio (no snapshot) | steps > 1.5x |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for n in [
            k
            for k in ("arc", "arc, ride_ddp=False", "naive", "floor", "overlap", "arc-training")
            if k in r
        ]:
            t = r[n]
            print(
                f"| {r['model']} | {r['params'] / 1e6:.1f}M | {n} | {r['plain_ms']:.1f} | "
                f"{t['ms']:.1f} | {t['median']:.3f} | {t['p99']:.3f} | "
                f"{t['max_no_snapshot']:.2f} | {t['over_1_5']} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,4M,25M")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the models train (cuda: one GPU per rank, NCCL when each rank "
                    "has its own GPU, else gloo)")  # fmt: skip
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
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="alternate single steps of the plain, Arc and naive twins for N pairs (e.g. 300); "
        "report the median and p99 of per-pair ratios",
    )
    ap.add_argument(
        "--attribution",
        type=int,
        default=0,
        metavar="N",
        help="time the parts of the overhead over N steps of each twin (2-rank torchrun)",
    )
    args = ap.parse_args()
    global CLIP, DEVICE
    env = __import__("os").environ
    backend = "gloo"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: no GPU is visible (torch.cuda.is_available() is False)"
            )
        local, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
        DEVICE = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
        if torch.cuda.device_count() >= local_world:
            backend = "nccl"
    if "RANK" in env:
        dist.init_process_group(backend)
    torch.set_num_threads(1 if dist.is_initialized() else 2)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    CLIP = args.clip
    divergence = tuple(int(v) for v in args.divergence_every.split(",") if v.strip())
    if args.attribution:
        arow = [
            attribution(s, SIZES[s], args.attribution, args.batch) for s in args.sizes.split(",")
        ]
        if rank == 0:
            if args.json:
                print(json.dumps(arow))
            print_attribution(arow)
        dist.destroy_process_group()
        return
    if args.paired:
        prow = [
            paired(s, SIZES[s], args.paired, args.batch, args.with_arc_training)
            for s in args.sizes.split(",")
        ]
        if rank == 0:
            print_paired(prow, world, args)
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    rows = [
        bench(s, SIZES[s], args.rounds, args.steps, args.batch, args.with_arc_training, divergence)
        for s in args.sizes.split(",")
    ]
    if rank == 0:
        if args.json:
            print(json.dumps(rows))
        clip = f", all twins clip to {args.clip} (Arc reuses the norm)" if args.clip else ""
        print(
            f"world size {world}, {args.device}, batch {args.batch}/rank, median of {args.rounds} rounds x {args.steps} steps{clip}"
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
