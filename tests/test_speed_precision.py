"""Mixed precision (speed/precision.py), on the CPU in its GPU values: clipping with fused AdamW or the compiled step
under every precision, fp16's skipped step on overflow, and bf16 autocast with float32 weights."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.speed import SpeedSwitches
from ddpm_lightning.speed.precision import FusedClipMixedPrecision

from conftest import OPTIMIZERS, PRECISIONS, TINY_UNET, fit_args, max_steps, scalars, tiny_batches


def grad_norm(module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters()])).item()


class GradNorms(Callback):
    """Records the gradient norm before clipping (Lightning's hook runs after unscaling, before clipping) and
    right after the optimizer step (clipped; a step post-hook, as the module frees the gradients after the step).
    Used by class path: `--trainer.callbacks+=test_speed_precision.GradNorms`."""

    seen: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def after(*_) -> None:  # under CompiledAdamW it may run twice a step (its step, then AdamW's)
            self._after = grad_norm(pl_module.unet)

        trainer.optimizers[0].register_step_post_hook(after)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before = grad_norm(pl_module.unet)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        GradNorms.seen.append((self._before, self._after))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_adamw_trains_with_clipping_under_every_precision(precision, optimizer, image_folder, tmp_path):
    """Fused AdamW or the compiled step, with clipping (the tutorial clips at 1.0; 0.1 here, below the tiny UNet's
    gradient norm, so the clip has something to do): Lightning alone refuses to clip a fused AdamW under AMP."""
    GradNorms.seen = []
    torch._dynamo.reset()  # (a compiled step guards on its optimizer: earlier tests' would fill dynamo's cache)
    main(
        fit_args(
            image_folder,
            tmp_path / "run",
            *PRECISIONS[precision],
            *OPTIMIZERS[optimizer],
            "--trainer.gradient_clip_val",
            "0.1",
            "--model.learning_rate",
            "1e-2",
            "--model.lr_warmup_steps",
            "0",
            *max_steps(3),
            "--trainer.callbacks+=test_speed_precision.GradNorms",
        )
    )
    assert len(GradNorms.seen) == 3  # no step skipped (fp16 starts at a scale the tiny UNet does not overflow)
    for before, after in GradNorms.seen:
        assert before > 0.1  # so the clip had something to do
        assert after == pytest.approx(0.1, rel=1e-3)  # unscaled, then clipped


class InfGradientAt(Callback):
    """Makes one gradient infinite after the backward of step `step` (as an fp16 overflow would)."""

    def __init__(self, step: int):
        self.step = step
        self.params_before: dict[int, list[torch.Tensor]] = {}
        self.params_after: dict[int, list[torch.Tensor]] = {}
        self.scales: list[float] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.params_before[trainer.global_step] = [p.detach().clone() for p in pl_module.unet.parameters()]
        if trainer.global_step == self.step:
            next(pl_module.unet.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.params_after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.unet.parameters()]
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


@pytest.mark.slow
def test_fp16_fused_adamw_still_skips_the_step_when_gradients_overflow():
    spy = InfGradientAt(step=1)
    model = DDPMModule(unet=TINY_UNET, image_size=16, lr_warmup_steps=0, learning_rate=1e-2)
    trainer = Trainer(
        accelerator="cpu",
        plugins=[FusedClipMixedPrecision("16-mixed", "cpu")],
        gradient_clip_val=1.0,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy, SpeedSwitches(fused_adamw=True)],
    )
    trainer.fit(model, tiny_batches(12))
    changed = {
        step: any(not torch.equal(a, b) for a, b in zip(spy.params_before[step], spy.params_after[step]))
        for step in spy.params_after
    }
    # global_step advances even for a skipped step (Lightning counts optimizer.step calls)
    assert changed == {0: True, 1: False, 2: True}
    assert spy.scales[1] == spy.scales[0] / 2  # GradScaler saw the inf and backed off
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu_under_bf16_autocast(image_folder, tmp_path, monkeypatch):
    from ddpm_lightning.module import DDPMModule

    seen = []
    real = DDPMModule.denoising_loss

    def record(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.dtype))
        return loss

    monkeypatch.setattr(DDPMModule, "denoising_loss", record)
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            *max_steps(3),
            "--trainer.precision",
            "bf16-mixed",
        )
    )
    assert seen[:3] == [(True, torch.bfloat16, torch.float32)] * 3  # the UNet under bf16; the loss in float32
    state = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 master weights
    assert sorted(scalars(out / "logs", "train/loss")) == [0, 1, 2]
    assert all(math.isfinite(v) for v in scalars(out / "logs", "train/loss").values())
