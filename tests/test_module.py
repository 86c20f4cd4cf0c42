"""The diffusion maths and sampling of DDPMModule, and the grid callback's use of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.reporting.grids import grid_shape
from ddpm_lightning.sampling import make_sampler
from ddpm_lightning.unet import TUTORIAL_UNET

from conftest import TINY_UNET, max_steps, tiny_module


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
    noisy = model.noise_scheduler.add_noise(clean, noise, t)
    expected = ((model.unet(noisy, t).sample - noise) ** 2).mean()
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_sample_is_repeatable_and_leaves_the_global_rng_alone(sampler):
    model = tiny_module()
    state = torch.get_rng_state()
    a = model.sample(2, sampler, 3, torch.Generator().manual_seed(1))
    b = model.sample(2, sampler, 3, torch.Generator().manual_seed(1))
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


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_first_step(image_folder, tmp_path, monkeypatch):
    from ddpm_lightning.cli import main

    from conftest import fit_args

    real = DDPMModule.denoising_loss

    def nan_from_step_5(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss

    monkeypatch.setattr(DDPMModule, "denoising_loss", nan_from_step_5)
    with pytest.raises(FloatingPointError, match="NaN or infinite at step 5 .*stop_on_nan false"):
        main(
            fit_args(
                image_folder,
                tmp_path / "run",
                *max_steps(20),
                "--model.nan_check_every_n_steps",
                "4",
            )
        )
    assert not (tmp_path / "run" / "model_index.json").exists()  # no final save of broken weights


@pytest.mark.slow
def test_warmup_longer_than_the_run_warns(image_folder, tmp_path):
    from ddpm_lightning.cli import main

    from conftest import fit_args

    with pytest.warns(UserWarning, match=r"lr_warmup_steps=500 is not shorter than the run \(3 optimizer steps\)"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--model.lr_warmup_steps", "500"))


@pytest.mark.slow
def test_speed_switches_keep_checkpoint_keys_and_train_on_cpu(image_folder, tmp_path):
    """channels_last, gradient checkpointing, fused AdamW and in-place compile degrade cleanly on a CPU."""
    from ddpm_lightning.cli import main

    from conftest import fit_args

    main(
        fit_args(
            image_folder,
            tmp_path / "plain",
            *max_steps(2),
            "--checkpoint.dirpath",
            "plain",
        )
    )
    main(
        fit_args(
            image_folder,
            tmp_path / "fast",
            *max_steps(2),
            "--model.channels_last",
            "true",
            "--model.gradient_checkpointing",
            "true",
            "--model.fused_adamw",
            "true",
            "--checkpoint.dirpath",
            "fast",
        )
    )
    plain = torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)
    fast = torch.load(tmp_path / "fast" / "last.ckpt", weights_only=True)
    assert plain["state_dict"].keys() == fast["state_dict"].keys()
    assert all(torch.isfinite(v).all() for v in fast["state_dict"].values())

    model = tiny_module(compile=True)
    keys = set(model.unet.state_dict())
    model.configure_model()
    assert set(model.unet.state_dict()) == keys  # compiled in place: the same keys in checkpoints and folders


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
def test_speed_switches_take_effect_in_a_training_step():
    """channels_last: the UNet's weights and the batch it gets are channels-last; gradient checkpointing: each
    checkpointed ResNet block runs its forward again in the backward pass; compile: the compiled forward runs and
    gives the plain UNet's output."""
    torch.manual_seed(0)
    plain, fast = tiny_module(), tiny_module(channels_last=True, gradient_checkpointing=True, stop_on_nan=False)
    fast.load_state_dict(plain.state_dict())
    for model in (plain, fast):
        model.configure_model()
    calls, formats = {"plain": 0, "fast": 0}, []
    for name, model in (("plain", plain), ("fast", fast)):  # (forward hooks do not fire in the recomputation)
        block = model.unet.down_blocks[0].resnets[0]
        block.forward = lambda *a, _name=name, _forward=block.forward, **k: (
            calls.__setitem__(_name, calls[_name] + 1) or _forward(*a, **k)
        )
    fast.unet.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    batch = torch.rand(2, 3, 16, 16) * 2 - 1
    fast.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda _: 1)
    fast.log = lambda *a, **k: None
    fast._trainer = SimpleNamespace(global_step=0)
    for model in (plain, fast):
        torch.manual_seed(1)
        loss = model.training_step(batch, 0) if model is fast else model.denoising_loss(batch)
        loss.backward()
    assert calls == {"plain": 1, "fast": 2}  # recomputed in the backward pass
    assert formats == [True]  # the batch reached the UNet in channels-last
    weight = fast.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert all(torch.isfinite(p.grad).all() for p in fast.unet.parameters())


@pytest.mark.slow
def test_compiled_unet_runs_and_matches_the_plain_one():
    torch.manual_seed(0)
    plain, compiled = tiny_module(), tiny_module(compile=True)
    compiled.load_state_dict(plain.state_dict())
    compiled.configure_model()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    noisy, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        expected = plain.unet(noisy, t).sample
        got = compiled.unet_forward.sample(
            compiled.unet, noisy, t
        )  # the compiled sampling forward (training has its own, tested in test_speed_switches)
    assert counters["stats"]["unique_graphs"] == 1  # torch.compile traced the UNet's forward
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_beta_schedule_reaches_the_noise_schedule(schedule, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddpm_lightning.sampling import make_sampler

    model = tiny_module(beta_schedule=schedule)
    expected = DDPMScheduler(beta_schedule=schedule).betas
    torch.testing.assert_close(model.noise_scheduler.betas, expected)
    if schedule != "linear":
        assert not torch.allclose(expected, DDPMScheduler(beta_schedule="linear").betas)
    for sampler in ("ddim", "dpmsolver++"):  # the grids' samplers follow it (sigmoid: by the betas themselves)
        torch.testing.assert_close(make_sampler(model.noise_scheduler, sampler).betas, expected)
    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(tmp_path / "saved")
    assert DDPMScheduler.from_pretrained(tmp_path / "saved" / "scheduler").config.beta_schedule == schedule
