"""The quick start and a whole run, end to end through `main([...])` with configs/tiny.yaml as a user runs it: the
grids, the diffusers folder, the logs and the checkpoints it leaves."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from PIL import Image

from ddpm_lightning.cli import main

from conftest import HELICONIUS, NO_SAVES, TINY_CONFIG, fit_args, max_steps, scalars

# FID/KID of 4 samples drawn in 2 steps, in a tiny conv net's features: a measurement in a second.
QUICK_QUALITY = [
    "--quality.num_samples",
    "4",
    "--quality.num_inference_steps",
    "2",
    "--quality.feature",
    "conftest.TinyFeatures",
]


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


@pytest.mark.slow
def test_tiny_yaml_on_your_own_folder_measures_against_your_folder(twelve, tmp_path, caplog):
    """The README's own-images line (configs/tiny.yaml, whose held-out images are the shipped photos' validation
    split, with --data.dataset naming a folder): val/loss and KID/FID are measured against a seeded 10% of that
    folder, never the shipped photos, and the log, the summary and TensorBoard name it with its image count."""
    out = tmp_path / "run"
    tiny = yaml.safe_load(TINY_CONFIG.read_text())["data"]
    assert tiny["val_dataset_of"] == tiny["val_dataset"] == tiny["dataset"]  # the shipped photos' own split
    restored = ["--data.val_dataset", tiny["val_dataset"]]  # (TINY_RUN_ARGS leaves validation out)
    with caplog.at_level(logging.INFO):
        main(fit_args(twelve, out, *max_steps(3), *NO_SAVES, *restored, *QUICK_QUALITY))
    reference = f"2 held-out images: a seeded 10% of {twelve} (split 'train')"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["reference"] == reference
    assert summary["num_reference"] == 2 and summary["val_loss"] is not None and summary["kid_mean"] is not None
    assert f"holds out images of {tiny['val_dataset_of']} (data.val_dataset_of), not of" in caplog.text
    assert f"held-out images: {reference}" in caplog.text  # the summary block
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "logs").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events), size_guidance={"tensors": 0})
    logged.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in logged.Tensors("val/reference/text_summary")]
    assert texts == [reference]


@pytest.mark.slow
def test_a_max_steps_run_ending_mid_epoch_is_validated_and_measured_at_its_end(twelve, tmp_path, caplog):
    """9 training images (3 steps an epoch) and 3 held out, stopped by max_steps at step 4, in the middle of its
    second epoch, measuring every epoch: val/loss, KID/FID with N and M and the copy check at step 4 too, in the
    logs and run_summary.json, whose quality block names the best of the two measurements. The 4 samples are
    drawn 3 at a time (quality.batch_size), and all 4 are measured."""
    out = tmp_path / "run"
    args = [*max_steps(4), *NO_SAVES, "--data.val_fraction", "0.25", "--quality.measure_quality_epochs", "1"]
    args += ["--quality.batch_size", "3"]
    with caplog.at_level(logging.INFO):
        main(fit_args(twelve, out, *args, *QUICK_QUALITY))
    assert sorted(scalars(out / "logs", "val/loss")) == [2, 3]  # Lightning logs at the last batch's step (0-based)
    assert sorted(scalars(out / "logs", "val/kid_mean")) == sorted(scalars(out / "logs", "val/copied_share")) == [2, 3]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 4
    for key in ("val_loss", "kid_mean", "kid_std", "fid", "copied_share", "copy_threshold"):
        assert math.isfinite(summary[key]), (key, summary[key])
    assert (summary["num_samples"], summary["num_reference"]) == (4, 3)
    quality = summary["quality"]
    assert quality["step"] == 4 and quality["measurements"] == 2 and quality["ranked_by"] == "kid_mean"
    assert quality["best"]["step"] in (3, 4) and isinstance(quality["still_improving"], bool)
    assert quality["headline"].startswith("KID ") and "(N=4 samples, M=3 reference images)" in quality["headline"]
    assert "Quality at step 4: KID " in caplog.text and "of the samples copy a training image" in caplog.text
    assert (out / "samples" / "nearest.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [
        ["--trainer.max_steps", "4", "--trainer.max_epochs", "-1"],  # inside epoch 1, which is not due
        ["--trainer.max_epochs", "2"],  # the end of epoch 1, not due
        ["--trainer.max_time", "00:00:00:04", "--trainer.max_epochs", "1000"],  # wherever 4 s of training end
    ],
    ids=["max_steps", "max_epochs", "max_time"],
)
def test_a_run_validating_every_third_epoch_still_validates_and_measures_its_last_step(twelve, tmp_path, stop):
    """With trainer.check_val_every_n_epoch 3 (9 training images: 3 steps an epoch), a run that stops in an epoch
    that is not due, by max_steps, max_epochs or max_time, is still validated and measured at its last step."""
    out = tmp_path / "run"
    args = [*stop, "--trainer.check_val_every_n_epoch", "3", "--trainer.num_sanity_val_steps", "0"]
    main(fit_args(twelve, out, *args, *NO_SAVES, "--data.val_fraction", "0.25", *QUICK_QUALITY))
    summary = json.loads((out / "run_summary.json").read_text())
    last = summary["optimizer_steps"] - 1  # Lightning logs at the last batch's step (0-based)
    validated = sorted(scalars(out / "logs", "val/loss"))
    assert list(scalars(out / "logs", "val/kid_mean")) == [last] and validated[-1] == last
    if stop[1] == "00:00:00:04":  # every third epoch's end (9 steps) too, and an epoch's end just before the last
        assert set(range(8, last, 9)) <= set(validated) <= set(range(8, last, 9)) | set(range(2, last, 3)) | {last}
    else:
        assert validated == [last] and last in (3, 5)
    assert math.isfinite(summary["val_loss"]) and math.isfinite(summary["kid_mean"])
