"""Sampling, in one place for the module, the callbacks and `ddpm-lightning sample`.

It holds the inference samplers (`make_sampler`) and DDPMPipeline's denoising loop (`denoise`). Pure: no Trainer,
no files, no loggers (a rank's share of a grid is callbacks.py's, writing grids is reporting/grids.py's).

Words: a "sampler" is the inference algorithm (ddpm, ddim, dpmsolver++; `grid.sampler`), built as a diffusers
scheduler by `make_sampler`; the "noise scheduler" is the training schedule (`DDPMModule.noise_scheduler`); the
training loader's torch Sampler is `data.datamodule.EpochOrder`; the LR schedule is the optimizer's.

    images = denoise(model.unet, make_sampler(model.noise_scheduler, "ddim"), 50, torch.Generator(), n=16)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .unet import predict

Sampler = Literal["ddpm", "ddim", "dpmsolver++"]
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_sampler(noise_scheduler: SchedulerMixin | dict[str, Any], sampler: Sampler = "ddpm") -> SchedulerMixin:
    """A fresh `sampler` scheduler with the noise schedule of `noise_scheduler`, and its betas themselves.

    `noise_scheduler` is a scheduler or its config, e.g. a saved folder's; the betas are passed because DDIM and
    DPM-Solver++ cannot build beta_schedule "sigmoid".

    diffusers' `from_config` passes on only the values a scheduler was given, not those it took by default
    (`_use_default_values`), but a config read back from a file has lost that list: a saved DDPMScheduler would
    then hand its default `timestep_spacing="leading"` to DPMSolverMultistepScheduler, whose own is "linspace".
    So values equal to their class's defaults are marked as defaults again.
    """
    config = dict(getattr(noise_scheduler, "config", noise_scheduler))
    if "_use_default_values" not in config:
        source = getattr(diffusers, str(config.get("_class_name")), None)
        try:
            defaults = source().config if isinstance(source, type) and issubclass(source, SchedulerMixin) else {}
        except Exception:
            defaults = {}
        config["_use_default_values"] = [
            k for k, v in config.items() if not k.startswith("_") and k in defaults and defaults[k] == v
        ]
    betas = DDPMScheduler.from_config(config).betas  # DDPM builds every beta_schedule the others take
    return SAMPLERS[sampler].from_config(config, trained_betas=betas.tolist())


@torch.no_grad()
def denoise(
    unet: UNet2DModel,
    sampler: SchedulerMixin,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    n: int,
    on_step: Callable[[], object] | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDPMPipeline's loop: `n` draws of Gaussian noise denoised by `unet` with `sampler`.

    The result is float images in [0, 1], (n, C, H, W). `unet` runs in eval mode, as the pipeline runs it; its mode
    is restored after.

    `generator` is one torch.Generator or one per image; `on_step` is called after each step (a progress bar);
    `forward(sample, timesteps)` replaces `unet`'s own call (DDPMModule's compiled forward).
    """
    forward = forward or functools.partial(predict, unet)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    was_training = unet.training
    unet.eval()
    try:
        sampler.set_timesteps(num_inference_steps, device=unet.device)
        shape = (n, unet.config.in_channels, height, width)
        image = randn_tensor(shape, generator=generator, device=unet.device, dtype=unet.dtype)
        image = image * sampler.init_noise_sigma
        for t in sampler.timesteps:
            # One timestep per image, as in training: the compiled forward sees the same kind of input.
            model_output = forward(sampler.scale_model_input(image, t), t.expand(n))
            image = sampler.step(model_output, t, image, generator=generator, return_dict=False)[0]
            if on_step is not None:
                on_step()
    finally:
        unet.train(was_training)
    return (image / 2 + 0.5).clamp(0, 1).float()
