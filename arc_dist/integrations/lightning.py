"""``ArcCallback``: Arc inside a PyTorch Lightning ``Trainer`` (automatic optimization).

Where Arc sits in Lightning's step (``Precision.optimizer_step`` runs the closure inside
``optimizer.step``)::

    training_step -> on_before_backward(loss)      # the callback sums the step's loss
                  -> backward -> on_after_backward
    on_before_optimizer_step                        # arc.step(loss); on skip/rollback: grads None
    gradient clipping -> optimizer's own update     # a no-op for parameters without grads
    scheduler.step() (interval="step")              # Lightning steps it regardless
    on_train_batch_end                              # the callback undoes that scheduler step

``trainer.global_step`` counts Lightning's optimizer steps, the skipped and rolled-back ones
included, so ``max_steps`` bounds the batches consumed; ``callback.arc.global_step`` counts the
updates in the model's state (it goes back on a rollback). Arc's own state is saved with
Lightning checkpoints (``state_dict``/``load_state_dict`` of the callback). See
docs/integrations.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..controller import Action, Arc
from ._common import HeldSchedule, LossAccumulator, check_arc_kwargs, drop_grads

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "arc_dist.integrations.lightning needs PyTorch Lightning: pip install 'arc-dist[lightning]'"
        ) from e

log = logging.getLogger("arc_dist")

__all__ = ["ArcCallback"]


class ArcCallback(pl.Callback):
    """Runs :class:`~arc_dist.Arc` on every optimizer step of a Lightning ``Trainer``.

    ``ArcCallback(**arc_kwargs)`` takes ``Arc``'s keyword arguments (``checkpoint_dir``,
    ``config``, ``chaos``, ``log_dir``, ...); the model, optimizer and LR scheduler come from the
    trainer when fitting starts. ``log_metrics`` logs ``arc/loss``, ``arc/grad_norm``,
    ``arc/rollbacks`` and ``arc/skips`` through ``LightningModule.log`` on every step.

    Requirements: automatic optimization with one optimizer, at most one LR scheduler, and a
    precision without a GradScaler (``32``, ``bf16-mixed``, ``bf16-true``). Forward-pass chaos
    faults (``nan_loss`` ...) fire when ``training_step`` calls ``self(...)``, i.e. the module's
    ``forward`` (or under DDP, where the hook sits on the DDP wrapper).

    After ``fit``, :attr:`arc` is the (closed) controller of that run, for ``arc.stats()``.
    """

    def __init__(self, *, log_metrics: bool = True, **arc_kwargs: Any):
        self.arc_kwargs = check_arc_kwargs("ArcCallback", arc_kwargs)
        self.log_metrics = log_metrics
        self.arc: Arc | None = None
        #: the Action of the most recent optimizer step
        self.last_action: Action | None = None
        self._loss = LossAccumulator()
        self._held: HeldSchedule | None = None
        self._pending: dict | None = None  # Arc state loaded before Arc exists
        self._running = False  # between on_fit_start and the end of that fit

    # -- set-up and tear-down ------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "ArcCallback supports automatic optimization only; with automatic_optimization="
                "False call arc.step(loss) yourself in training_step, after manual_backward() "
                "and before opt.step(), and skip opt.step() when action.should_skip"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"ArcCallback needs exactly one optimizer, configure_optimizers returned "
                f"{len(trainer.optimizers)}"
            )
        configs = trainer.lr_scheduler_configs
        if len(configs) > 1:
            raise ValueError(
                f"ArcCallback supports at most one LR scheduler, configure_optimizers returned "
                f"{len(configs)}; chain them into one (torch.optim.lr_scheduler.SequentialLR)"
            )
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"ArcCallback does not support precision={trainer.precision!r} (a GradScaler "
                "skips steps on its own); use precision='bf16-mixed' or '32-true'"
            )
        if self.arc is not None:  # a second fit() with the same callback continues its state
            if self._pending is None:
                self._pending = self.arc.state_dict()
            self.arc.close()
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            model = pl_module
        scheduler = configs[0].scheduler if configs else None
        self.arc = Arc(model, trainer.optimizers[0], scheduler, **self.arc_kwargs)
        if self._pending is not None:
            self.arc.load_state_dict(self._pending)
            self._pending = None
        self._loss.take()
        self._held = None
        self._running = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _close(self) -> None:
        self._running = False
        if self.arc is not None:
            self.arc.close()

    # -- the step ------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        # Lightning has divided it by accumulate_grad_batches: the sum is the step's mean loss
        self._loss.add(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        loss = self._loss.take()
        if loss is None or self.arc is None:  # training_step returned None: no backward ran
            return
        action = self.arc.step(loss)  # collective: every rank gets the same action
        self.last_action = action
        if action.should_skip:
            # Arc restored the state (rollback) and cleared the grads; the optimizer step that
            # Lightning runs next finds no grads and changes nothing
            drop_grads(self.arc.optimizer)
            self._held = HeldSchedule(
                self.arc.optimizer,
                [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"],
            )
        if self.log_metrics:
            stats = self.arc.stats()
            pl_module.log_dict(
                {
                    "arc/loss": action.loss,
                    "arc/grad_norm": action.grad_norm,
                    "arc/rollbacks": float(stats["rollbacks"]),
                    "arc/skips": float(stats["skips"]),
                },
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # runs after Lightning's update_lr_schedulers("step"): undo a skipped step's scheduler step
        if self._held is not None:
            self._held.restore()
            self._held = None

    # -- Lightning checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.arc is not None:
            return {"arc": self.arc.state_dict()}
        return {"arc": self._pending} if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # called before on_fit_start by default (before Arc exists), after it for strategies
        # that restore after setup
        state = state_dict.get("arc")
        if state is None:
            return
        if self._running and self.arc is not None:
            self.arc.load_state_dict(state)
        else:
            self._pending = state
