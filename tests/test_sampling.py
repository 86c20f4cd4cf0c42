"""Inference (sampling.py): `denoise` is DDPMPipeline's loop, and `make_sampler` builds the same sampler from a
saved folder's scheduler, a checkpoint's and the training grids'."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline

from ddpm_lightning.module import DDPMModule
from ddpm_lightning.sampling import make_sampler

from conftest import tiny_module


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_sample_equals_ddpm_pipeline_on_the_same_unet_scheduler_and_noise(sampler):
    """`sample` (and so `denoise`, the loop of the grids and of `ddpm-lightning sample`) is DDPMPipeline's loop."""
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    model = tiny_module()
    ours = model.sample(2, sampler, 4, torch.Generator().manual_seed(7))
    pipe = DDPMPipeline(
        unet=model.unet.eval(), scheduler=make_sampler(model.noise_scheduler, sampler)
    )  # eval, as `sample` runs it
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=4, output_type="pt"
    ).images
    assert theirs.shape == ours.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs)
    assert 0.02 < ours.std() and not torch.equal(ours[0], ours[1])  # real images, not a constant


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_a_saved_folder_gets_the_same_sampler_as_the_checkpoint_and_the_grids(trained, sampler):
    module = DDPMModule.load_from_checkpoint(trained / "checkpoints" / "run" / "last.ckpt", map_location="cpu")
    saved = DDPMPipeline.from_pretrained(trained / "run").scheduler.config
    for scheduler in (make_sampler(saved, sampler), make_sampler(module.noise_scheduler.config, sampler)):
        reference = make_sampler(module.noise_scheduler, sampler)  # what the training grids use
        assert type(scheduler) is type(reference)
        scheduler.set_timesteps(7)
        reference.set_timesteps(7)
        assert torch.equal(scheduler.timesteps, reference.timesteps)
        assert torch.equal(scheduler.betas, module.noise_scheduler.betas)
