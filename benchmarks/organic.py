"""A corpus of organic training failures: small runs that go bad on their own, and their twins.

No fault is injected. Each failing setting trains a small model where it is known to be
unstable (an LR just past the edge of stability, a warm-up that ramps past it, float16 without
loss scaling, attention logits that grow without qk-norm, a deep post-LN transformer without
warm-up); its healthy twin is the same run (model, seed, data order) at a stable setting. Which
runs *did* fail is decided afterwards by the label rule of docs/early_warning.md, not by the
setting's intent. Every step records the signals a predictor may use (``COLUMNS``).

    python benchmarks/organic.py                  # writes benchmarks/data/organic.npz
    python benchmarks/organic.py --quick          # one seed per setting, to try settings
    python benchmarks/organic.py --sharp-every 0  # without the sharpness (half the time)

The data is the Python standard library's own source text (character level) and
scikit-learn's handwritten digits, both shipped with the environment.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from false_positives import digits, stdlib_text  # noqa: E402

DATA = Path(__file__).parent / "data" / "organic.npz"

#: per-step signals; ``upd_*`` is ||w_t - w_{t-1}|| / ||w_{t-1}|| over a parameter group,
#: ``v_*`` are statistics of Adam's second moment (sqrt of its mean / of its max);
#: ``sharpness`` and ``eos`` are measured every few steps and held in between (see
#: :func:`_sharpness`)
COLUMNS = (
    "lr",
    "loss",
    "grad_norm",
    "weight_norm",
    "upd_embed",
    "upd_attn",
    "upd_mlp",
    "upd_head",
    "v_rms",
    "v_max",
    "max_logit",
    "sharpness",
    "eos",
)
GROUPS = ("embed", "attn", "mlp", "head")


@dataclass(frozen=True)
class Spec:
    setting: str  # the failing setting this run belongs to (its twin shares it)
    variant: str  # "fail" | "twin"
    seed: int
    model: str = "gpt"  # "gpt" | "mlp" | "reg" (a tanh MLP regressing one-hot targets, MSE)
    steps: int = 600
    lr: float = 1e-3
    opt: str = "adam"  # "adam" | "sgd"
    eps: float = 1e-8
    batch: int = 16
    depth: int = 2
    post_ln: bool = False
    qk_norm: bool = False
    warmup: int = 0  # linear warm-up steps
    dim: int = 32
    momentum: float = 0.9  # SGD only
    half: bool = False  # train in float16 without loss scaling


# -- models -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, post_ln: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.post_ln = heads, post_ln
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        hd = dim // heads
        self.qn = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.kn = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.max_logit = torch.zeros(())

    def attn(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.qn(q), self.kn(k)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        self.max_logit = logits.detach().abs().amax()
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        a = logits.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))

    def forward(self, x):
        if self.post_ln:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, depth: int, post_ln: bool, qk_norm: bool, dim=48, ctx=32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(ctx, dim))
        self.blocks = nn.ModuleList(Block(dim, 4, post_ln, qk_norm) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))

    def max_logit(self):
        return torch.stack([b.max_logit for b in self.blocks]).amax()


def _group(name: str) -> int:
    if name.startswith(("emb", "pos")):
        return 0
    if ".qkv" in name or ".proj" in name or ".qn" in name or ".kn" in name:
        return 1
    if name.startswith("head") or name.startswith("ln."):
        return 3
    return 2


# -- sharpness ------------------------------------------------------------------------------


def _top_eig(grads, params, v, iters: int, scale=None):
    """Power iteration for the top eigenvalue of ``S H S`` (``H`` the Hessian whose gradient
    graph is ``grads``, ``S`` a diagonal scaling, the identity when None), warm started from
    ``v`` (unit norm). Each iteration is one Hessian-vector product by double backward.
    Returns the last Rayleigh quotient and the next ``v``."""
    lam = torch.tensor(math.nan)
    for _ in range(iters):
        u = v if scale is None else torch._foreach_mul(v, scale)
        hv = torch.autograd.grad(grads, params, u, retain_graph=True)
        if scale is not None:
            hv = torch._foreach_mul(hv, scale)
        lam = torch.stack([(a * b).sum() for a, b in zip(v, hv)]).sum()
        n = torch.stack(torch._foreach_norm(hv)).norm()
        v = torch._foreach_div(hv, n)
    return lam, list(v)


def _unit(params, gen):
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    n = torch.stack(torch._foreach_norm(v)).norm()
    return list(torch._foreach_div(v, n))


def _sharpness(loss, params, vecs, gen, spec: Spec, lr: float, opt, iters: int):
    """Sharpness (the top Hessian eigenvalue of the loss on this step's batch) and the edge of
    stability ratio, above 1 where a quadratic model of the loss says the step diverges.

    SGD with heavy-ball momentum ``b`` is stable while ``lr * sharpness < 2 + 2b``, so the
    ratio is ``lr * sharpness / (2 + 2b)`` (``lr * sharpness / 2`` without momentum). For Adam
    it is the preconditioned sharpness, the top eigenvalue of ``D^1/2 H D^1/2`` with ``D`` the
    per-coordinate step ``lr / ((1 - b1^t)(sqrt(v_hat) + eps))`` of the previous step's state,
    against Adam's bound ``(2 + 2 b1) / (1 - b1)``; it costs a second power iteration on the
    same graph (NaN at step 0, before Adam has a state). ``vecs`` holds the warm starts.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True)
    first = iters if vecs else 4 * iters
    if not vecs:
        vecs.update(h=_unit(params, gen), p=_unit(params, gen))
    lam, vecs["h"] = _top_eig(grads, params, vecs["h"], first)
    if spec.opt == "sgd":
        eos = lr * lam / (2 + 2 * spec.momentum)
    elif opt.state:
        b1, b2 = opt.defaults["betas"]
        st = [opt.state[p] for p in params]
        t = float(st[0]["step"])
        vhat = torch._foreach_div([s["exp_avg_sq"] for s in st], 1 - b2**t)
        den = torch._foreach_add(torch._foreach_sqrt(vhat), spec.eps)
        scale = torch._foreach_sqrt(torch._foreach_reciprocal(den))
        scale = torch._foreach_mul(scale, math.sqrt(lr / (1 - b1**t)))
        plam, vecs["p"] = _top_eig(grads, params, vecs["p"], first, scale)
        eos = plam * (1 - b1) / (2 + 2 * b1)
    else:
        eos = torch.tensor(math.nan)
    out = [float(lam), float(eos)]
    if not math.isfinite(out[0]):
        vecs.clear()  # a diverged estimate restarts from random vectors
    return out


# -- one run ------------------------------------------------------------------------------


def run(spec: Spec, text, sharp_every: int = 10, iters: int = 5, cost: list | None = None):
    """Train one run; returns ``[steps, len(COLUMNS)]`` float32 (rows stop at a non-finite
    loss: the run is over).

    Every ``sharp_every`` steps (0: never; never in float16) the sharpness is measured by
    ``iters`` steps of power iteration (four times as many the first time) on a fresh forward
    of the step's batch at the step's weights, before the update: the training step itself
    and its random streams are untouched, so the other columns are the same with or without
    it. ``cost``, when given, receives the CPU seconds of the training steps and of the
    sharpness measurements."""
    torch.manual_seed(spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    ce = nn.functional.cross_entropy
    if spec.model == "gpt":
        data, vocab = text
        ctx = 16
        model = GPT(vocab, spec.depth, spec.post_ln, spec.qk_norm, dim=spec.dim, ctx=ctx)

        def batch():
            i = torch.randint(0, len(data) - ctx - 1, (spec.batch,), generator=g)
            x = torch.stack([data[j : j + ctx] for j in i])
            y = torch.stack([data[j + 1 : j + ctx + 1] for j in i])
            return x, y.flatten()

        def fwd(x):
            return model(x).flatten(0, 1)
    else:
        (xtr, ytr), _ = digits(0.0, spec.seed)
        act = nn.Tanh if spec.model == "reg" else nn.ReLU
        model = nn.Sequential(
            nn.Linear(64, 128), act(), nn.Linear(128, 128), act(), nn.Linear(128, 10)
        )
        if spec.model == "reg":
            ytr = nn.functional.one_hot(ytr, 10).float()

            def ce(out, y):
                return nn.functional.mse_loss(out, y.to(out.dtype), reduction="sum") / len(y)

        def batch():
            i = torch.randint(0, len(xtr), (spec.batch,), generator=g)
            return xtr[i], ytr[i]

        fwd = model
    if spec.half:
        model.half()
        inner = fwd

        def fwd(x):
            return inner(x.half() if x.is_floating_point() else x)

    names, params = zip(*model.named_parameters())
    if spec.model != "gpt":
        gid = [0 if i < 2 else (3 if i >= len(params) - 2 else 2) for i in range(len(params))]
    else:
        gid = [_group(n) for n in names]
    if spec.opt == "sgd":
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    else:
        opt = torch.optim.Adam(params, lr=spec.lr, eps=spec.eps)
    gid_t = torch.tensor(gid)
    rows = []
    sharp, vecs, gen = [math.nan, math.nan], {}, torch.Generator().manual_seed(spec.seed)
    t_train = t_sharp = 0.0
    for step in range(spec.steps):
        lr = spec.lr * min(1.0, (step + 1) / spec.warmup) if spec.warmup else spec.lr
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch()
        t0 = time.process_time()
        if sharp_every and not spec.half and step % sharp_every == 0:
            sharp = _sharpness(ce(fwd(x), y), params, vecs, gen, spec, lr, opt, iters)
        t1 = time.process_time()
        loss = ce(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params]
        gn = torch.stack(torch._foreach_norm(grads)).norm()
        prev = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            wn = torch.stack(torch._foreach_norm(prev))
            dn = torch.stack(torch._foreach_norm(torch._foreach_sub([p for p in params], prev)))
            dsq = torch.zeros(4).index_add_(0, gid_t, dn.float().square())
            wsq = torch.zeros(4).index_add_(0, gid_t, wn.float().square())
            upd = (dsq / wsq.clamp_min(1e-30)).sqrt()
            if spec.opt == "adam":
                vs = [opt.state[p]["exp_avg_sq"] for p in params]
                n = sum(v.numel() for v in vs)
                v_rms = (torch.stack([v.sum() for v in vs]).sum() / n).sqrt()
                v_max = torch.stack([v.amax() for v in vs]).amax().sqrt()
            else:
                v_rms = v_max = torch.tensor(math.nan)
            ml = model.max_logit() if spec.model == "gpt" else torch.tensor(math.nan)
            row = torch.cat(
                [
                    torch.tensor([lr]),
                    torch.stack([loss.detach(), gn, wn.norm()]).float(),
                    upd.float(),
                    torch.stack([v_rms, v_max, ml]).float(),
                ]
            )
        rows.append(row.tolist() + sharp)  # the one host sync of the step
        t_sharp, t_train = t_sharp + t1 - t0, t_train + time.process_time() - t1
        if not math.isfinite(rows[-1][1]):
            break
    if cost is not None:
        cost[:] = [t_train, t_sharp]
    return np.asarray(rows, dtype=np.float32)


# -- the corpus ---------------------------------------------------------------------------


def settings() -> list[tuple[str, dict, dict]]:
    """(name, the failing setting, its stable twin): keyword overrides of :class:`Spec`.

    The regression MLP (plain SGD) is stable up to an LR of about 0.26 and diverges within ~20
    steps from 0.3 on: just past that edge it can run for a while before it goes, and a
    warm-up that ramps past it fails when the LR crosses it. Settings on the transformer that
    only degrade (Adam at high LR, logit growth without qk-norm) stay in as healthy runs by
    the label rule: they are the hard negatives of the false-alarm count.
    """
    reg = dict(model="reg", opt="sgd", batch=32, momentum=0.0)
    mom = dict(reg, momentum=0.9)
    out = []
    for lr in (0.27, 0.28, 0.29):
        out.append((f"lr_edge_sgd_{lr}", dict(reg, lr=lr), dict(reg, lr=0.2)))
    for peak in (0.5, 0.6, 0.8):
        out.append(
            (
                f"warmup_past_edge_{peak}",
                dict(reg, lr=peak, warmup=400),
                dict(reg, lr=0.2, warmup=400),
            )
        )
    for peak in (0.8, 1.0, 1.5):
        out.append(
            (
                f"momentum_warmup_past_edge_{peak}",
                dict(mom, lr=peak, warmup=400),
                dict(mom, lr=0.1, warmup=400),
            )
        )
    out.append(("fp16_adam_no_scaling", dict(half=True, steps=300), dict(steps=300)))
    out.append(
        (
            "gpt_logit_growth_no_qknorm",
            dict(lr=0.1, steps=300),
            dict(lr=0.1, steps=300, qk_norm=True),
        )
    )
    out.append(
        (
            "gpt_deep_postln_no_warmup",
            dict(depth=4, post_ln=True, lr=1e-2, steps=300),
            dict(depth=4, post_ln=True, lr=1e-2, steps=300, warmup=100),
        )
    )
    return out  # fmt: skip


def specs(seeds) -> list[Spec]:
    out = []
    for name, bad, good in settings():
        gpt = bad.get("model", "gpt") == "gpt"
        for seed in seeds[:3] if gpt else seeds:
            base = Spec(name, "fail", seed)
            out.append(replace(base, **bad))
            out.append(replace(base, variant="twin", **good))
    return out


def text_data():
    text = stdlib_text()
    chars = sorted(set(text))
    idx = {c: i for i, c in enumerate(chars)}
    return torch.tensor([idx[c] for c in text], dtype=torch.long), len(chars)


def save(path: Path, runs: list[tuple[Spec, np.ndarray]], cost: np.ndarray) -> None:
    """``cost``: per run, the CPU seconds of its training steps and of its sharpness."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = np.array([repr(asdict(s)) for s, _ in runs])
    arrays = {f"r{i}": a.astype(np.float32) for i, (_, a) in enumerate(runs)}
    np.savez_compressed(path, meta=meta, columns=np.array(COLUMNS), cost=cost, **arrays)


def load(path: Path = DATA) -> list[tuple[Spec, np.ndarray]]:
    import ast

    z = np.load(path)
    return [(Spec(**ast.literal_eval(m)), z[f"r{i}"]) for i, m in enumerate(z["meta"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="one seed per setting, not saved")
    ap.add_argument("--only", default="", help="comma-separated setting names")
    ap.add_argument("--out", type=Path, default=DATA)
    ap.add_argument("--sharp-every", type=int, default=10, help="steps between sharpness "
                    "measurements (0: none, the columns stay NaN)")  # fmt: skip
    a = ap.parse_args()
    torch.set_num_threads(1)
    text = text_data()
    todo = specs(list(range(1 if a.quick else a.seeds)))
    if a.only:
        todo = [s for s in todo if s.setting in a.only.split(",")]
    runs, costs = [], []
    for s in todo:
        t0 = time.monotonic()
        costs.append([])
        r = run(s, text, a.sharp_every, cost=costs[-1])
        runs.append((s, r))
        last = r[-1, 1]
        print(
            f"{s.setting:24s} {s.variant:4s} seed={s.seed} steps={len(r)} "
            f"loss0={r[0, 1]:.2f} min={np.nanmin(r[:, 1]):.2f} last={last:.3g} "
            f"{time.monotonic() - t0:.1f}s, sharpness {costs[-1][1] / costs[-1][0]:.2f} x",
            flush=True,
        )
    if not a.quick:
        save(a.out, runs, np.asarray(costs))
        print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB, {len(runs)} runs)")


if __name__ == "__main__":
    main()
