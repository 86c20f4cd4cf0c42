"""The diffusion maths and sampling of DDPMModule, and the grid callback's use of it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from ddpm_lightning.callbacks import SampleGrid, grid_shape
from ddpm_lightning.module import TUTORIAL_UNET, DDPMModule

TINY_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def tiny_module(**kwargs) -> DDPMModule:
    return DDPMModule(unet=TINY_UNET, image_size=16, **kwargs)


def test_tutorial_unet_by_default():
    unet = DDPMModule().unet
    assert list(unet.config.block_out_channels) == TUTORIAL_UNET["block_out_channels"]
    assert unet.config.sample_size == 128
    assert 113e6 < sum(p.numel() for p in unet.parameters()) < 114e6  # the tutorial's 113.7 M


def test_unet_sample_size_must_follow_image_size():
    with pytest.raises(ValueError, match="image_size"):
        DDPMModule(unet={**TINY_UNET, "sample_size": 32}, image_size=16)


def test_loss_is_mse_against_the_added_noise():
    torch.manual_seed(0)
    model = tiny_module()
    clean = torch.rand(2, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(clean), torch.tensor([10, 900])
    noisy = model.scheduler.add_noise(clean, noise, t)
    expected = ((model.unet(noisy, t).sample - noise) ** 2).mean()
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_sample_is_repeatable_and_leaves_the_global_rng_alone(sampler):
    model = tiny_module()
    state = torch.get_rng_state()
    a = model.sample(2, model.make_scheduler(sampler), 3, torch.Generator().manual_seed(1))
    b = model.sample(2, model.make_scheduler(sampler), 3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert model.unet.training  # back in training mode


def test_grid_uses_its_own_seed_and_the_training_rng_continues(tmp_path):
    model = tiny_module()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(model)
    grid = SampleGrid(output_dir=str(tmp_path), eval_batch_size=4, num_inference_steps=2, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = grid.write_grid(trainer, model).read_bytes()
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(999)  # a different training RNG state draws the same grid
    assert grid.write_grid(trainer, model).read_bytes() == first


def test_grid_shape():
    assert grid_shape(16, None) == (4, 4)
    assert grid_shape(8, None) == (2, 4)
    assert grid_shape(6, 3) == (3, 2)
    with pytest.raises(ValueError, match="grid_rows"):
        grid_shape(10, 4)


def test_image_size_the_unet_cannot_halve_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"image_size=100 cannot be halved 5 times.*multiple of 32 \(e.g. 96\)"):
        DDPMModule(image_size=100)
    DDPMModule(unet=TINY_UNET, image_size=18)  # 2 levels: one halving, any even size


def test_nan_loss_stops_the_run_naming_the_first_step(image_folder, tmp_path, monkeypatch):
    from conftest import fit_args
    from ddpm_lightning.cli import main

    real = DDPMModule.denoising_loss

    def nan_from_step_5(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss

    monkeypatch.setattr(DDPMModule, "denoising_loss", nan_from_step_5)
    with pytest.raises(FloatingPointError, match="NaN or infinite at step 5 .*stop_on_nan false"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_steps", "20", "--trainer.max_epochs", "-1",
                      "--model.nan_check_every_n_steps", "4"))
    assert not (tmp_path / "run" / "model_index.json").exists()  # no final save of broken weights


def test_warmup_longer_than_the_run_warns(image_folder, tmp_path):
    from conftest import fit_args
    from ddpm_lightning.cli import main

    with pytest.warns(UserWarning, match=r"lr_warmup_steps=500 is not shorter than the run \(3 optimizer steps\)"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--model.lr_warmup_steps", "500"))


def test_speed_switches_keep_checkpoint_keys_and_train_on_cpu(image_folder, tmp_path):
    """channels_last, gradient checkpointing, fused AdamW and in-place compile degrade cleanly on a CPU."""
    from conftest import fit_args
    from ddpm_lightning.cli import main

    main(fit_args(image_folder, tmp_path / "plain", "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
                  "--checkpoint.dirpath", "plain"))
    main(fit_args(image_folder, tmp_path / "fast", "--trainer.max_steps", "2", "--trainer.max_epochs", "-1",
                  "--model.channels_last", "true", "--model.gradient_checkpointing", "true",
                  "--model.fused_adamw", "true", "--checkpoint.dirpath", "fast"))
    plain = torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)
    fast = torch.load(tmp_path / "fast" / "last.ckpt", weights_only=True)
    assert plain["state_dict"].keys() == fast["state_dict"].keys()
    assert all(torch.isfinite(v).all() for v in fast["state_dict"].values())

    model = tiny_module(compile=True)
    keys = set(model.unet.state_dict())
    model.configure_model()
    assert set(model.unet.state_dict()) == keys  # compiled in place: the same keys in checkpoints and folders
