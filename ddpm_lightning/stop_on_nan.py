"""`StopOnNaN`: stop a run whose loss became NaN or infinite, naming the first such step (`model.stop_on_nan`).

The module adds it (`DDPMModule.configure_callbacks`). The loss is tracked on the device at each backward (no
wait for the GPU there) and checked every `every_n_steps` optimizer steps, at the end of each epoch, and before
every checkpoint, grid and model save.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class StopOnNaN(Callback):
    """Track the first step whose loss was NaN or infinite, and stop the run there, every `every_n_steps` steps."""

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self.first_bad_step: torch.Tensor | None = None  # on the device; -1 while every loss was finite

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Note this step if its loss is the first one not finite (on the device: no wait)."""
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, trainer.global_step, self.first_bad_step)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Check every `every_n_steps` steps, at an epoch's last batch and at the last step."""
        due = (
            trainer.global_step % self.every_n_steps == 0
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or trainer.global_step >= trainer.max_steps > 0
        )
        if due:
            self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        """Raise when a loss so far was NaN or infinite; on every rank at once (a collective).

        Also asked before each checkpoint, grid and model save (check_finite).
        """
        if self.first_bad_step is None:
            return
        first_bad = int(self.first_bad_step)
        # Every rank decides together (a collective at the same step on all ranks): no rank is left waiting.
        if trainer.strategy.reduce_boolean_decision(first_bad >= 0, all=False):
            raise FloatingPointError(
                f"The loss became NaN or infinite at step {first_bad} (rank {trainer.global_rank}): training stopped "
                "instead of going on with broken weights. Lower model.learning_rate, try trainer.precision "
                "bf16-mixed or 32-true, or check the data; resume from a checkpoint saved before that step. "
                "model.stop_on_nan false turns this check off."
            )


def check_finite(trainer: Trainer) -> None:
    """Stop the run, writing nothing, when a training loss so far was NaN or infinite.

    Asked on every rank before each checkpoint, grid and model save, so none is written from the weights that
    followed it and the last good checkpoint stays `last` (one number read from the device, at save time only).
    Without `model.stop_on_nan` (no StopOnNaN callback) nothing is checked.
    """
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnNaN):
            callback.check(trainer)
