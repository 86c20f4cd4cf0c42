"""The quick start and a whole run, end to end through `main([...])` with configs/tiny.yaml as a user runs it: the
grids, the diffusers folder, the logs and the checkpoints it leaves."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from PIL import Image

from ddpm_lightning.cli import main

from conftest import HELICONIUS, TINY_CONFIG, fit_args, scalars


@pytest.mark.slow
def test_fit_writes_grid_model_logs_and_checkpoints(image_folder, tmp_path):
    out = tmp_path / "run"
    main(fit_args(image_folder, out, "--trainer.max_epochs", "2", "--grid.save_image_epochs", "1"))

    # a grid per epoch (every epoch here), 2 x 2 images of 16 px, no padding
    grids = sorted((out / "samples").glob("[0-9]*.png"))
    assert [g.name for g in grids] == ["0000.png", "0001.png"]
    assert Image.open(grids[-1]).size == (32, 32)

    # the diffusers folder loads and generates
    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    assert pipe.unet.config.sample_size == 16

    # TensorBoard holds loss and learning rate at every step; the run's config sits beside the logs
    loss = scalars(out / "logs", "train/loss")
    assert sorted(loss) == list(range(6)) and all(math.isfinite(v) for v in loss.values())
    assert len(scalars(out / "logs", "train/lr")) == 6
    assert "output_dir: " + str(out) in (out / "logs" / "config.yaml").read_text()

    # checkpoints go to ./checkpoints/<output_dir name> (relative to the working directory), last.ckpt kept
    last = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 6 and last["epoch"] == 1


@pytest.mark.slow
def test_fit_on_the_shipped_heliconius_photos(tmp_path):
    """The quick start's data as configs/tiny.yaml names it (a Hub-format parquet folder in the checkout), 2 steps."""
    out = tmp_path / "run"
    main(fit_args(HELICONIUS, out, "--trainer.max_steps", "2"))
    assert Image.open(out / "samples" / "0000.png").size == (32, 32)
    assert len(scalars(out / "logs", "train/loss")) == 2
    assert yaml.safe_load(TINY_CONFIG.read_text())["data"]["dataset"] == "./data/heliconius"
