"""Arc in a PyTorch Lightning run: a NaN loss at step 35, rolled back, training goes on.

A small MLP learns a noisy linear map from synthetic data on the CPU in a few seconds. The
only Arc-specific line is the callback::

    trainer = L.Trainer(max_steps=80, callbacks=[ArcCallback(config=ArcConfig(snapshot_every=10))])

Run it (add ``--chaos ""`` for a fault-free run; ``--devices 2`` runs DDP over gloo, with
Lightning starting the second process, here with the NaN on rank 1 only)::

    python examples/lightning_example.py --chaos nan_loss@35
    python examples/lightning_example.py --devices 2 --chaos nan_loss@35/1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from arc_dist import ArcConfig
from arc_dist.integrations.lightning import ArcCallback
from arc_dist.silent import replica_digest

DIM = 16


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(
        DIM, 1, generator=torch.Generator().manual_seed(1234)
    )  # the same task everywhere
    x = torch.randn(n, DIM, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 1e-2):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)  # through forward(): where chaos injects faults
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def evaluate(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def main(
    max_steps: int = 80,
    chaos: str | None = "nan_loss@35",
    *,
    config: ArcConfig | None = None,
    seed: int = 0,
    same_batch: bool = False,
    root_dir: str | None = None,
    ckpt_path: str | None = None,
    save_to: str | None = None,
    devices: int = 1,
) -> dict:
    """Train, return ``final_loss`` (held-out MSE), ``trainer_steps``, ``arc_steps``, ``stats``
    (Arc's), ``model`` and ``callback``.

    ``same_batch`` makes every batch the same one (a full-batch run), so a rolled-back run is
    reproducible to the bit; ``ckpt_path`` resumes a Lightning checkpoint, ``save_to`` writes one
    at the end. ``devices > 1`` trains with DDP (gloo); every rank returns its own results.
    """
    torch.manual_seed(seed)
    train = make_data(256 if same_batch else 2048, seed)
    loader = DataLoader(
        train,
        batch_size=len(train) if same_batch else 32,
        shuffle=not same_batch,
        generator=torch.Generator().manual_seed(seed),
    )
    model = Regressor()
    callback = ArcCallback(config=config or ArcConfig(snapshot_every=10), chaos=chaos or "")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    assert callback.arc is not None
    return {
        "rank": trainer.global_rank,
        "final_loss": evaluate(model, make_data(512, seed + 1)),
        "trainer_steps": trainer.global_step,
        "arc_steps": callback.arc.global_step,
        "stats": callback.arc.stats(),
        "model": model,
        "callback": callback,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument(
        "--chaos", default="nan_loss@35", help='fault spec (arc_dist.chaos); "" for none'
    )
    parser.add_argument("--devices", type=int, default=1, help="processes (DDP over gloo when > 1)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line of results per rank"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = main(args.steps, args.chaos, devices=args.devices)
    s = out["stats"]
    if args.json:
        chaos = out["callback"].arc.chaos  # None without a fault plan
        fired = chaos.fired if chaos else []
        print(
            "RESULT "
            + json.dumps(
                {
                    "rank": out["rank"],
                    "trainer_steps": out["trainer_steps"],
                    "arc_steps": out["arc_steps"],
                    "rollbacks": s["rollbacks"],
                    "failures": s["failures"],
                    "fast_steps": s["fast_steps"],
                    "final_loss": out["final_loss"],
                    "fired": [list(f) for f in fired],
                    "weights": replica_digest(out["model"]),
                }
            ),
            flush=True,
        )
    else:
        print(
            f"[rank {out['rank']}] lightning steps {out['trainer_steps']}, updates in the model "
            f"{out['arc_steps']}, rollbacks {s['rollbacks']}, skips {s['skips']}, "
            f"held-out loss {out['final_loss']:.4f}"
        )
    raise SystemExit(0 if math.isfinite(out["final_loss"]) else 1)
