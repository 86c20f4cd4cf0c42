"""Gradient clipping with a fused AdamW under 16-mixed and bf16-mixed.

Lightning's MixedPrecision refuses to clip for an optimizer that unscales its gradients itself (fused AdamW:
`_step_supports_amp_scaling`), and skips `scaler.unscale_` for it. torch's GradScaler needs neither: after an
explicit `unscale_` the gradients are true values (clip them), and `scaler.step` then hands the fused kernel
`grad_scale=None` with `found_inf`, so a step with inf/NaN gradients is still skipped, on the device.
`FusedClipMixedPrecision` does exactly that: unscale right after the backward (before clipping) for every
optimizer, and clip whatever the optimizer. The CLI installs it in place of Lightning's plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType


class FusedClipMixedPrecision(MixedPrecision):
    """Lightning's MixedPrecision that also clips gradients for fused optimizers (see the module docstring)."""

    @classmethod
    def replacing(cls, plugin: MixedPrecision) -> FusedClipMixedPrecision:
        """The same precision, autocast device and GradScaler (with its state) as `plugin`."""
        return cls(plugin.precision, plugin.device, plugin.scaler)

    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, model: LightningModule, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        """Lightning's step, with the gradients unscaled right after the backward for a fused optimizer too."""
        if self.scaler is None or not _optimizer_handles_unscaling(optimizer):
            return super().optimizer_step(optimizer, model, closure, **kwargs)

        def closure_then_unscale() -> Any:
            # Lightning's order for other optimizers: backward, unscale_, then clipping (in _after_closure).
            result = closure()
            if result is not None or not model.automatic_optimization:  # a skipped backward has nothing to unscale
                self.scaler.unscale_(optimizer)
            return result

        return super().optimizer_step(optimizer, model, closure_then_unscale, **kwargs)

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        """Clip the (unscaled) gradients, whatever the optimizer."""
        # The gradients are unscaled here (above, or bf16 has no scale): plain clipping is right for any optimizer.
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
