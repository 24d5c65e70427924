"""Arc in a Hugging Face ``Trainer`` run: a NaN loss at step 35, rolled back, training goes on.

A one-layer GPT-2 built from a config (no download) learns synthetic sequences (arithmetic
progressions mod 64) on the CPU in a few seconds. The Arc-specific part is the trainer class::

    trainer = ArcTrainer(model, args, train_dataset=data,
                         arc_callback=ArcTrainerCallback(config=ArcConfig(snapshot_every=10)))

Run it (add ``--chaos ""`` for a fault-free run; under torchrun it trains with DDP over gloo,
here with the NaN on rank 1 only)::

    python examples/hf_example.py --chaos nan_loss@35
    torchrun --standalone --nproc-per-node 2 examples/hf_example.py --chaos nan_loss@35/1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from arc_dist import ArcConfig
from arc_dist.integrations.hf import ArcTrainer, ArcTrainerCallback
from arc_dist.silent import replica_digest

VOCAB, LENGTH = 64, 16


class Progressions(Dataset):
    """``(start + stride * t) % 64`` for t < 16: learnable from its first two tokens."""

    def __init__(self, n: int, seed: int, same: bool = False):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 6, (n, 1), generator=g)
        if same:  # one sequence n times: every batch is the same, whatever the order
            start, stride = start[:1].expand(n, 1), stride[:1].expand(n, 1)
        self.ids = (start + stride * torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def evaluate(model: GPT2LMHeadModel, data: Progressions) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=data.ids, labels=data.ids).loss)


def main(
    max_steps: int = 80,
    chaos: str | None = "nan_loss@35",
    *,
    config: ArcConfig | None = None,
    seed: int = 0,
    same_batch: bool = False,
    output_dir: str | None = None,
    save_steps: int | None = None,
    resume: bool = False,
) -> dict:
    """Train, return ``final_loss`` (held-out LM loss), ``trainer_steps``, ``arc_steps``,
    ``stats`` (Arc's), ``model`` and ``trainer``.

    ``same_batch`` makes every batch the same, so a rolled-back run is reproducible to the bit;
    ``save_steps`` writes HF checkpoints (with Arc's state) to ``output_dir``; ``resume``
    continues from the newest one there.
    """
    torch.manual_seed(seed)
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.7)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            max_steps=max_steps,
            per_device_train_batch_size=16,
            use_cpu=True,
            seed=seed,
            report_to="none",
            disable_tqdm=True,
            logging_steps=10,
            save_strategy="steps" if save_steps else "no",
            save_steps=save_steps or 500,
            dataloader_num_workers=0,
        )
        trainer = ArcTrainer(
            model,
            args,
            train_dataset=Progressions(256 if same_batch else 4096, seed, same=same_batch),
            optimizers=(opt, sched),
            arc_callback=ArcTrainerCallback(
                config=config or ArcConfig(snapshot_every=10), chaos=chaos or ""
            ),
        )
        trainer.train(resume_from_checkpoint=True if resume else None)
    assert trainer.arc is not None
    return {
        "rank": trainer.args.process_index,
        "final_loss": evaluate(model, Progressions(256, seed + 1)),
        "trainer_steps": trainer.state.global_step,
        "arc_steps": trainer.arc.global_step,
        "stats": trainer.arc.stats(),
        "model": model,
        "trainer": trainer,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument(
        "--chaos", default="nan_loss@35", help='fault spec (arc_dist.chaos); "" for none'
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line of results per rank"
    )
    cli = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = main(cli.steps, cli.chaos)
    chaos = out["trainer"].arc.chaos  # None without a fault plan
    s = out["stats"]
    if cli.json:
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
                    "fired": [list(f) for f in (chaos.fired if chaos else [])],
                    "weights": replica_digest(out["model"]),
                }
            ),
            flush=True,
        )
    else:
        print(
            f"[rank {out['rank']}] trainer steps {out['trainer_steps']}, updates in the model "
            f"{out['arc_steps']}, rollbacks {s['rollbacks']}, skips {s['skips']}, "
            f"held-out loss {out['final_loss']:.4f}"
        )
    raise SystemExit(0 if math.isfinite(out["final_loss"]) else 1)
