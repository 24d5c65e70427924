"""The controller's per-step work that grows with the world size, on one CPU core.

Every rank judges the same agreed ``[world_size, NUM_COLS]`` matrix each step: the health
policy's verdict and history update and the straggler tracker, all host-side Python and numpy
after the step's host sync (on a GPU, time the device waits for the next kernels). Here they run
on synthetic healthy matrices (noisy losses, per-rank gradient norms and busy times) for world
sizes no test machine has, after a warm-up that fills the policy's and tracker's windows.
Medians over ``--steps`` steps, ms per step.

    python benchmarks/world_scale.py
    python benchmarks/world_scale.py --worlds 8,256,1024 --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from arc_dist.config import ArcConfig
from arc_dist.layout import Layout
from arc_dist.policy import HealthPolicy
from arc_dist.signals import NUM_COLS, Col
from arc_dist.silent import StragglerTracker


def matrices(world: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` agreed matrices of a healthy DDP run (what an ordinary riding step carries)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = np.zeros((world, NUM_COLS))
        m[:, Col.LOSS] = 2.0 + 0.05 * rng.standard_normal(world)
        m[:, Col.GRAD_SQ] = 1.0 + 0.01 * rng.standard_normal()  # averaged: one value
        m[:, Col.LOCAL_GRAD_SQ] = 1.0 + 0.1 * rng.standard_normal(world)
        m[:, Col.LR_RATIO], m[:, Col.LR], m[:, Col.LOSS_VALID] = 1.0, 1e-3, 1.0
        m[:, Col.STEP_TIME] = 0.5 * (1 + 0.02 * rng.standard_normal(world))
        out.append(m)
    return out


def bench(world: int, steps: int) -> dict:
    cfg = ArcConfig()
    policy = HealthPolicy(cfg.thresholds, Layout.REPLICATED, world, max_skips=cfg.max_skips)
    tracker = StragglerTracker(world, cfg.straggler_ratio, cfg.straggler_window)
    warm = cfg.thresholds.window + cfg.straggler_window
    judge, observe, stragglers = [], [], []
    for i, m in enumerate(matrices(world, warm + steps)):
        t0 = time.perf_counter()
        verdict = policy.judge(m)
        t1 = time.perf_counter()
        policy.observe(m, verdict)
        t2 = time.perf_counter()
        tracker.observe(m[:, Col.STEP_TIME], i)
        t3 = time.perf_counter()
        assert verdict.status == "healthy", verdict
        if i >= warm:
            judge.append(t1 - t0)
            observe.append(t2 - t1)
            stragglers.append(t3 - t2)
    med = statistics.median
    parts = dict(judge=med(judge), observe=med(observe), stragglers=med(stragglers))
    return dict(world=world, **{k: 1e3 * v for k, v in parts.items()},
                total=1e3 * sum(parts.values()))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,64,256,1024,4096")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    print(f"median ms per step over {args.steps} steps")
    print("| world size | policy verdict | policy history | straggler tracker | total |")
    print("|---|---|---|---|---|")
    for w in (int(x) for x in args.worlds.split(",")):
        r = bench(w, args.steps)
        print(f"| {w} | {r['judge']:.3f} | {r['observe']:.3f} | {r['stragglers']:.3f} | "
              f"{r['total']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
