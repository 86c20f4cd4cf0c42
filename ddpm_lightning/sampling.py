"""Sampling, in one place for the module, the callbacks and `ddpm-lightning sample`: the inference samplers
(`make_sampler`), DDPMPipeline's denoising loop (`denoise`), a rank's share of the images drawn during training
(`sample_share`) and grids (`grid_shape`, `save_grid`, `log_image`).

Words: a "sampler" is the inference algorithm (ddpm, ddim, dpmsolver++; `grid.sampler`), built as a diffusers
scheduler by `make_sampler`; the "noise scheduler" is the training schedule (`DDPMModule.noise_scheduler`); the
training loader's torch Sampler is `data.EpochOrder`; the LR schedule is the optimizer's.

    images = denoise(model.unet, make_sampler(model.noise_scheduler, "ddim"), 50, torch.Generator(), n=16)
    save_grid(images, Path("grid.png"))  # 4 x 4, no padding

    >>> grid_shape(16), grid_shape(12), grid_shape(12, rows=2)
    ((4, 4), (3, 4), (2, 6))
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid, save_image

Sampler = Literal["ddpm", "ddim", "dpmsolver++"]
SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_sampler(noise_scheduler: SchedulerMixin | dict[str, Any], sampler: Sampler = "ddpm") -> SchedulerMixin:
    """A fresh `sampler` scheduler with the noise schedule of `noise_scheduler` (a scheduler or its config, e.g. a
    saved folder's), and its betas themselves: DDIM and DPM-Solver++ cannot build beta_schedule "sigmoid".

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


def unet_sample_call(unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return unet(sample, timesteps, return_dict=False)[0]


@torch.no_grad()
def denoise(
    unet: UNet2DModel, sampler: SchedulerMixin, num_inference_steps: int, generator, n: int, on_step=None, forward=None
) -> torch.Tensor:
    """DDPMPipeline's loop: `n` draws of Gaussian noise denoised by `unet` (in eval mode, as the pipeline runs it;
    its mode is restored after) with `sampler`, as float images in [0, 1], (n, C, H, W).

    `generator` is one torch.Generator or one per image; `on_step` is called after each step (a progress bar);
    `forward(sample, timesteps)` replaces `unet`'s own call (DDPMModule's compiled forward).
    """
    forward = forward or functools.partial(unet_sample_call, unet)
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


def sample_share(
    trainer, pl_module, n: int, sampler: Sampler, steps: int, seed: int, autocast: bool = True, on_step=None
) -> torch.Tensor:
    """This rank's share of n images (ceil(n / world size)) drawn by `pl_module.sample` during training, with the
    EMA weights when EMA is on, under the training precision's autocast when `autocast` (as the tutorial's
    pipeline ran under Accelerate's). Every rank draws, so none waits for another's sampling in a collective.
    Its own generator, one stream per rank: the draw neither depends on nor changes the training RNG (fork_rng
    guards against library code that still draws from the global RNG). A stop signal ends the draw at the next
    step (`stop_if_signalled`)."""

    def step() -> None:
        if on_step is not None:
            on_step()
        stop_if_signalled(trainer)

    stop_if_signalled(trainer)
    share = math.ceil(n / trainer.world_size)
    with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
        generator = torch.Generator(device="cpu").manual_seed(seed + 1_000_003 * trainer.global_rank)
        precision = trainer.precision_plugin.forward_context() if autocast else contextlib.nullcontext()
        with pl_module.ema_weights(), precision:
            return pl_module.sample(share, sampler, steps, generator, step)


def stop_if_signalled(trainer) -> None:
    """Raise Lightning's SIGTERMException once a stop signal (SIGTERM; SIGUSR1 and a first Ctrl-C become one) has
    arrived: a grid or a quality measurement ends at that denoising step, and the run saves its checkpoint and
    exits as a stop between training steps does (PreemptionCheckpoint), instead of after the whole draw. Every
    rank decides together, as Lightning's training loop does at each step: none is left in the next collective."""
    if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
        raise SIGTERMException


def grid_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a grid of n images: `rows` if given, else as square as n allows (16 -> 4 x 4)."""
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    if rows < 1 or n % rows:
        raise ValueError(
            f"eval_batch_size={n} images do not fill a grid of {rows} rows: make it a multiple of grid_rows."
        )
    return rows, n // rows


def save_grid(
    images: torch.Tensor, path: Path, rows: int | None = None, loggers=(), tag: str = "samples", step: int = 0
) -> Path:
    """Tile `images` ((n, C, H, W), floats in [0, 1] or uint8) without padding, in `rows` rows (the squarest grid
    when left out), into the PNG `path` and into each logger (`log_image`)."""
    grid = make_grid(images, nrow=grid_shape(len(images), rows)[1], padding=0)
    if grid.dtype != torch.uint8:  # rounded as torchvision's save_image rounds
        grid = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    grid = grid.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.float() / 255, path)
    for logger in loggers:
        log_image(logger, tag, grid, step)
    return path


def log_image(logger, tag: str, grid: torch.Tensor, step: int) -> None:
    """`grid` ((C, H, W) uint8) to one Lightning logger through its own image call: TensorBoard's `add_image`,
    W&B's `log_image`, MLflow's `log_image` (as an image artifact with a step). Other loggers get no images."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, grid, global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_image(tag, [grid.permute(1, 2, 0).numpy()], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, grid.permute(1, 2, 0).numpy(), key=tag, step=step)
