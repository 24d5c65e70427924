"""Arc inside the Hugging Face ``Trainer``: ``ArcTrainer`` (or ``ArcTrainerMixin``) with
``ArcTrainerCallback``.

HF callbacks never see the loss, and ``Arc.step(loss)`` needs it before the optimizer step, so
the work is split: the mixin's ``training_step`` hands each micro-batch's loss to the callback,
and the callback runs Arc in ``on_pre_optimizer_step`` (transformers >= 4.41). Where Arc sits in
the Trainer's step::

    training_step (forward, backward)   # ArcTrainerMixin: callback.add_loss(loss)
    gradient clipping (max_grad_norm)   # Arc sees the clipped gradients (NaN stays NaN)
    on_pre_optimizer_step               # arc.step(loss); on skip/rollback: grads None
    optimizer.step()                    # a no-op for parameters without grads
    lr_scheduler.step()                 # the Trainer steps it regardless
    on_step_end                         # the callback undoes that scheduler step

``state.global_step`` counts the Trainer's optimizer steps, skipped and rolled-back ones
included, so ``max_steps`` bounds the batches consumed; ``trainer.arc.global_step`` counts the
updates in the model's state. Arc's own state is written as ``arc_state.pt`` into every HF
checkpoint folder and read back by ``train(resume_from_checkpoint=...)``. See
docs/integrations.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..controller import Action, Arc
from ._common import (
    HeldSchedule,
    LossAccumulator,
    check_arc_kwargs,
    drop_grads,
    unwrap_optimizer,
    unwrap_scheduler,
)

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:
    raise ImportError(
        "arc_dist.integrations.hf needs transformers: pip install 'arc-dist[hf]'"
    ) from e

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
    import transformers

    raise ImportError(
        f"arc_dist.integrations.hf needs transformers >= 4.41 (TrainerCallback.on_pre_optimizer_step); "
        f"found {transformers.__version__}"
    )

log = logging.getLogger("arc_dist")

__all__ = ["ARC_STATE_FILE", "ArcTrainer", "ArcTrainerCallback", "ArcTrainerMixin"]

#: the file in each HF checkpoint folder that holds Arc's own state
ARC_STATE_FILE = "arc_state.pt"


class ArcTrainerCallback(TrainerCallback):
    """Runs :class:`~arc_dist.Arc` on every optimizer step of an :class:`ArcTrainer`.

    ``ArcTrainerCallback(**arc_kwargs)`` takes ``Arc``'s keyword arguments (``checkpoint_dir``,
    ``config``, ``chaos``, ``log_dir``, ...); the model, optimizer and LR scheduler come from the
    trainer when training begins. It needs the trainer's loss, so use it through
    :class:`ArcTrainer` or a ``Trainer`` subclass with :class:`ArcTrainerMixin` (which create one
    when none is given).

    Not supported: ``fp16=True`` (its GradScaler skips steps on its own; use ``bf16``),
    DeepSpeed, and FSDP through accelerate.
    """

    def __init__(self, **arc_kwargs: Any):
        self.arc_kwargs = check_arc_kwargs("ArcTrainerCallback", arc_kwargs)
        self.arc: Arc | None = None
        #: the Action of the most recent optimizer step
        self.last_action: Action | None = None
        #: the trainer this callback serves (set by ArcTrainerMixin)
        self.trainer: Trainer | None = None
        self._loss = LossAccumulator()
        self._held: HeldSchedule | None = None
        self._resume_from: str | None = None  # the HF checkpoint train() resumes from

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, as ``Trainer.training_step`` returned it."""
        self._loss.add(loss)

    # -- set-up and tear-down ------------------------------------------------------------
    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs
    ):
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(
                "ArcTrainerCallback needs each step's loss, which Trainer callbacks do not "
                "receive: train with arc_dist.integrations.hf.ArcTrainer, or add ArcTrainerMixin "
                "to your Trainer subclass (class MyTrainer(ArcTrainerMixin, Trainer))"
            )
        if getattr(trainer.accelerator, "scaler", None) is not None:
            raise ValueError(
                "ArcTrainerCallback does not support fp16=True (its GradScaler skips steps on "
                "its own); use bf16=True or full precision"
            )
        previous = None
        if self.arc is not None:  # a second train() continues the first one's state
            previous = self.arc.state_dict()
            self.arc.close()
        wrapped = trainer.model_wrapped
        module = wrapped if isinstance(wrapped, DistributedDataParallel) else model
        self.arc = Arc(
            module, unwrap_optimizer(optimizer), unwrap_scheduler(lr_scheduler), **self.arc_kwargs
        )
        saved = self._load_saved(self._resume_from) if self._resume_from else None
        if saved is not None or previous is not None:
            self.arc.load_state_dict(saved if saved is not None else previous)
        self._loss.take()
        self._held = None

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close Arc (waits for pending checkpoint writes); ArcTrainerMixin.train calls it."""
        if self.arc is not None:
            self.arc.close()

    # -- the step ------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        loss = self._loss.take()
        if loss is None:
            raise RuntimeError(
                f"ArcTrainerCallback got no loss for step {state.global_step}: the trainer's "
                "training_step must pass it on (use ArcTrainer or ArcTrainerMixin, and call "
                "super().training_step() if you override it)"
            )
        assert self.arc is not None, "on_train_begin builds Arc"
        action = self.arc.step(loss)  # collective: every rank gets the same action
        self.last_action = action
        if action.should_skip:
            # Arc restored the state (rollback) and cleared the grads; optimizer.step() finds
            # no grads and changes nothing
            drop_grads(self.arc.optimizer)
            self._held = HeldSchedule(self.arc.optimizer, [self.arc.scheduler])

    def on_step_end(self, args, state, control, **kwargs):
        # after the Trainer's lr_scheduler.step(): undo it for a skipped update
        if self._held is not None:
            self._held.restore()
            self._held = None

    # -- HF checkpoints ------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if self.arc is None or not state.is_world_process_zero:
            return  # Arc's state is the same on every rank (it is built from agreed signals)
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning(
                "arc_dist: HF checkpoint folder %s not found; Arc's state not saved", folder
            )
            return
        tmp = os.path.join(folder, ARC_STATE_FILE + ".tmp")
        torch.save(self.arc.state_dict(), tmp)
        os.replace(tmp, os.path.join(folder, ARC_STATE_FILE))

    @staticmethod
    def _load_saved(folder: str) -> dict | None:
        path = os.path.join(folder, ARC_STATE_FILE)
        if not os.path.exists(path):
            log.warning(
                "arc_dist: %s has no %s; Arc starts with fresh state", folder, ARC_STATE_FILE
            )
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


class ArcTrainerMixin:
    """Adds Arc to a ``transformers.Trainer`` subclass: ``class T(ArcTrainerMixin, Trainer)``.

    Takes ``arc_callback=ArcTrainerCallback(...)`` (or finds one in ``callbacks``, or creates a
    default one), passes every micro-batch's loss to it, closes Arc when ``train`` returns or
    raises, and adds ``arc_rollbacks``/``arc_skips`` to the training logs.
    """

    def __init__(self, *args: Any, arc_callback: ArcTrainerCallback | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ArcTrainerCallback)]
        if len(found) > 1 or (arc_callback is not None and found and found[0] is not arc_callback):
            raise ValueError(
                "ArcTrainer: more than one ArcTrainerCallback; pass one, as arc_callback= or in callbacks="
            )
        if arc_callback is None:
            arc_callback = found[0] if found else ArcTrainerCallback()
        if not found:
            self.add_callback(arc_callback)
        arc_callback.trainer = self  # type: ignore[assignment]
        self.arc_callback = arc_callback

    @property
    def arc(self) -> Arc | None:
        """The controller of the current (or last) ``train()``."""
        return self.arc_callback.arc

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.arc_callback.add_loss(loss)
        return loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        # the same resolution as Trainer.train, to find the folder holding Arc's state
        if resume_from_checkpoint is True:
            last = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            resume_from_checkpoint = last if last is not None else True  # None: Trainer raises
        self.arc_callback._resume_from = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.arc_callback.close()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        arc = self.arc_callback.arc
        if arc is not None and "loss" in logs:  # training logs only
            stats = arc.stats()
            logs = {**logs, "arc_rollbacks": stats["rollbacks"], "arc_skips": stats["skips"]}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class ArcTrainer(ArcTrainerMixin, Trainer):
    """``transformers.Trainer`` with Arc: ``ArcTrainer(model, args, ..., arc_callback=ArcTrainerCallback(config=...))``."""
