"""The diffusion maths of `DDPMModule` (module.py): the loss and its prediction targets, sampling, the noise schedule,
the LR warm-up and cosine (under accumulation, on resume, on an fp16 overflow), the validation loss, and the
gradients freed after each optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMPipeline
from lightning.pytorch import Callback, Trainer

from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.sampling import make_sampler
from ddpm_lightning.speed import SpeedSwitches

from conftest import (
    MICRO_UNET,
    NO_SAVES,
    fit_args,
    google_layout,
    max_steps,
    scalars,
    tiny_batches,
    tiny_module,
)


def test_loss_is_mse_against_the_added_noise():
    torch.manual_seed(0)
    model = tiny_module()
    clean = torch.rand(2, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(clean), torch.tensor([10, 900])
    noisy = model.noise_scheduler.add_noise(clean, noise, t)
    expected = ((model.unet(noisy, t).sample - noise) ** 2).mean()
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(expected.item(), rel=1e-5)


class Predicts(torch.nn.Module):
    """A stand-in UNet whose output is a fixed tensor, whatever its input (denoising_loss calls unet(...)[0])."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, noisy, timesteps, return_dict=False):
        return (self.output,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_is_scored_against_its_own_target(prediction_type):
    """A UNet that outputs exactly the right target has loss 0; one that outputs another type's target does not.
    The targets are written out by hand from alphas_cumprod; `sample` is weighted by SNR = a / (1 - a)."""
    torch.manual_seed(0)
    model = tiny_module(prediction_type=prediction_type)
    clean = torch.rand(4, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(clean), torch.tensor([5, 200, 600, 950])
    a = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    targets = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * clean, "sample": clean}
    for kind, target in targets.items():
        model.unet = Predicts(target)
        loss = model.denoising_loss(clean, noise, t).item()
        if kind == prediction_type:
            assert loss == pytest.approx(0.0, abs=1e-10), kind
        else:
            assert loss > 0.01, kind
    # an error of 0.1 everywhere: plain MSE 0.01, or 0.01 weighted by each image's SNR for `sample`
    model.unet = Predicts(targets[prediction_type] + 0.1)
    weight = a / (1 - a) if prediction_type == "sample" else torch.ones_like(a)
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(0.01 * weight.mean().item(), rel=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_each_prediction_type_by_its_formula(prediction_type):
    """loss_weighting min_snr with gamma 2: an error of e_i on image i costs w_i * e_i^2, with w_i written out from
    the formulas (Hang et al. 2023; the v one as diffusers PR #5238 fixed it). The timesteps put SNR on both sides
    of gamma (1112, 3.67, 1.09, 1e-4), and each image has its own error, so a wrong weight on any image shows."""
    torch.manual_seed(0)
    model = tiny_module(prediction_type=prediction_type, loss_weighting="min_snr", snr_gamma=2.0)
    clean = torch.rand(4, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(clean), torch.tensor([5, 150, 250, 950])
    a = model.noise_scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    clipped = torch.minimum(snr, torch.tensor(2.0, dtype=torch.float64))
    weight = {"epsilon": clipped / snr, "sample": clipped, "v_prediction": clipped / (snr + 1)}[prediction_type]
    # the same weights as numbers, worked out from the schedule (SNR 1111.99, 3.670, 1.090, 1.06e-4)
    expected_weight = {
        "epsilon": [2 / 1111.99, 2 / 3.6704, 1, 1],
        "sample": [2, 2, 1.0895, 1.0605e-4],
        "v_prediction": [2 / 1112.99, 2 / 4.6704, 1.0895 / 2.0895, 1.0605e-4 / 1.000106],
    }[prediction_type]
    assert weight.tolist() == pytest.approx(expected_weight, rel=1e-3)

    a4 = a.float().view(-1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": a4.sqrt() * noise - (1 - a4).sqrt() * clean, "sample": clean}
    error = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(-1, 1, 1, 1)
    model.unet = Predicts(target[prediction_type] + error)
    expected = (weight * error.double().flatten() ** 2).mean().item()
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(expected, rel=1e-4)

    # the same model weighted uniformly: the plain MSE (SNR-weighted for sample, as diffusers' script)
    uniform = tiny_module(prediction_type=prediction_type, loss_weighting="uniform", snr_gamma=2.0)
    uniform.unet = model.unet
    plain = snr if prediction_type == "sample" else torch.ones_like(snr)
    assert uniform.denoising_loss(clean, noise, t).item() == pytest.approx(
        (plain * error.double().flatten() ** 2).mean().item(), rel=1e-4
    )


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="snr_gamma=0"):
        tiny_module(loss_weighting="min_snr", snr_gamma=0)


def test_learning_rate_scale_must_be_positive_and_scales_the_peak_rate():
    with pytest.raises(ValueError, match=r"^learning_rate_scale=-0.2: the factor on learning_rate must be positive"):
        tiny_module(learning_rate_scale=-0.2)
    assert tiny_module(learning_rate=2e-3, learning_rate_scale=0.2).peak_learning_rate == pytest.approx(4e-4)


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_learns(prediction_type):
    torch.manual_seed(0)
    model = tiny_module(prediction_type=prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(images), torch.randint(0, 1000, (8,))
    losses = []
    for _ in range(30):
        loss = model.denoising_loss(images, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    generated = model.sample(2, "ddim", 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(generated).all()


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


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_beta_schedule_reaches_the_noise_schedule(schedule, tmp_path):
    from diffusers import DDPMScheduler

    model = tiny_module(beta_schedule=schedule)
    expected = DDPMScheduler(beta_schedule=schedule).betas
    torch.testing.assert_close(model.noise_scheduler.betas, expected)
    if schedule != "linear":
        assert not torch.allclose(expected, DDPMScheduler(beta_schedule="linear").betas)
    for sampler in ("ddim", "dpmsolver++"):  # the grids' samplers follow it (sigmoid: by the betas themselves)
        torch.testing.assert_close(make_sampler(model.noise_scheduler, sampler).betas, expected)
    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(tmp_path / "saved")
    assert DDPMScheduler.from_pretrained(tmp_path / "saved" / "scheduler").config.beta_schedule == schedule


@pytest.mark.slow
def test_learning_rate_follows_warmup_then_cosine(image_folder, tmp_path):
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            *max_steps(12),
            "--model.lr_warmup_steps",
            "4",
            "--model.learning_rate",
            "0.002",
        )
    )
    lr = scalars(out / "logs", "train/lr")
    assert sorted(lr) == list(range(12))
    for k, value in lr.items():  # the rate used by optimizer step k
        expected = 0.002 * (k / 4 if k < 4 else 0.5 * (1 + math.cos(math.pi * (k - 4) / (12 - 4))))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_schedule_steps_once_per_optimizer_step_and_ends_at_zero_under_accumulation(image_folder, tmp_path):
    """12 images, batch 4, accumulate 2: 3 micro-batches and 2 optimizer steps an epoch; 3 epochs = 6 optimizer
    steps. The schedule (warm-up 2, cosine to 0) is 6 steps long and steps 6 times, once per optimizer step."""
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            "--trainer.max_epochs",
            "3",
            "--trainer.accumulate_grad_batches",
            "2",
            "--model.lr_warmup_steps",
            "2",
            "--model.learning_rate",
            "0.002",
        )
    )
    last = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 6
    assert last["lr_schedulers"][0]["last_epoch"] == 6  # not once per micro-batch (9)
    assert last["lr_schedulers"][0]["_last_lr"] == [0.0]  # the cosine reached 0 at the run's last optimizer step
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    # the rate each micro-batch logged is the one of the optimizer step it belongs to
    lr = scalars(out / "logs", "train/lr")
    assert sorted(lr) == list(range(6))
    for k, value in lr.items():
        expected = 0.002 * (k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / (6 - 2))))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_raising_max_epochs_on_resume_stretches_the_schedule_and_the_lr_jumps(twelve, tmp_path):
    """docs/long-runs.md, "Raising `max_epochs` on resume": the cosine's length becomes the new run's, so at the
    resumed step the LR jumps up."""
    common = [*NO_SAVES, "--model.lr_warmup_steps", "1", "--model.learning_rate", "0.002"]
    main(fit_args(twelve, tmp_path / "run", *common, "--trainer.max_epochs", "1"))
    main(fit_args(twelve, tmp_path / "run", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    lr = scalars(tmp_path / "run" / "logs", "train/lr")
    cosine = lambda k, total: 0.002 * 0.5 * (1 + math.cos(math.pi * (k - 1) / (total - 1)))  # noqa: E731
    assert lr[2] == pytest.approx(cosine(2, 3), rel=1e-5)  # the first run's schedule: 3 steps
    assert lr[3] == pytest.approx(cosine(3, 3), abs=1e-9)  # the first resumed step: the rate the old one reached
    assert lr[4] == pytest.approx(cosine(4, 6), rel=1e-5)  # then the resumed run's, stretched to 6 steps
    assert lr[5] == pytest.approx(cosine(5, 6), rel=1e-5)
    assert lr[4] > lr[3]  # the jump


@pytest.mark.slow
def test_warmup_longer_than_the_run_warns(image_folder, tmp_path):
    from ddpm_lightning.cli import main

    from conftest import fit_args

    with pytest.warns(UserWarning, match=r"lr_warmup_steps=500 is not shorter than the run \(3 optimizer steps\)"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--model.lr_warmup_steps", "500"))


@pytest.mark.slow
def test_fp16_overflow_skips_the_update_and_the_schedule_and_ema_count_it_as_documented(image_folder):
    """docs/long-runs.md, "Numerics": a step whose fp16 gradients overflow leaves the weights unchanged and
    halves the loss scale; it still counts as an optimizer step for global_step, the LR schedule and EMA."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.plugins import MixedPrecision

    from ddpm_lightning.data import ImageDataModule

    from conftest import tiny_module

    model = tiny_module(use_ema=True, lr_warmup_steps=2)
    model.on_after_backward = lambda: (  # overflow in the backward pass of step 2
        next(model.unet.parameters()).grad.fill_(float("inf")) if model.trainer.global_step == 2 else None
    )
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = next(pl_module.unet.parameters()).detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            unchanged = torch.equal(next(pl_module.unet.parameters()), self.before)
            seen.append(
                (
                    trainer.global_step,
                    trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                    unchanged,
                    trainer.precision_plugin.scaler.get_scale(),
                )
            )

    trainer = Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        callbacks=[Record()],
    )
    trainer.fit(model, ImageDataModule(str(image_folder), image_size=16, train_batch_size=2, num_workers=0))
    step, schedule, unchanged, scale = zip(*seen)
    assert step == schedule == (1, 2, 3, 4)  # the schedule advanced on the skipped step too
    assert unchanged[2] and not unchanged[3]  # step 2 skipped (step 0 has lr 0: warm-up), step 3 updates
    assert scale[2] == scale[1] / 2
    assert model.ema.optimization_step == 4  # EMA counted it: it averaged in the unchanged weights


@pytest.mark.slow
def test_validation_loss_is_deterministic_and_monitorable(image_folder, tmp_path):
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            "--trainer.max_epochs",
            "2",
            "--data.val_fraction",
            "0.25",
            "--checkpoint.monitor",
            "val/loss",
            "--checkpoint.save_top_k",
            "1",
            "--model.use_ema",
            "true",
        )
    )
    logged = scalars(out / "logs", "val/loss")
    assert len(logged) == 2 and len(scalars(out / "logs", "val/loss_ema")) == 2
    best = list((tmp_path / "checkpoints" / "run").glob("epoch=*.ckpt"))
    assert len(best) == 1  # chosen by val/loss

    # the same weights give the same number, twice, through the CLI (read back from each run's TensorBoard logs)
    validated = []
    for run in ("a", "b"):
        main(
            [
                "validate",
                "-c",
                str(out / "logs" / "config.yaml"),
                "--ckpt_path",
                str(best[0]),
                "--output_dir",
                str(tmp_path / run),
            ]
        )
        validated.append(scalars(tmp_path / run / "validate", "val/loss"))  # not the run's logs/
    assert validated[0] == validated[1] and len(validated[0]) == 1
    assert math.isfinite(next(iter(validated[0].values())))
    # and in-process, under a different global RNG state
    from lightning.pytorch import Trainer

    from ddpm_lightning.data import ImageDataModule
    from ddpm_lightning.module import DDPMModule

    model = DDPMModule.load_from_checkpoint(best[0])
    dm = ImageDataModule(dataset=str(image_folder), image_size=16, train_batch_size=4, num_workers=0, val_fraction=0.25)
    trainer = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    torch.manual_seed(1)
    first = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    torch.manual_seed(2)  # a different global RNG state changes nothing
    assert trainer.validate(model, dm, verbose=False)[0]["val/loss"] == first


@pytest.mark.slow
def test_gradients_are_freed_after_each_optimizer_step_and_kept_within_an_accumulation_window():
    """Under CUDA graphs the gradients are the backward graph's outputs, which the next replay (a step, a grid)
    overwrites, and Lightning's teardown moves them (`module.cpu()`): they are freed right after each optimizer
    step, as the tutorial's loop does, and kept between the micro-batches of an accumulation window. The compiled
    optimizer step reads them as the backward left them."""
    held = []

    class Grads(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            held.append(any(p.grad is not None for p in pl_module.unet.parameters()))

    for switches, accumulate in (({}, 1), ({}, 2), ({"compile_optimizer": True}, 1)):
        torch._dynamo.reset()
        model = DDPMModule(unet=MICRO_UNET, image_size=16)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=2,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Grads(), SpeedSwitches(**switches)],
        )
        trainer.fit(model, tiny_batches())
        assert trainer.global_step == 2
        assert all(p.grad is None for p in model.unet.parameters())
    assert held == [False, False] + [True, False, True, False] + [False, False]


def test_a_config_that_changes_the_pretrained_models_prediction_type_warns_with_the_fix(tmp_path, recwarn):
    """A config's v-prediction over an epsilon model (configs/tiny.yaml with --model.pretrained): one warning names
    the change and the key that keeps the model's; null keeps it silently."""
    google_layout(tmp_path / "eps", sample_size=16)  # diffusers' default: epsilon
    with pytest.warns(UserWarning, match=r"prediction_type epsilon -> v_prediction.*--model.prediction_type null"):
        module = DDPMModule(pretrained=str(tmp_path / "eps"), image_size=16, prediction_type="v_prediction")
    assert module.noise_scheduler.config.prediction_type == "v_prediction"
    recwarn.clear()
    module = DDPMModule(pretrained=str(tmp_path / "eps"), image_size=16, prediction_type=None)
    assert module.noise_scheduler.config.prediction_type == "epsilon"
    assert not [w for w in recwarn if "noise schedule" in str(w.message)]
