"""What a user sees while `ddpm-lightning fit` runs (reporting/monitor.py): data.png and TensorBoard's data/images
once per run, throughput scalars on the log cadence, progress bars only when asked for, and the run summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid

from ddpm_lightning.cli import main
from ddpm_lightning.reporting.monitor import training_flops_per_image
from ddpm_lightning.sources import find_images

from conftest import NO_SAVES, fit_args, max_steps, scalars, tb_events


@pytest.mark.slow
def test_data_grid_throughput_bars_and_summary_then_resume(image_folder, tmp_path, capfd, caplog):
    out = tmp_path / "run"
    args = fit_args(image_folder, out, "--data.val_dataset", str(image_folder), "--throughput.peak_flops", "1e12")
    main([*args, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "true"])
    shown = "".join(capfd.readouterr())  # Lightning's bars write to stdout, logging to stderr

    # data.png: the 12 training images in order, resized as the model gets them (squash), unflipped, 3 x 4.
    expected = torch.stack(
        [pil_to_tensor(transforms.Resize((16, 16))(Image.open(p).convert("RGB"))) for p in find_images(image_folder)]
    )
    grid = make_grid(expected, nrow=4, padding=0)
    written = torch.from_numpy(np.array(Image.open(out / "samples" / "data.png").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(written, grid)
    logs = out / "logs"
    [event] = tb_events(logs, "data/images", "images")
    assert (event.width, event.height, event.step) == (64, 48, 0)

    # Throughput on the log cadence (every step here, a window of 2 log steps): 6 steps -> steps 2..6.
    rates = scalars(logs, "train/images_per_sec")
    assert sorted(rates) == [2, 3, 4, 5, 6] and all(v > 0 for v in rates.values())
    steps_per_sec = scalars(logs, "train/steps_per_sec")
    assert all(rates[s] == pytest.approx(4 * steps_per_sec[s], rel=1e-4) for s in rates)  # batch 4
    mfu = scalars(logs, "train/mfu")  # against --throughput.peak_flops: CPUs have no known peak
    flops = training_flops_per_image(UNet2DModel.from_config(UNet2DModel.load_config(out / "unet")))
    assert all(mfu[s] == pytest.approx(rates[s] * flops / 1e12, rel=1e-3) for s in rates)

    # Bars: caching, the grid, images/s in the training bar.
    assert "Caching 12 images" in shown and "Grid of 4 (ddim)" in shown and "img/s=" in shown

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["images_seen"] == 24 and summary["optimizer_steps"] == 6 and summary["batches_this_run"] == 6
    wall = summary["wall_seconds"]
    assert wall["total"] == pytest.approx(sum(v for k, v in wall.items() if k != "total"), abs=0.05)
    assert all(wall[k] > 0 for k in ("start-up", "training", "validation", "epoch ends"))
    split = summary["start_up_seconds"]  # to on_train_start (data, sanity check), then the first step
    assert split["set-up"] > 0 and split["first step"] > 0
    assert split["set-up"] + split["first step"] == pytest.approx(wall["start-up"], abs=0.02)
    assert f"first step {split['first step']:.1f} s" in caplog.text
    assert summary["final_train_loss"] == pytest.approx(scalars(logs, "train/loss")[5], rel=1e-5)
    val = scalars(logs, "val/loss")
    assert len(val) == 2 and summary["val_loss"] == pytest.approx(val[max(val)], rel=1e-5)
    assert summary["model"] == str(out) and (out / "model_index.json").exists()
    assert summary["last_grid"] == str(out / "samples" / "0001.png")
    assert summary["last_checkpoint"].endswith("last.ckpt")
    assert "Run summary" in caplog.text and "24 images seen in 6 batches" in caplog.text

    # Resumed: no second data.png / data/images; the summary counts this run's part; bars off stay silent.
    (out / "samples" / "data.png").unlink()
    caplog.clear()
    main([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    shown = "".join(capfd.readouterr())
    assert not (out / "samples" / "data.png").exists() and len(tb_events(logs, "data/images", "images")) == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["images_seen"], summary["optimizer_steps"], summary["last_grid"]) == (
        12,
        9,
        str(out / "samples" / "0002.png"),
    )
    assert "Caching" not in shown and "Grid of" not in shown and "img/s" not in shown and "Run summary" in caplog.text


@pytest.mark.slow
def test_a_resume_that_times_no_training_batch_reports_no_images_per_sec(twelve, tmp_path, caplog):
    """A resume's first batch is its start-up, not training: a resume of one batch (or none) has no training speed."""
    out = tmp_path / "run"
    for steps in (2, 3, 3):  # 2 steps; a resume of 1 step; a resume that trains none
        resume = ["--ckpt_path", "last"] if steps != 2 else []
        caplog.clear()
        main(fit_args(twelve, out, *max_steps(steps), *NO_SAVES, *resume))
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["optimizer_steps"] == steps
        if steps == 2:  # the second batch was timed as training
            training = summary["wall_seconds"]["training"]  # rounded to 0.01 s, as the rate is to 0.01 images/s
            rate = summary["mean_images_per_sec"]
            assert 4 / (training + 0.005) - 0.005 <= rate <= 4 / max(training - 0.005, 1e-9) + 0.005
        else:
            assert summary["mean_images_per_sec"] is None
            assert "images/s while training: not measured" in caplog.text


def test_the_summary_blocks_copy_line_follows_the_copy_percentile(monkeypatch):
    """The summary block's copies line says the rule from metrics.COPY_PERCENTILE, as the log line does."""
    from ddpm_lightning import metrics
    from ddpm_lightning.reporting.monitor import quality_lines

    headline = "KID 0.4000 ± 0.0100, FID 300.00 (N=64 samples, M=200 reference images)"
    quality = {"step": 315, "headline": headline, "copied_share": 0.25, "measurements": 1}
    summary = {"reference": "200 held-out images", "quality": quality}
    assert quality_lines(summary)[2] == (
        "  copies: 25% of the samples copy a training image (nearer one than 95% of the held-out images are to "
        "theirs), samples/nearest.png"
    )
    monkeypatch.setattr(metrics, "COPY_PERCENTILE", 0.01)
    assert "nearer one than 99% of the held-out" in quality_lines(summary)[2]
