"""The callbacks the CLI adds (callbacks.py): the epoch grids (`SampleGrid`: their own seed, the training autocast)
and FID/KID (`MeasureQuality`: through `validate`, on its cadence during `fit`, off with a warning without the
Inception weights, its old key's spelling)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from PIL import Image

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule

from conftest import TINY_UNET, fit_args, scalars, tb_events, tiny_module


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


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_grid_samples_under_the_training_autocast(precision, tmp_path):
    dtypes = []
    model = DDPMModule(unet=TINY_UNET, image_size=16)
    model.unet.conv_in.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    # (the plugin itself: Lightning's precision="16-mixed" would run bf16 on a CPU)
    trainer = Trainer(
        accelerator="cpu",
        plugins=[MixedPrecision(precision, "cpu")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.strategy.connect(model)
    SampleGrid(output_dir=str(tmp_path), eval_batch_size=4, num_inference_steps=2).write_grid(trainer, model)
    assert dtypes == [{"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]] * 2


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


@pytest.mark.slow
def test_missing_inception_weights_say_how_and_training_goes_on(image_folder, tmp_path, monkeypatch):
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
            )
        )
    assert (tmp_path / "checkpoints" / "run" / "last.ckpt").exists()
    assert len(scalars(tmp_path / "run" / "logs", "val/loss")) == 1


@pytest.mark.slow
def test_the_old_spelling_quality_every_n_epochs_still_works_and_warns(image_folder, tmp_path, monkeypatch):
    """quality.every_n_epochs was renamed quality.measure_quality_epochs: a config that still says it trains
    with its value, and a FutureWarning names the new key."""
    from ddpm_lightning.callbacks import MeasureQuality

    seen = []
    monkeypatch.setattr(MeasureQuality, "setup", lambda self, *_, **__: seen.append(self.measure_quality_epochs))
    with pytest.warns(FutureWarning, match="quality.every_n_epochs is renamed quality.measure_quality_epochs"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_steps", "1", "--quality.every_n_epochs", "3"))
    assert seen == [3]
