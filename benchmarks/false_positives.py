"""False positives of the health policy: healthy runs of real small models on real data.

Every run here is healthy, so every skip, warning or rollback Arc reports is a false positive.
The data ships with the environment: scikit-learn's handwritten digits (an MLP and a small CNN,
also with 20% of the labels replaced at random: per-batch losses of tiny batches are then
heavy-tailed) and the Python standard library's own source text (a character-level GPT). The
runs span seeds, learning rates up to the largest that still trains, batch sizes down to 1,
schedulers, a warm-up from 0 set by the loop itself, layers unfrozen mid-run and two heads
trained on alternate steps (per-parameter optimizer step counters differ). Arc runs with its
default configuration, in one process (it runs the same policy as at any world size).

    python benchmarks/false_positives.py --quick          # ~4,000 steps, about a minute
    python benchmarks/false_positives.py                  # 105,600 steps, 20-30 min on 2 cores
    python benchmarks/false_positives.py --out docs/false_positives_table.md
    python benchmarks/false_positives.py --quick --early-warning   # forecasts on, counted too

Prints a markdown table: per configuration the steps, rollbacks, skips and warnings per 10,000
steps, and the held-out metric at the end (that the run trained). Needs ``scikit-learn``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from arc_dist import Arc, ArcConfig, EarlyWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo import CharLM as GPT  # noqa: E402 - the main job's model


@dataclass(frozen=True)
class Case:
    name: str  # the configuration, as shown in the table
    model: str  # "mlp" | "cnn" | "gpt" | "heads"
    lr: float
    batch: int
    steps: int
    seed: int
    opt: str = "adam"  # "adam" | "adamw" | "sgd"
    noise: float = 0.0  # fraction of training labels replaced at random
    schedule: str = "none"  # "none" | "cosine" (a scheduler) | "loop" (the loop sets the LR)
    unfreeze_at: int = 0  # the first layer is frozen until this step (0: never frozen)


# -- data ---------------------------------------------------------------------------------


def digits(noise: float, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1500], perm[1500:]
    xtr, ytr = x[train], y[train].clone()
    if noise:
        g = torch.Generator().manual_seed(seed)
        flip = torch.rand(len(ytr), generator=g) < noise
        ytr[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return (xtr, ytr), (x[test], y[test])


def stdlib_text(chars: int = 300_000) -> str:
    import argparse as a
    import collections
    import dataclasses
    import email.message
    import json.decoder
    import pathlib
    import textwrap

    mods = (a, collections, dataclasses, email.message, json.decoder, pathlib, textwrap, inspect)
    return "".join(inspect.getsource(m) for m in mods)[:chars]


# -- models -------------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, x):
        return self.head(self.conv(x.view(-1, 1, 8, 8)).flatten(1))


class TwoHeads(nn.Module):
    """A shared trunk and two classifier heads, trained on alternate steps."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(128, 10), nn.Linear(128, 10)])
        self.active = 0

    def forward(self, x):
        return self.heads[self.active](self.trunk(x))


# -- one run ------------------------------------------------------------------------------


#: the configuration every run uses (``--early-warning`` turns forecasts on)
CONFIG = ArcConfig()


def run(case: Case, text_data) -> dict:
    torch.manual_seed(case.seed)
    g = torch.Generator().manual_seed(case.seed)
    ce = nn.functional.cross_entropy
    if case.model == "gpt":
        data, vocab = text_data
        model, ctx = GPT(vocab), 32
        split = int(0.9 * len(data))

        def batch(n, lo=0, hi=split):
            i = torch.randint(lo, hi - ctx - 1, (n,), generator=g)
            x = torch.stack([data[j : j + ctx] for j in i])
            return x, torch.stack([data[j + 1 : j + ctx + 1] for j in i])

        def loss_of(out, y):
            return ce(out.flatten(0, 1), y.flatten())

        test = batch(256, split, len(data))

        def metric():  # held-out loss, nats per character
            return float(loss_of(model(test[0]), test[1]))
    else:
        (xtr, ytr), (xte, yte) = digits(case.noise, case.seed)
        model = {
            "mlp": lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
            "cnn": CNN,
            "heads": TwoHeads,
        }[case.model]()

        def batch(n):
            i = torch.randint(0, len(xtr), (n,), generator=g)
            return xtr[i], ytr[i]

        loss_of = ce

        def metric():  # held-out accuracy
            return float((model(xte).argmax(1) == yte).float().mean())

    frozen = list(next(iter(model.children())).parameters()) if case.unfreeze_at else []
    for p in frozen:
        p.requires_grad_(False)
    if case.opt == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=0.9)
    else:
        cls = torch.optim.AdamW if case.opt == "adamw" else torch.optim.Adam
        opt = cls(model.parameters(), lr=case.lr)
    sched = None
    if case.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / case.steps))
        )
    arc = Arc(model, opt, sched, config=CONFIG, chaos="")
    reasons: dict[str, int] = {}
    t0 = time.monotonic()
    while arc.global_step < case.steps:
        s = arc.global_step
        if case.schedule == "loop":  # the loop owns the LR: a warm-up from 0, then a decay
            for group in opt.param_groups:
                group["lr"] = (
                    case.lr * min(s / 200, 1.0) * (0.1 if s >= case.steps * 2 // 3 else 1.0)
                )
        if frozen and s == case.unfreeze_at:
            for p in frozen:
                p.requires_grad_(True)
        if case.model == "heads":
            model.active = s % 2
        x, y = batch(case.batch)
        loss = loss_of(model(x), y)
        loss.backward()
        action = arc.step(loss)
        if action.status != "healthy":
            key = f"{action.reason}:{'skip' if action.should_skip else action.status}"
            reasons[key] = reasons.get(key, 0) + 1
        if not action.should_skip:
            opt.step()
            if sched is not None:
                sched.step()
        opt.zero_grad(set_to_none=True)
    stats = arc.stats()
    arc.close()
    model.eval()
    with torch.no_grad():
        final = metric()
    return dict(
        steps=case.steps,
        rollbacks=stats["rollbacks"],
        skips=stats["skips"],
        warnings=stats["warnings"],
        failures=stats["failures"],
        reasons=reasons,
        metric=final,
        seconds=time.monotonic() - t0,
    )


# -- the grid -----------------------------------------------------------------------------


def cases(quick: bool) -> list[Case]:
    seeds = (0,) if quick else (0, 1, 2)

    def n(full: int) -> int:
        return 300 if quick else full

    out = []
    for seed in seeds:
        for lr in (3e-3, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2):
            for b in (2, 32) if quick else (1, 2, 8, 32):
                out.append(
                    Case(f"digits MLP, Adam lr={lr:g}, batch {b}", "mlp", lr, b, n(1200), seed)
                )
        out += [
            Case(
                "digits MLP, 20% label noise, Adam lr=3e-3, batch 2",
                "mlp",
                3e-3,
                2,
                n(3000),
                seed,
                noise=0.2,
            ),
            Case(
                "digits MLP, SGD lr=0.1 momentum 0.9, batch 8",
                "mlp",
                0.1,
                8,
                n(1500),
                seed,
                opt="sgd",
            ),
            Case("digits CNN, Adam lr=1e-3, batch 2", "cnn", 1e-3, 2, n(1500), seed),
            Case(
                "digits CNN, Adam lr=3e-3, batch 16, cosine schedule",
                "cnn",
                3e-3,
                16,
                n(1500),
                seed,
                schedule="cosine",
            ),
            Case(
                "digits two heads on alternate steps, AdamW lr=3e-3, batch 8",
                "heads",
                3e-3,
                8,
                n(2000),
                seed,
                opt="adamw",
            ),
            Case(
                "digits MLP, first layer unfrozen at 1/3, AdamW lr=3e-3, batch 8",
                "mlp",
                3e-3,
                8,
                n(2000),
                seed,
                opt="adamw",
                unfreeze_at=n(2000) // 3,
            ),
            Case(
                "digits MLP, loop-set LR warm-up from 0, Adam lr=1e-2, batch 4",
                "mlp",
                1e-2,
                4,
                n(2000),
                seed,
                schedule="loop",
            ),
            Case(
                "stdlib-text GPT, AdamW lr=1e-3, batch 2",
                "gpt",
                1e-3,
                2,
                n(1500),
                seed,
                opt="adamw",
            ),
            Case(
                "stdlib-text GPT, AdamW lr=3e-3, batch 16, cosine schedule",
                "gpt",
                3e-3,
                16,
                n(1000),
                seed,
                opt="adamw",
                schedule="cosine",
            ),
        ]
    return out


def table(results: list[tuple[Case, dict]]) -> str:
    """One row per configuration (seeds summed), then the total."""
    rows: dict[str, list] = {}
    for case, r in results:
        row = rows.setdefault(case.name, [0, 0, 0, 0, 0, [], {}, case.model])
        row[0] += r["steps"]
        row[1] += r["rollbacks"]
        row[2] += r["skips"]
        row[3] += r["warnings"]
        row[4] += 1
        row[5].append(r["metric"])
        for k, v in r["reasons"].items():
            row[6][k] = row[6].get(k, 0) + v

    def per10k(x, steps):
        return f"{1e4 * x / steps:.1f}"

    lines = [
        "| configuration | runs | steps | rollbacks /10k | skips /10k | warnings /10k "
        "| held-out at the end | what was flagged |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    total = [0, 0, 0, 0]
    for name, (steps, rb, sk, wa, runs, metric, why, kind) in rows.items():
        what = "nats/char" if kind == "gpt" else "accuracy"
        held = (
            f"{what} {min(metric):.3g}-{max(metric):.3g}" if runs > 1 else f"{what} {metric[0]:.3g}"
        )
        flagged = ", ".join(f"{k} x{v}" for k, v in sorted(why.items())) or "-"
        lines.append(
            f"| {name} | {runs} | {steps:,} | {per10k(rb, steps)} | {per10k(sk, steps)} | "
            f"{per10k(wa, steps)} | {held} | {flagged} |"
        )
        for i, v in enumerate((steps, rb, sk, wa)):
            total[i] += v
    steps = total[0]
    lines.append(
        f"| **all** | {len(results)} | {steps:,} | {per10k(total[1], steps)} | "
        f"{per10k(total[2], steps)} | {per10k(total[3], steps)} | | |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 300 steps a run")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument(
        "--early-warning",
        action="store_true",
        help="with instability forecasts on (listed as instability_forecast:warning)",
    )
    args = ap.parse_args()
    if args.early_warning:
        global CONFIG
        CONFIG = ArcConfig(early_warning=EarlyWarning(enabled=True))
    torch.set_num_threads(1)
    text = stdlib_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    text_data = (torch.tensor([index[c] for c in text], dtype=torch.long), len(vocab))
    results = []
    t0 = time.monotonic()
    todo = cases(args.quick)
    for i, case in enumerate(todo, 1):
        r = run(case, text_data)
        results.append((case, r))
        print(
            f"[{i}/{len(todo)} {time.monotonic() - t0:6.0f}s] {case.name} (seed {case.seed}): "
            f"rollbacks {r['rollbacks']} skips {r['skips']} warnings {r['warnings']} "
            f"metric {r['metric']:.3g} {r['reasons'] or ''}",
            flush=True,
        )
    out = table(results)
    print()
    print(out)
    print(
        f"\n{sum(r['steps'] for _, r in results):,} healthy steps in {time.monotonic() - t0:.0f}s"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    main()
