"""`EMAWeights`: the exponential moving average of the UNet's weights (`model.use_ema`).

It is diffusers' EMAModel with warm-up, updated once per optimizer step and swapped into the UNet for grids, saves
and exports.

Its state is EMAModel's own (`state_dict`), which `DDPMModule` saves as `checkpoint["ema"]`; `UpdateEMA`, a callback
the module adds, averages the weights in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch import Callback, LightningModule, Trainer


class EMAWeights(EMAModel):
    """decay = min(1 - (1 + step / inv_gamma) ** -power, max_decay), counted in optimizer steps."""

    def __init__(self, unet: torch.nn.Module, max_decay: float, inv_gamma: float, power: float) -> None:
        super().__init__(unet.parameters(), decay=max_decay, use_ema_warmup=True, inv_gamma=inv_gamma, power=power)
        self.last_step: int | None = None  # the optimizer step last averaged in (set at the start of training)

    def update(self, unet: torch.nn.Module, global_step: int) -> None:
        """Average in the weights once per optimizer step (not per micro-batch under gradient accumulation).

        Every rank holds the same all-reduced weights, so every rank's average is the same.
        """
        if global_step == self.last_step:
            return
        self.to(next(unet.parameters()).device)
        self.step(unet.parameters())
        self.last_step = global_step

    @contextmanager
    def applied(self, unet: torch.nn.Module) -> Iterator[None]:
        """Within the block, `unet` holds the EMA weights; its own come back after."""
        parameters = list(unet.parameters())
        self.to(parameters[0].device)
        self.store(parameters)
        self.copy_to(parameters)
        try:
            yield
        finally:
            self.restore(parameters)


class UpdateEMA(Callback):
    """Averages `pl_module.ema` in after each optimizer step.

    A callback, not a module hook: Lightning runs every callback's hook before the module's and ModelCheckpoint's
    last, so a checkpoint written at a step holds that step's average.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start from the run's step: no average in yet at this step."""
        pl_module.ema.last_step = trainer.global_step  # (a resumed run's average holds the steps before)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Average the weights in (once per optimizer step)."""
        pl_module.ema.update(pl_module.unet, trainer.global_step)
