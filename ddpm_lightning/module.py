"""The diffusion maths: `DDPMModule` trains a diffusers UNet2DModel as a DDPM and samples from it.

It holds the noise schedule, the loss (one small class per prediction type: `EpsilonLoss`, `VelocityLoss`,
`SampleLoss`), AdamW and its LR schedule and the validation loss, and samples through sampling.py. The mechanisms
around it live in their own homes: the UNet's description in unet.py, the model it may start from in
model_source.py, the weight average in ema.py, the NaN check in stop_on_nan.py, the speed switches (and AdamW's
kernel) in speed/ (`SpeedSwitches`, the run's `speed` group).

    >>> model = DDPMModule(image_size=32)  # the tutorial's UNet (untrained here)
    >>> images = model.sample(4, "ddim", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    >>> images.shape, bool(images.min() >= 0 and images.max() <= 1)
    (torch.Size([4, 3, 32, 32]), True)

The module never writes files: callbacks decide when to sample and where results go.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, SchedulerMixin
from diffusers.optimization import get_cosine_schedule_with_warmup
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn

from .ema import EMAWeights, UpdateEMA
from .model_source import check_resumed, fitted_architecture, load_model
from .sampling import Sampler, denoise, make_sampler
from .speed import CompiledAdamW, SpeedSwitches, UNetForward
from .stop_on_nan import StopOnNaN
from .unet import (
    NOISE_SCHEDULE,
    TUTORIAL_UNET,
    BetaSchedule,
    PredictionType,
    build_unet,
    check_channels,
    noise_schedule,
    schedule_changes,
    to_model_range,
)

LossWeighting = Literal["uniform", "min_snr"]


def signal_to_noise(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each timestep's signal-to-noise ratio SNR = a / (1 - a) (a: the schedule's alphas_cumprod), in float32."""
    alpha = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha / (1 - alpha)


class DenoisingLoss:
    """One prediction type's loss: what the UNet learns to predict (`target`) and each image's weight (`weight`).

    The weight comes from the SNR of the image's timestep. `gamma` None: the uniform weighting, the plain MSE of the
    target (for `SampleLoss`, times SNR as diffusers' script does, which equals the noise's MSE); a number:
    Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556), under which every type's loss is min(SNR, gamma) times the
    clean image's squared error.
    """

    def __init__(self, gamma: float | None = None) -> None:
        self.gamma = gamma

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        """The mean of each image's squared error times its weight, in float32."""
        weight = self.weight(snr)
        if weight is None:
            return F.mse_loss(prediction, target.float())
        return (weight.view(-1, 1, 1, 1) * F.mse_loss(prediction, target.float(), reduction="none")).mean()

    def target(
        self, scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet should predict for `clean` noised with `noise` at `timesteps`."""
        raise NotImplementedError

    def weight(self, snr: torch.Tensor) -> torch.Tensor | None:
        """Each image's weight from its timestep's SNR; None: all 1 (the plain mean)."""
        raise NotImplementedError


class EpsilonLoss(DenoisingLoss):
    """The noise (the tutorial's): weight 1, or min(SNR, gamma) / SNR."""

    def target(
        self, scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The noise."""
        return noise

    def weight(self, snr: torch.Tensor) -> torch.Tensor | None:
        """1, or min(SNR, gamma) / SNR, finite at SNR 0 (a zero-terminal-SNR schedule)."""
        return None if self.gamma is None else (self.gamma / snr).clamp(max=1)


class VelocityLoss(DenoisingLoss):
    """The velocity v = sqrt(a) noise - sqrt(1 - a) clean (v_prediction): weight 1, or min(SNR, gamma) / (SNR + 1)."""

    def target(
        self, scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The velocity."""
        return scheduler.get_velocity(clean, noise, timesteps)

    def weight(self, snr: torch.Tensor) -> torch.Tensor | None:
        """1, or min(SNR, gamma) / (SNR + 1) (the v weight as fixed in diffusers PR #5238)."""
        return None if self.gamma is None else snr.clamp(max=self.gamma) / (snr + 1)


class SampleLoss(DenoisingLoss):
    """The clean image (sample): weight SNR (diffusers' train_unconditional.py), or min(SNR, gamma)."""

    def target(
        self, scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The clean image."""
        return clean

    def weight(self, snr: torch.Tensor) -> torch.Tensor | None:
        """SNR, or min(SNR, gamma)."""
        return snr if self.gamma is None else snr.clamp(max=self.gamma)


LOSSES: dict[str, type[DenoisingLoss]] = {"epsilon": EpsilonLoss, "v_prediction": VelocityLoss, "sample": SampleLoss}


class DDPMModule(LightningModule):
    """A UNet2DModel trained to predict the noise that DDPMScheduler.add_noise put into an image (MSE, float32).

    Args:
        unet: keyword arguments of `diffusers.UNet2DModel` (all of them can be set); the tutorial's UNet by
            default. `sample_size` comes from `image_size`.
        pretrained: fine-tune: start from this model's UNet (architecture and weights, which replace `unet`) and
            noise schedule: a Hub model id, a diffusers folder (model_index.json, unet/, scheduler/), a bare UNet
            folder (config.json and weights) or a .ckpt of this project (its EMA weights when it has them). A
            new run, not a resume (`--ckpt_path` resumes). See docs/fine-tuning.md.
        pretrained_revision: the branch, tag or commit of a Hub `pretrained` (its main branch when left out).
        image_size: side of the square images; the CLI links it to `data.image_size`.
        learning_rate: AdamW's peak learning rate, times `learning_rate_scale`.
        learning_rate_scale: the factor on `learning_rate` (the rate used is their product): an overlay sets a rate
            relative to the config it lays over with it (configs/fine-tune.yaml: 0.2, a fifth of any config's).
        lr_warmup_steps: optimizer steps of linear warm-up before the cosine decay to 0 at the run's last step.
        adam_betas, adam_weight_decay, adam_epsilon: AdamW's other settings (torch's defaults, as the tutorial).
        num_train_timesteps, beta_schedule, beta_start, beta_end: DDPMScheduler's noise schedule. Left out
            (None), each comes from `pretrained`'s scheduler config, else DDPMScheduler's default (1000 linear
            steps from 0.0001 to 0.02, the tutorial's); `hparams` and checkpoints hold the values used.
        prediction_type: what the UNet predicts: the noise (epsilon, the tutorial's and the default), the velocity
            (v_prediction) or the clean image (sample, its loss weighted by SNR as diffusers' script does); its loss
            is `LOSSES[prediction_type]`.
        loss_weighting: each image's weight in the loss, by the signal-to-noise ratio SNR = a / (1 - a) of its
            timestep (a: alphas_cumprod). uniform: the plain MSE of the target (for `sample`, times SNR as
            diffusers' script does, which equals the noise's MSE). min_snr: Min-SNR-gamma (Hang et al. 2023,
            arXiv 2303.09556): every type's loss becomes min(SNR, gamma) times the clean image's squared error,
            i.e. the target's squared error weighted by min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) for
            sample and min(SNR, gamma) / (SNR + 1) for v_prediction (the v weight as fixed in diffusers PR #5238).
        snr_gamma: min_snr's gamma (5 in the paper).
        use_ema: an exponential moving average of the weights (`ema.py`: decay = min(1 - (1 + step /
            ema_inv_gamma) ** -ema_power, ema_max_decay)) for grids, saved folders and exports.
        val_timesteps: the validation loss is the mean over this many fixed timesteps, spread evenly over the
            schedule, with noise fixed per image, so it is comparable across epochs and runs.
        stop_on_nan: stop the run when the loss is NaN or infinite, naming the first such step (`stop_on_nan.py`,
            checked every `nan_check_every_n_steps` steps: a check waits for the GPU).

    The speed switches (compile, channels-last, fused AdamW, ...) are not arguments: they are the run's `speed`
    group, `speed.SpeedSwitches`, which the module takes from its trainer's callbacks at `setup` (the defaults
    without one) and which checkpoints do not hold.
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        pretrained: str | None = None,
        pretrained_revision: str | None = None,
        image_size: int = 128,
        learning_rate: float = 1e-4,
        learning_rate_scale: float = 1.0,
        lr_warmup_steps: int = 500,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_weight_decay: float = 0.01,
        adam_epsilon: float = 1e-8,
        num_train_timesteps: int | None = None,
        beta_schedule: BetaSchedule | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        prediction_type: PredictionType | None = None,
        loss_weighting: LossWeighting = "uniform",
        snr_gamma: float = 5.0,
        use_ema: bool = False,
        ema_max_decay: float = 0.9999,
        ema_inv_gamma: float = 1.0,
        ema_power: float = 0.75,
        val_timesteps: int = 10,
        stop_on_nan: bool = True,
        nan_check_every_n_steps: int = 10,
    ) -> None:
        super().__init__()
        if not learning_rate_scale > 0:
            raise ValueError(
                f"learning_rate_scale={learning_rate_scale}: the factor on learning_rate must be positive (1.0: as is)."
            )
        if not snr_gamma > 0:
            raise ValueError(f"snr_gamma={snr_gamma}: min-SNR's gamma must be positive (5.0 in the paper).")
        self.save_hyperparameters()
        found = load_model(pretrained, pretrained_revision) if pretrained is not None else None
        self.base_model = found.base_model if found else None  # what it is fine-tuned from (card, run summary)
        if found is not None:
            unet = self.hparams.unet = fitted_architecture(found, unet, image_size)  # (checkpoints rebuild it)
        self.unet = build_unet(TUTORIAL_UNET if unet is None else unet, image_size)
        if found is not None:  # at construction: a resumed run's checkpoint then overwrites these weights
            self.unet.load_state_dict(found.unet.state_dict())
        chosen = {k: self.hparams[k] for k in NOISE_SCHEDULE}
        changed = schedule_changes(chosen, found.scheduler_config) if found else {}
        if changed:  # e.g. a config's v-prediction over an epsilon model: its first steps unlearn its output
            shown = ", ".join(f"{k} {theirs} -> {ours}" for k, (theirs, ours) in changed.items())
            rank_zero_warn(
                f"model.pretrained {pretrained} learnt another noise schedule than this run's ({shown}): it "
                f"relearns it from there. To keep the model's, set {', '.join(f'--model.{k} null' for k in changed)}"
                " (configs/fine-tune.yaml does for prediction_type)."
            )
        self.noise_scheduler = noise_schedule(chosen, found.scheduler_config if found else {})
        self.hparams.update({k: self.noise_scheduler.config[k] for k in NOISE_SCHEDULE})  # the values used
        gamma = snr_gamma if loss_weighting == "min_snr" else None
        self.loss = LOSSES[self.noise_scheduler.config.prediction_type](gamma)
        self.ema = EMAWeights(self.unet, ema_max_decay, ema_inv_gamma, ema_power) if use_ema else None
        self.speed = SpeedSwitches()  # the run's, from `setup` on
        self.unet_forward = UNetForward()  # eager until configure_model compiles it (`speed.compile`)

    def setup(self, stage: str) -> None:
        """Take the run's speed switches (its trainer's `SpeedSwitches`); check the UNet's channels are the data's."""
        self.speed = SpeedSwitches.of(self.trainer) or self.speed
        check_channels(self.unet, getattr(self.trainer.datamodule, "channels", None), self.base_model)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The batch's denoising loss, logged with the learning rate."""
        loss = self.denoising_loss(self.speed.batch(batch))
        self.log("train/loss", loss)  # not prog_bar=True, read back every step: progress.py shows it every N
        lr = self.lr_schedulers().get_last_lr()[0]  # a device tensor under CompiledAdamW, filled in place: copy it
        self.log("train/lr", lr.clone() if isinstance(lr, torch.Tensor) else lr)
        return loss

    def denoising_loss(
        self, clean: torch.Tensor, noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MSE between the UNet's prediction and its target at random (or given) timesteps, in float32.

        Each image is weighted as its prediction type's loss (`self.loss`, from `LOSSES`) weights it.
        """
        if noise is None:  # drawn in the standard layout: channels_last draws the same noise as the plain path
            noise = torch.randn_like(clean, memory_format=torch.contiguous_format)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device
            )
        prediction, target = self.prediction_and_target(clean, noise, timesteps)
        return self.loss(prediction, target, signal_to_noise(self.noise_scheduler, timesteps))

    def prediction_and_target(
        self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's prediction (float32) for `clean` noised with `noise` at `timesteps`, and what it should be."""
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.unet_forward.train(self.unet, noisy, timesteps).float()
        return prediction, self.loss.target(self.noise_scheduler, clean, noise, timesteps)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """The denoising loss at `val_timesteps` fixed timesteps with noise fixed per image (seeded by its index)."""
        index, images = batch
        images = to_model_range(images)  # no flip: the same input every epoch
        noise, steps = self.validation_noise(index, images), self.validation_timesteps()
        values = {"val/loss": self.fixed_loss(images, noise, steps)}
        if self.ema is not None:
            with self.ema_weights():
                values["val/loss_ema"] = self.fixed_loss(images, noise, steps)
        self.log_dict(values, on_epoch=True, sync_dist=True, batch_size=len(images))

    def validation_noise(self, index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Noise for each held-out image, fixed by its index: the same every epoch and on any number of ranks."""
        seeded = [torch.Generator().manual_seed(int(i)) for i in index]
        return torch.stack([torch.randn(images.shape[1:], generator=g) for g in seeded]).to(images.device)

    def validation_timesteps(self) -> torch.Tensor:
        """The `val_timesteps` timesteps the validation loss is taken at, evenly spread over the schedule."""
        last = self.noise_scheduler.config.num_train_timesteps - 1
        return torch.linspace(0, last, self.hparams.val_timesteps).long()

    def fixed_loss(self, images: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The mean denoising loss over `steps`, with the given noise."""
        losses = [self.denoising_loss(images, noise, t.expand(len(images)).to(images.device)) for t in steps]
        return torch.stack(losses).mean()

    @property
    def peak_learning_rate(self) -> float:
        """The rate AdamW reaches after the warm-up: `learning_rate` times `learning_rate_scale`."""
        return self.hparams.learning_rate * self.hparams.learning_rate_scale

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (as the speed switches choose it) and the warm-up + cosine schedule, stepped per optimizer step."""
        hp = self.hparams
        adamw = {"lr": self.peak_learning_rate, "betas": hp.adam_betas, "weight_decay": hp.adam_weight_decay}
        adamw["eps"] = hp.adam_epsilon
        optimizer = self.speed.adamw(self.unet.parameters(), adamw, self.trainer)
        # Per optimizer step, over the whole run as the Trainer counts it (devices, accumulation, max_steps).
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "the run has no set length (trainer.max_epochs -1 and no trainer.max_steps), which the learning-rate "
                "schedule needs: set --trainer.max_steps or --trainer.max_epochs (trainer.max_time may still stop it "
                "sooner)"
            )
        total = int(total)
        if hp.lr_warmup_steps >= total:
            rank_zero_warn(
                f"lr_warmup_steps={hp.lr_warmup_steps} is not shorter than the run ({total} optimizer steps): the "
                f"learning rate never reaches its peak {self.peak_learning_rate:g}. Lower model.lr_warmup_steps."
            )
        lr_schedule = get_cosine_schedule_with_warmup(optimizer, hp.lr_warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_schedule, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's optimizer step, then the gradients freed."""
        super().optimizer_step(*args, **kwargs)
        # Freed once used, as the tutorial's loop does. Under CUDA graphs they are the backward graph's outputs, in
        # its memory pool, which the next replay (a training step, a grid) overwrites: nothing may touch them after
        # (Lightning's teardown moves them with the module, `module.cpu()`).
        self.unet.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except for CompiledAdamW, which clips inside its compiled step."""
        if not isinstance(optimizer, CompiledAdamW):  # that one clips inside its compiled step
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # The mechanisms around the maths, each in its own file.
    def configure_model(self) -> None:
        """Apply the speed switches (compile, channels-last, ...) to the UNet."""
        self.speed.apply(self.unet, self.unet_forward)

    def configure_callbacks(self) -> list:
        """StopOnNaN and UpdateEMA, when they are on."""
        nan_check = [StopOnNaN(self.hparams.nan_check_every_n_steps)] if self.hparams.stop_on_nan else []
        return nan_check + ([UpdateEMA()] if self.ema is not None else [])

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Within the block, the UNet holds the EMA weights (when EMA is on); the raw ones come back after."""
        return self.ema.applied(self.unet) if self.ema is not None else contextlib.nullcontext()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the EMA state and the model fine-tuned from."""
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self.base_model is not None:  # for `ddpm-lightning export`'s card
            checkpoint["base_model"] = self.base_model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the resumed run's `pretrained`, and restore the EMA state."""
        check_resumed(checkpoint.get("hyper_parameters", {}).get("pretrained"), self.hparams.pretrained)
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def sample(
        self,
        n: int,
        sampler: Sampler | SchedulerMixin = "ddpm",
        num_inference_steps: int = 1000,
        generator: torch.Generator | None = None,
        on_step: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """`n` images in [0, 1], (n, C, H, W), drawn as DDPMPipeline draws them (`sampling.denoise`).

        They are drawn with this model's noise schedule and (when `speed.compile` is on) its compiled forward.
        `sampler` is a name or a scheduler; `generator` makes the draw repeatable without touching the global RNG;
        `on_step` is called after each step.
        """
        sampler = make_sampler(self.noise_scheduler, cast(Sampler, sampler)) if isinstance(sampler, str) else sampler
        forward = functools.partial(self.unet_forward.sample, self.unet)
        return denoise(self.unet, sampler, num_inference_steps, generator, n, on_step, forward=forward)
