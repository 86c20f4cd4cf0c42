"""Progress bars: the training bar without a GPU sync per step, and a bar for long work outside the training loop.

The training bar is `TrainingProgressBar`; `progress_bar` is the other (caching the images, drawing a grid).

Lightning turns every value logged with `prog_bar=True` into a Python number after each batch
(`_ResultCollection.metrics`: `convert_tensors_to_scalars`), whether or not a bar shows it: a read of a device
tensor, so a wait for the GPU every step. So DDPMModule logs train/loss and train/lr (and ImagesThroughput img/s)
without it, and this bar reads them from `trainer.callback_metrics` (device tensors, left unread by Lightning) every
`log_every_n_steps` optimizer steps, when the loggers read them anyway, and at the first step. The CLI puts it in
place of Lightning's default bar.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

SHOWN = ("img/s", "train/loss", "train/lr")  # img/s: logged by monitor.ImagesThroughput on log steps


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with img/s, train/loss and train/lr as of the last log step.

    The log step is every `log_every_n_steps` steps (Lightning's default cadence, 50 steps, when it is 0).
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self.shown: dict[str, str] = {}
        self.read_at: int | None = None  # the optimizer step of the values shown

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Read the values shown on a log step (once per optimizer step), then update the bar."""
        step = trainer.global_step
        due = self.read_at is None or step % (trainer.log_every_n_steps or 50) == 0
        if due and step != self.read_at:  # once per optimizer step, not per micro-batch under accumulation
            metrics = trainer.callback_metrics
            self.shown = {name: f"{float(metrics[name]):.4g}" for name in SHOWN if name in metrics}
            self.read_at = step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        """Lightning's values, with the ones read on the last log step."""
        return {**super().get_metrics(trainer, pl_module), **self.shown}


def progress_bar(trainer: Trainer | None, description: str, total: int, unit: str) -> Tqdm:
    """Lightning's tqdm bar for long work outside the training loop.

    It is shown on rank 0 while the Trainer shows progress bars (disabled, silent, otherwise). The caller updates
    and closes it.
    """
    shown = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
    options = {"dynamic_ncols": True, "leave": False, "file": sys.stdout, "disable": not shown}
    return Tqdm(total=total, desc=description, unit=unit, **options)
