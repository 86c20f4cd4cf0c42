"""README promises that had no test: each is checked here on what it says, through the real code paths."""

from __future__ import annotations

import io
import math
import subprocess
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.data import CachedImages, ImageDataModule, ResizedImages
from ddpm_lightning.sources import load_source

from conftest import REPO, TINY_CONFIG, child_env, ddp_fit_command, fit_args, scalars, tb_events, tiny_module


def coloured(n: int, red: int = 0) -> datasets.Dataset:
    """n images of 16 px, each one flat colour (red, i, 0): told apart by their pixels."""
    images = [Image.new("RGB", (16, 16), (red, i, 0)) for i in range(n)]
    return datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))


def data_module(dataset, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(dataset=str(dataset), image_size=16, train_batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_val_dataset_and_val_split_name_the_validation_images(tmp_path):
    datasets.DatasetDict({"train": coloured(5), "test": coloured(3, red=200)}).save_to_disk(str(tmp_path / "dd"))
    dm = data_module(tmp_path / "dd", val_dataset=str(tmp_path / "dd"), val_split="test")
    assert len(dm.train_set) == 5
    assert [int(dm.val_set[i][1][0, 0, 0]) for i in range(len(dm.val_set))] == [200, 200, 200]  # the test split
    assert [int(dm.val_set[i][1][1, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert [dm.val_set[i][0] for i in range(3)] == [0, 1, 2]  # (index, image): noise seeded by the index


def test_cache_auto_keeps_small_data_in_memory_and_streams_above_cache_max_gb(image_folder):
    assert isinstance(data_module(image_folder).train_set, CachedImages)  # 12 x 3 x 16 x 16 bytes
    streamed = data_module(image_folder, cache_max_gb=12 * 3 * 16 * 16 / 1e9 / 2)  # half of what they take
    assert isinstance(streamed.train_set, ResizedImages) and len(streamed.train_set) == 12


def test_cache_on_gpu_puts_the_cached_pixels_on_the_training_device(image_folder):
    """The "meta" device stands in for a GPU (no GPU here): the pixels go to the trainer's root device when asked,
    and stay in CPU memory by default when that device is not CUDA."""
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), progress_bar_callback=None)
    dm = ImageDataModule(dataset=str(image_folder), image_size=16, num_workers=0, cache_on_gpu=True)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.train_set.pixels.device.type == "meta" and dm.train_set.pixels.shape == (12, 3, 16, 16)
    default = ImageDataModule(dataset=str(image_folder), image_size=16, num_workers=0)
    default.trainer = trainer
    default.setup("fit")
    assert default.train_set.pixels.device.type == "cpu"


def test_a_single_parquet_file_is_a_data_set(tmp_path):
    coloured(6).to_parquet(str(tmp_path / "one.parquet"))
    dm = data_module(tmp_path / "one.parquet")
    assert [int(dm.train_set[i][1, 0, 0]) for i in range(len(dm.train_set))] == [0, 1, 2, 3, 4, 5]


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
            "--trainer.max_steps",
            "3",
            "--trainer.max_epochs",
            "-1",
            "--trainer.precision",
            "bf16-mixed",
        )
    )
    assert seen[:3] == [(True, torch.bfloat16, torch.float32)] * 3  # the UNet under bf16; the loss in float32
    state = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 master weights
    assert sorted(scalars(out / "logs", "train/loss")) == [0, 1, 2]
    assert all(math.isfinite(v) for v in scalars(out / "logs", "train/loss").values())


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


def test_every_ddp_rank_holds_the_same_ema(image_folder, tmp_path):
    cmd = [
        *ddp_fit_command(image_folder, tmp_path / "run", "--trainer.max_steps", "3", "--trainer.max_epochs", "-1"),
        "--model.use_ema",
        "true",
        "--model.learning_rate",
        "0.01",
        "--model.lr_warmup_steps",
        "1",
        "--grid.save_image_epochs",
        "1000",
        "--save.save_model_epochs",
        "1000",
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


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate"):
        assert f"    {subcommand} " in text, subcommand
    for command in ("sample", "export"):  # outside LightningCLI: their own --help
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and f"usage: ddpm-lightning [options] {command}" in capsys.readouterr().out


def test_asking_for_more_images_keeps_the_first_ones(tmp_path):
    from diffusers import DDPMPipeline

    from ddpm_lightning.commands import sample

    torch.manual_seed(0)
    model = tiny_module()
    DDPMPipeline(unet=model.unet, scheduler=model.noise_scheduler).save_pretrained(tmp_path / "model")
    common = {"sampler": "ddim", "num_inference_steps": 2, "batch_size": 2, "seed": 5}
    two = sample(str(tmp_path / "model"), num_images=2, output_dir=str(tmp_path / "two"), **common)
    four = sample(str(tmp_path / "model"), num_images=4, output_dir=str(tmp_path / "four"), **common)
    assert [p.read_bytes() for p in two] == [p.read_bytes() for p in four[:2]]
    assert four[2].read_bytes() != four[0].read_bytes()


def test_the_quick_start_is_315_steps_on_the_shipped_photos_and_ends_with_grid_0004():
    """README's quick start: configs/tiny.yaml trains on the shipped data/heliconius (run from the repository root)
    for 315 optimizer steps (5 epochs of 1000 photos in batches of 16), and its last grid is samples/0004.png."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    photos = len(load_source(str(REPO / config["data"]["dataset"])))
    epochs, batch = config["trainer"]["max_epochs"], config["data"]["train_batch_size"]
    steps = epochs * math.ceil(photos / batch)
    assert (photos, epochs, batch, steps) == (1000, 5, 16, 315)
    assert epochs % config["grid"]["save_image_epochs"] == 0  # so the last epoch's grid is the last one
    readme = (REPO / "README.md").read_text()
    assert f"{steps} optimizer steps" in readme and f"{config['output_dir']}/samples/{epochs - 1:04d}.png" in readme
