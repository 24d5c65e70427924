"""Ordinary training loops, written as a new user would, under Arc: the pattern table.

A :class:`Pattern` is one row: a builder that makes, for one rank, the model, optimizer,
scheduler and the loop's own hooks (a :class:`Setup`), and the fault its faulty run gets.
:func:`run_layout` runs every pattern of one layout (one process, 2-rank DDP, 2-rank FSDP2)
inside a single process group, twice each: clean, and with one fault from ``arc_dist.chaos``.
Each cell's per-rank result is also written to a file as soon as it is known, so a group that
hangs still reports the cells before it. tests/test_matrix.py asserts on the results.

To add a loop pattern: write a builder ``fn(ctx) -> Setup`` and add a row to ``PATTERNS``.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arc_dist import Arc, ArcConfig

from ._workload import Data, eval_loss, make_model, params_digest

LAYOUTS = ("single", "ddp", "fsdp")
STEPS = 60
#: the step at which the loop unfreezes layers (after the policy's warm-up of 20 healthy steps)
UNFREEZE_STEP = 25
SNAPSHOT_EVERY = 10


@dataclass
class Ctx:
    """Where a cell runs: its layout, this rank, and a directory shared by the cell's ranks."""

    layout: str
    rank: int
    world: int
    workdir: str

    def wrap(self, module: nn.Module, *, find_unused: bool = False) -> nn.Module:
        """The module as this layout trains it (DDP wrapper, FSDP2-sharded, or as is)."""
        if self.layout == "ddp":
            return DDP(module, find_unused_parameters=find_unused)
        if self.layout == "fsdp":
            from torch.distributed.fsdp import fully_shard

            fully_shard(module)
        return module

    @staticmethod
    def inner(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DDP) else model

    def no_sync(self, model: nn.Module):
        """Gradient accumulation without communication (DDP's ``no_sync``, FSDP2's flag)."""
        if self.layout == "ddp":
            return model.no_sync()
        if self.layout == "fsdp":
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@dataclass
class Setup:
    """One rank's training loop pieces; the hooks default to the contract's plain loop."""

    model: nn.Module  # what Arc and the loop see (wrapped for the layout)
    optimizer: torch.optim.Optimizer
    data: Any  # .next(), .loss(model, batch), .eval
    scheduler: Any = None
    scaler: Any = None
    #: called with arc.global_step before the forward pass (loop-set LRs, unfreezing)
    before_step: Callable[[int], None] | None = None
    #: forward and backward of one step: (loss, grad norm for arc.step or None)
    forward_backward: Callable[[int], tuple[torch.Tensor, Any]] | None = None
    #: the update after a step Arc did not skip
    apply: Callable[[], None] | None = None
    arc_kwargs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    #: called once Arc exists, before training (register, resume)
    attach: Callable[[Arc], None] | None = None
    #: pattern-specific checks after training: a list of problems (empty: fine)
    check: Callable[[Arc], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.forward_backward is None:
            self.forward_backward = self._forward_backward
        if self.apply is None:
            self.apply = self._apply

    def _forward_backward(self, step: int):
        loss = self.data.loss(self.model, self.data.next())
        loss.backward()
        return loss, None

    def _apply(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def eval_loss(self) -> float:
        return eval_loss(self.model, self.data)


@dataclass(frozen=True)
class Pattern:
    name: str
    build: Callable[[Ctx], Setup]
    #: ``KIND@STEP`` for the faulty run, injected on the last rank
    fault: str
    layouts: tuple[str, ...] = LAYOUTS
    #: the fault under DDP instead, e.g. silent corruption (only replicas can reveal it)
    ddp_fault: str | None = None
    #: a clean run may skip steps for GradScaler overflow (AMP), and only for that
    amp_skips: bool = False
    #: final eval loss of the faulty run may be at most this times the clean run's (+0.02)
    tolerance: float = 1.5

    def fault_spec(self, layout: str, world: int) -> str:
        spec = self.ddp_fault if layout == "ddp" and self.ddp_fault else self.fault
        return spec if "/" in spec else f"{spec}/{world - 1}"


# -- data and models ---------------------------------------------------------------------
class NoisyLabels:
    """Classification into 4 classes with a fraction of the training labels replaced at random
    (the evaluation set is clean and the same on every rank)."""

    def __init__(self, rank: int, batch: int = 2, noise: float = 0.2):
        self.batch, self.noise = batch, noise
        self.gen = torch.Generator().manual_seed(rank + 1)
        self.w = torch.randn(16, 4, generator=torch.Generator().manual_seed(12345))
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(999))
        self.eval = (x, (x @ self.w).argmax(-1))

    def next(self):
        x = torch.randn(self.batch, 16, generator=self.gen)
        y = (x @ self.w).argmax(-1)
        flip = torch.rand(self.batch, generator=self.gen) < self.noise
        return x, torch.where(flip, torch.randint(0, 4, (self.batch,), generator=self.gen), y)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])

    def forward(self, x, head: int = 0):
        return self.heads[head](self.trunk(x))


class Branchy(nn.Module):
    """An extra block used only on batches whose first feature has a positive mean."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.Tanh())
        self.extra = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        h = self.trunk(x)
        if x[:, 0].mean() > 0:
            h = h + self.extra(h)
        return self.head(h)


class TinyMoE(nn.Module):
    """Top-1 mixture of experts: each row goes to one expert chosen by a learnt gate; an expert
    that receives no row on a step is not part of the graph (its gradient is None)."""

    def __init__(self, experts: int = 8, dim: int = 32):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(experts)
        )
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        weight, choice = self.gate(h).softmax(-1).max(-1)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                mixed = mixed.index_add(0, rows, expert(h[rows]) * weight[rows, None])
        return self.out(h + mixed)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the ranks' shards under FSDP2: a collective)."""
    return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # every rank builds the same initial model (FSDP2 shards it as is)
    return factory()


# -- patterns ----------------------------------------------------------------------------
def alternating_heads(ctx: Ctx) -> Setup:
    """Two heads trained on alternate steps: the idle head has no gradient (AdamW)."""
    model = ctx.wrap(_seeded(TwoHeads), find_unused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = Data("mlp", ctx.rank)

    def forward_backward(step):
        x, y = data.next()
        loss = F.mse_loss(model(x, head=step % 2), y)
        loss.backward()
        return loss, None

    return Setup(model, opt, data, forward_backward=forward_backward)


def _unfreeze(ctx: Ctx, *, add_group: bool) -> Setup:
    model = ctx.wrap(make_model("mlp"), find_unused=True)
    first = ctx.inner(model)[0]
    first.requires_grad_(False)
    if add_group:  # the optimizer only learns about the layer when it is unfrozen
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    unfrozen = []
    initial = _full(first.weight).clone()

    def before_step(step):
        if step >= UNFREEZE_STEP and not unfrozen:
            first.requires_grad_(True)
            if add_group:
                opt.add_param_group({"params": list(first.parameters()), "lr": 1e-3})
            unfrozen.append(step)

    def check(arc):
        if not unfrozen:
            return ["the layer was never unfrozen"]
        return (
            []
            if not torch.equal(_full(first.weight), initial)
            else ["the unfrozen layer never changed"]
        )

    return Setup(model, opt, Data("mlp", ctx.rank), before_step=before_step, check=check)


def unfreeze_in_optimizer(ctx: Ctx) -> Setup:
    """A frozen first layer (in the optimizer from the start) unfrozen mid-run (Adam)."""
    return _unfreeze(ctx, add_group=False)


def unfreeze_add_param_group(ctx: Ctx) -> Setup:
    """A frozen first layer added to the optimizer with ``add_param_group`` when unfrozen."""
    return _unfreeze(ctx, add_group=True)


def data_dependent_branch(ctx: Ctx) -> Setup:
    """A block used on some batches only, decided per rank by the data (DDP:
    ``find_unused_parameters=True``; Adam)."""
    model = ctx.wrap(_seeded(Branchy), find_unused=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, Data("mlp", ctx.rank))


def mixture_of_experts(ctx: Ctx) -> Setup:
    """A top-1 MoE routed by the data: experts without rows miss their gradient (AdamW)."""
    model = ctx.wrap(_seeded(TinyMoE), find_unused=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return Setup(model, opt, Data("mlp", ctx.rank, batch=16))


def _loop_set_lr(ctx: Ctx, lr_at: Callable[[int], float]) -> Setup:
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=lr_at(0))

    def before_step(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)

    return Setup(model, opt, Data("mlp", ctx.rank), before_step=before_step)


def manual_warmup(ctx: Ctx) -> Setup:
    """No scheduler: the loop ramps the LR linearly from 0 over 20 steps."""
    return _loop_set_lr(ctx, lambda step: 3e-3 * min(1.0, step / 20))


def manual_step_decay(ctx: Ctx) -> Setup:
    """No scheduler: the loop divides the LR by 3 every 20 steps."""
    return _loop_set_lr(ctx, lambda step: 1e-2 / 3 ** (step // 20))


def _with_scheduler(ctx: Ctx, make: Callable[[torch.optim.Optimizer], Any], lr=1e-2) -> Setup:
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return Setup(model, opt, Data("mlp", ctx.rank), scheduler=make(opt))


WARMUP = 10


def linear_warmup_decay(ctx: Ctx) -> Setup:
    """LambdaLR: linear warm-up from 0, then linear decay (``get_linear_schedule_with_warmup``)."""

    def factor(s):
        return s / WARMUP if s < WARMUP else max(0.0, (STEPS - s) / (STEPS - WARMUP))

    return _with_scheduler(ctx, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))


def cosine_warmup(ctx: Ctx) -> Setup:
    """LambdaLR: cosine decay after a linear warm-up from 0 (as HF's cosine schedule)."""

    def factor(s):
        if s < WARMUP:
            return s / WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))

    return _with_scheduler(ctx, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))


def one_cycle(ctx: Ctx) -> Setup:
    """OneCycleLR over the whole run (AdamW, its betas cycled too)."""
    return _with_scheduler(
        ctx, lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS)
    )


def noisy_small_batches(ctx: Ctx) -> Setup:
    """Batches of 2, cross-entropy, 20% of the labels wrong: a heavy-tailed loss (Adam)."""
    model = ctx.wrap(_seeded(lambda: nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, NoisyLabels(ctx.rank))


def weight_decay_groups(ctx: Ctx) -> Setup:
    """AdamW with two param groups: decay on matrices, none on biases and LayerNorm."""
    model = ctx.wrap(
        _seeded(
            lambda: nn.Sequential(
                nn.Linear(16, 64),
                nn.LayerNorm(64),
                nn.Tanh(),
                nn.Linear(64, 64),
                nn.Tanh(),
                nn.Linear(64, 1),
            )
        )
    )
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
    )
    return Setup(model, opt, Data("mlp", ctx.rank))


MICRO_BATCHES = 4


def gradient_accumulation(ctx: Ctx) -> Setup:
    """4 micro-batches per step, gradients synchronised on the last one only."""
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = Data("mlp", ctx.rank, batch=8)

    def forward_backward(step):
        total = torch.zeros(())
        for i in range(MICRO_BATCHES):
            last = i == MICRO_BATCHES - 1
            with contextlib.nullcontext() if last else ctx.no_sync(model):
                loss = data.loss(model, data.next()) / MICRO_BATCHES
                loss.backward()
            total += loss.detach()
        return total, None

    return Setup(model, opt, data, forward_backward=forward_backward)


def _autocast_loss(model: nn.Module, data: Data, dtype: torch.dtype) -> torch.Tensor:
    """The forward pass in ``dtype`` under ``torch.autocast``, the loss in float32."""
    x, y = data.next()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    return F.mse_loss(out.float(), y)


def bf16_autocast(ctx: Ctx) -> Setup:
    """The forward pass under ``torch.autocast`` in bfloat16 (AdamW)."""
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = Data("mlp", ctx.rank)

    def forward_backward(step):
        loss = _autocast_loss(model, data, torch.bfloat16)
        loss.backward()
        return loss, None

    return Setup(model, opt, data, forward_backward=forward_backward)


def fp16_grad_scaler(ctx: Ctx) -> Setup:
    """float16 autocast with a GradScaler: ``unscale_``, ``clip_grad_norm_``, the norm handed to
    ``arc.step``, ``scaler.step``/``update`` (SGD with momentum)."""
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    data = Data("mlp", ctx.rank)

    def forward_backward(step):
        loss = _autocast_loss(model, data, torch.float16)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def apply():
        scaler.step(opt)
        scaler.update()

    return Setup(model, opt, data, scaler=scaler, forward_backward=forward_backward, apply=apply)


def compiled(ctx: Ctx) -> Setup:
    """``torch.compile`` on the model as the layout trains it (after DDP, as torch recommends)."""
    model = torch.compile(ctx.wrap(make_model("mlp")))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def check(arc):
        return [] if arc.layout == "replicated" else [f"Arc took the model as {arc.layout}"]

    return Setup(model, opt, Data("mlp", ctx.rank), check=check)


def sgd_momentum(ctx: Ctx) -> Setup:
    """SGD with Nesterov momentum."""
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return Setup(model, opt, Data("mlp", ctx.rank))


def adagrad(ctx: Ctx) -> Setup:
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    return Setup(model, opt, Data("mlp", ctx.rank))


class ShuffleSampler:
    """Batches of a fixed per-rank dataset in an order reshuffled every epoch by its own
    generator: its position and generator are state a resumed run needs (``per_rank``)."""

    def __init__(self, rank: int, size: int = 96, batch: int = 32):
        g = torch.Generator().manual_seed(rank + 1)
        data = Data("mlp", rank)
        self.x = torch.randn(size, 16, generator=g)
        self.y = torch.sin(self.x @ data.w)
        self.eval, self.batch = data.eval, batch
        self.gen = torch.Generator().manual_seed(100 + rank)
        self.epoch, self.position = 0, 0
        self.order = torch.randperm(size, generator=self.gen)

    def next(self):
        if self.position + self.batch > len(self.order):
            self.epoch, self.position = self.epoch + 1, 0
            self.order = torch.randperm(len(self.x), generator=self.gen)
        idx = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        return self.x[idx], self.y[idx]

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order": self.order.clone(),
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])
        self.order = sd["order"].clone()
        self.gen.set_state(sd["gen"])


def _sampler_state_equal(a: dict, b: dict) -> bool:
    return (a["epoch"], a["position"]) == (b["epoch"], b["position"]) and all(
        torch.equal(a[k], b[k]) for k in ("order", "gen")
    )


def stateful_sampler(ctx: Ctx) -> Setup:
    """A sampler registered with ``Arc.register(per_rank=True)``, periodic checkpoints and a
    final ``save()``; a fresh Arc resumes the final save, with the sampler where it stood."""
    every = 20

    def build():
        model = ctx.wrap(make_model("mlp"))
        return model, torch.optim.Adam(model.parameters(), lr=3e-3), ShuffleSampler(ctx.rank)

    model, opt, sampler = build()
    url = os.path.join(ctx.workdir, "ckpt")
    #: step -> (sampler state, model digest) when training was at that step, before its batch
    at_step: dict[int, tuple[dict, str]] = {}

    def before_step(step):
        if step % every == 0:
            at_step[step] = (sampler.state_dict(), params_digest(model))

    def check(arc):
        arc.save()
        before_step(arc.global_step)
        model2, opt2, sampler2 = build()
        arc2 = Arc(model2, opt2, checkpoint_dir=url, config=ArcConfig(checkpoint_every=every),
                   chaos="")  # fmt: skip
        arc2.register("sampler", sampler2, per_rank=True)
        try:
            step = arc2.resume()
            problems = [] if step == arc.global_step else [f"resume() returned step {step}"]
            if step in at_step:
                state, digest = at_step[step]
                if not _sampler_state_equal(sampler2.state_dict(), state):
                    problems.append(f"the sampler resumed elsewhere than it stood at step {step}")
                if params_digest(model2) != digest:
                    problems.append(f"the resumed model is not the model of step {step}")
        finally:
            arc2.close()
        return problems

    return Setup(
        model, opt, sampler, arc_kwargs=dict(checkpoint_dir=url),
        config=dict(checkpoint_every=every), before_step=before_step,
        attach=lambda arc: arc.register("sampler", sampler, per_rank=True), check=check,
    )  # fmt: skip


def resume_empty_dir(ctx: Ctx) -> Setup:
    """``resume()`` on an empty checkpoint directory (the first launch), then train with
    periodic checkpoints."""
    model = ctx.wrap(make_model("mlp"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    resumed = []

    def check(arc):
        problems = [] if resumed == [0] else [f"resume() on an empty dir returned {resumed}"]
        if arc.stats()["checkpoints"] < 1:
            problems.append("no checkpoint was written")
        return problems

    url = os.path.join(ctx.workdir, "ckpt")
    return Setup(
        model, opt, Data("mlp", ctx.rank), arc_kwargs=dict(checkpoint_dir=url),
        config=dict(checkpoint_every=20), attach=lambda arc: resumed.append(arc.resume()),
        check=check,
    )  # fmt: skip


# Faults fire at step 33: after the policy's warm-up (20 healthy steps) and the snapshot at 30.
# Damage (nan_weights) where the pattern is about what a rollback restores: the one at 27 rolls
# back past the unfreezing at step 25, the GradScaler's across a rollback.
PATTERNS = [
    Pattern("alternating_heads", alternating_heads, "nan_loss@33"),
    Pattern("unfreeze_in_optimizer", unfreeze_in_optimizer, "grad_explosion@33"),
    Pattern("unfreeze_add_param_group", unfreeze_add_param_group, "nan_weights@27"),
    # not under FSDP2: it reduce-scatters only the gradients a rank has, so a block one rank uses
    # and another does not makes their collectives differ (gloo aborts), with or without Arc
    Pattern("data_dependent_branch", data_dependent_branch, "nan_weights@33", ("single", "ddp")),
    Pattern("mixture_of_experts", mixture_of_experts, "grad_explosion@33", ("single", "ddp")),
    Pattern("manual_warmup", manual_warmup, "nan_loss@33"),
    Pattern("manual_step_decay", manual_step_decay, "nan_weights@33"),
    Pattern("linear_warmup_decay", linear_warmup_decay, "grad_explosion@33"),
    Pattern("cosine_warmup", cosine_warmup, "nan_weights@33"),
    Pattern("one_cycle", one_cycle, "loss_spike@33"),
    Pattern("noisy_small_batches", noisy_small_batches, "nan_loss@33"),
    Pattern("weight_decay_groups", weight_decay_groups, "optimizer_corrupt@33"),
    Pattern("gradient_accumulation", gradient_accumulation, "grad_explosion@33"),
    Pattern("bf16_autocast", bf16_autocast, "nan_loss@33"),
    Pattern("fp16_grad_scaler", fp16_grad_scaler, "nan_weights@33", amp_skips=True),
    # compiling under FSDP2 too costs ~25 s more on 2 cores; DDP is where the wrapper matters
    Pattern("compiled", compiled, "nan_loss@33", ("single", "ddp"), ddp_fault="bit_flip@33"),
    Pattern("sgd_momentum", sgd_momentum, "nan_weights@33", ddp_fault="bit_flip@33"),
    Pattern("adagrad", adagrad, "grad_explosion@33"),
    Pattern("stateful_sampler", stateful_sampler, "nan_loss@33"),
    Pattern("resume_empty_dir", resume_empty_dir, "nan_weights@33"),
]
BY_NAME = {p.name: p for p in PATTERNS}
VARIANTS = ("clean", "fault")


# -- running -----------------------------------------------------------------------------
def _train(s: Setup, arc: Arc) -> list[tuple]:
    """The contract's loop with the pattern's hooks; the non-healthy actions as tuples
    (step judged, status, reason, bad ranks, skipped, rolled back)."""
    events = []
    for _ in range(4 * STEPS):
        if arc.global_step >= STEPS:
            return events
        if s.before_step is not None:
            s.before_step(arc.global_step)
        judged = arc.global_step
        loss, norm = s.forward_backward(judged)
        action = arc.step(loss) if norm is None else arc.step(loss, grad_norm=norm)
        if action.status != "healthy":
            events.append(
                (judged, action.status, action.reason, action.bad_ranks, action.should_skip,
                 action.rolled_back)
            )  # fmt: skip
        if not action.should_skip:
            s.apply()
        s.optimizer.zero_grad(set_to_none=True)
    raise RuntimeError(f"the loop did not reach step {STEPS} in {4 * STEPS} calls: {events}")


def run_cell(ctx: Ctx, pattern: Pattern, variant: str) -> dict:
    """One pattern, clean or with its fault, on this rank; every outcome is in the result."""
    out: dict = {"error": None, "problems": []}
    t0 = time.monotonic()
    try:
        s = pattern.build(ctx)
        chaos = pattern.fault_spec(ctx.layout, ctx.world) if variant == "fault" else ""
        config = ArcConfig(snapshot_every=SNAPSHOT_EVERY, **s.config)
        arc = Arc(s.model, s.optimizer, s.scheduler, scaler=s.scaler, config=config, chaos=chaos,
                  **s.arc_kwargs)  # fmt: skip
    except Exception as e:
        out["error"] = f"setup: {type(e).__name__}: {e}"
        out["trace"] = traceback.format_exc()
        return out
    try:
        if s.attach is not None:
            s.attach(arc)
        out["events"] = _train(s, arc)
        if s.check is not None:
            out["problems"] = s.check(arc)
        stats = arc.stats()
        out.update(
            step=arc.global_step,
            stats={k: stats[k] for k in ("rollbacks", "skips", "failures", "warnings", "lr_scale")},
            fired=list(arc.chaos.fired) if arc.chaos else [],
            digest=params_digest(s.model),
            eval=s.eval_loss(),
        )
    except BaseException as e:  # CheckpointException is a BaseException
        out["error"] = f"{type(e).__name__}: {e}"
        out["trace"] = traceback.format_exc()
    finally:
        try:
            arc.close()
        except BaseException as e:
            out["error"] = out["error"] or f"close: {type(e).__name__}: {e}"
    out["seconds"] = time.monotonic() - t0
    return out


def cell_file(outdir: str, layout: str, name: str, variant: str, rank: int) -> str:
    return os.path.join(outdir, f"{layout}-{name}-{variant}-r{rank}.pkl")


def run_layout(rank: int, world: int, layout: str, names: list[str], workdir: str,
               outdir: str) -> None:  # fmt: skip
    """Every cell of ``layout`` for ``names`` in turn on this rank (spawned by tests/_dist.py)."""
    for name in names:
        for variant in VARIANTS:
            celldir = os.path.join(workdir, f"{layout}-{name}-{variant}")
            os.makedirs(celldir, exist_ok=True)
            result = run_cell(Ctx(layout, rank, world, celldir), BY_NAME[name], variant)
            path = cell_file(outdir, layout, name, variant, rank)
            with open(path + ".tmp", "wb") as f:
                pickle.dump(result, f)
            os.replace(path + ".tmp", path)
