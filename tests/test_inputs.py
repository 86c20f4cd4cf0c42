"""Inputs a new user gives: photos as the camera took them, linked folders, single files, mistyped values, and
the errors and noise they see (issue 10, items 5-12)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.data import ImageDataModule

from conftest import NO_SAVES, TINY_CONFIG, TINY_RUN_ARGS, child_env, fit_args, max_steps, write_image

ONE_STEP = [*max_steps(1), *NO_SAVES]


class FirstBatch(Callback):
    """Keeps the first training batch (after the flip and scaling) and the number of training images."""

    batch: torch.Tensor | None = None
    images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if FirstBatch.batch is None:
            FirstBatch.batch, FirstBatch.images = batch.detach().clone(), len(trainer.datamodule.train_set)


@pytest.fixture(autouse=True)
def _fresh_record():
    FirstBatch.batch, FirstBatch.images = None, 0


def sideways_photo(path: Path) -> Path:
    """A JPEG stored left half red, right half blue, with EXIF orientation 6 (rotate 90° clockwise to view):
    seen the right way up, red is on top and blue below."""
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def assert_upright(images: torch.Tensor) -> None:
    """(N, 3, H, W), any scale: red above, blue below (a horizontal flip changes neither)."""
    images = images.float()
    top, bottom = images[..., : images.shape[-2] // 2, :], images[..., images.shape[-2] // 2 :, :]
    assert (top[:, 0] > top[:, 2]).float().mean() > 0.9, "the top half is not red: EXIF orientation ignored"
    assert (bottom[:, 2] > bottom[:, 0]).float().mean() > 0.9, "the bottom half is not blue"


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_exif_orientation_is_applied_when_training(tmp_path, cache):
    photos = tmp_path / "photos"
    for i in range(4):
        sideways_photo(photos / f"{i}.jpg")
    main(
        fit_args(
            photos, tmp_path / "run", *ONE_STEP, "--data.cache", cache, "--trainer.callbacks+=test_inputs.FirstBatch"
        )
    )
    assert FirstBatch.batch is not None and FirstBatch.batch.shape[0] == 4
    assert_upright(FirstBatch.batch)


def test_exif_orientation_is_applied_to_validation_images(tmp_path):
    for i in range(2):
        sideways_photo(tmp_path / "val" / f"{i}.jpg")
        write_image(tmp_path / "train" / f"{i}.png", seed=i)
    data = ImageDataModule(
        str(tmp_path / "train"), image_size=16, num_workers=0, val_dataset=str(tmp_path / "val"), cache="none"
    )
    data.setup("fit")
    assert_upright(torch.stack([data.val_set[i][1] for i in range(2)]))


@pytest.mark.slow
def test_linked_folders_are_followed_once_and_other_files_are_counted(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    write_image(photos / "0.png")
    for i in range(5):
        write_image(elsewhere / f"{i}.png", seed=i)
    (photos / "more").symlink_to(elsewhere, target_is_directory=True)
    (photos / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: counted once
    (elsewhere / "loop").symlink_to(photos, target_is_directory=True)  # a cycle
    (photos / "IMG_1.HEIC").write_bytes(b"not supported")
    (photos / "notes.txt").write_text("x")
    (photos / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"Skipped 2 file\(s\) .*IMG_1.HEIC, notes.txt"):
        main(fit_args(photos, tmp_path / "run", *ONE_STEP, "--trainer.callbacks+=test_inputs.FirstBatch"))
    assert FirstBatch.images == 6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["photo.JPG", "img.webp", "archive.zip"])
def test_a_single_file_as_dataset_names_what_to_pass(tmp_path, name):
    path = tmp_path / "data" / name
    if name == "archive.zip":
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.png", write_image(tmp_path / "a.png").read_bytes())
    else:
        write_image(path)
    with pytest.raises(ValueError, match=f"{name} is .*give the folder holding the images"):
        main(fit_args(path, tmp_path / "run", *ONE_STEP))


def test_validate_without_validation_images_fails_with_the_fix(image_folder, tmp_path):
    fake = tmp_path / "x.ckpt"
    with zipfile.ZipFile(fake, "w") as archive:  # readable as an archive: the check must come from validate itself
        archive.writestr("data.pkl", b"")
    with pytest.raises(
        ValueError, match="validate needs held-out images: set --data.val_dataset or --data.val_fraction"
    ):
        main(
            [
                "validate",
                "-c",
                str(TINY_CONFIG),
                "--data.dataset",
                str(image_folder),
                *TINY_RUN_ARGS,
                "--ckpt_path",
                str(fake),
            ]
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value",
    [
        ("--grid.eval_batch_size", "0"),
        ("--grid.eval_batch_size", "-4"),
        ("--data.train_batch_size", "0"),
        ("--model.learning_rate", "-0.0001"),
    ],
)
def test_values_that_must_be_positive_are_named(image_folder, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"^{key} {value}: .* must be positive"):
        main(fit_args(image_folder, tmp_path / "run", f"{key}={value}"))  # "=": argparse would read -4 as an option


@pytest.mark.slow
def test_a_column_without_images_is_named(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"image": [str(write_image(tmp_path / "a.png"))], "label": [3]})
    rows.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="Column 'label' holds int64, not images"):
        main(fit_args(tmp_path / "saved", tmp_path / "run", "--data.image_column", "label"))


@pytest.mark.slow
def test_a_folder_with_only_an_empty_csv_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("")
    with pytest.raises(ValueError, match="holds no images and no usable data files"):
        main(fit_args(tmp_path / "data", tmp_path / "run"))


def test_sample_and_export_refuse_what_they_cannot_do(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit, match="taken is a file: give a folder"):
        main(["export", str(ckpt), str(a_file)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is visible here"):
            main(["sample", str(ckpt), "--device", "cuda"])
    with pytest.raises(SystemExit, match="num_inference_steps must be at least 1, not 0"):
        main(["sample", str(ckpt), "--num_inference_steps", "0"])


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = child_env()
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["fit", "-c", str(TINY_CONFIG), "--data.dataset", str(tmp_path / "missing"), "--grid.eval_batch_size", "0"]
    plain = run_cli(*args, cwd=tmp_path)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines()[-1] == (
        "ddpm-lightning fit: error: --grid.eval_batch_size 0: images in a grid must be positive. "
        "(--debug shows the traceback)"
    )
    assert "Traceback" not in plain.stderr
    for debug in (
        run_cli(*args, "--debug", cwd=tmp_path),
        run_cli(*args, cwd=tmp_path, env_extra={"DDPM_LIGHTNING_DEBUG": "1"}),
    ):
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "must be positive" in debug.stderr


@pytest.mark.slow
def test_help_lists_the_commands_that_work_and_documents_every_key(tmp_path):
    top = run_cli("--help", cwd=tmp_path).stdout
    assert all(f"    {name} " in top for name in ("fit", "validate", "sample", "export"))
    assert "    test " not in top and "    predict " not in top
    fit_help = run_cli("fit", "--help", cwd=tmp_path).stdout
    for key in ("--grid.eval_batch_size", "--grid.sampler", "--save.save_model_epochs", "--save.push_to_hub"):
        text = fit_help.split(f"\n  {key} ", 1)[1].split("\n  --", 1)[0]
        assert not text.strip().startswith("(type:"), f"{key} has no help text: {text}"


@pytest.mark.slow
def test_a_plain_run_shows_no_noise_but_keeps_actionable_warnings(image_folder, tmp_path):
    args = fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--model.lr_warmup_steps", "500")
    first = run_cli(*args, cwd=tmp_path)
    resumed = run_cli(
        *fit_args(
            image_folder,
            tmp_path / "run",
            "--trainer.max_epochs",
            "2",
            "--model.lr_warmup_steps",
            "500",
            "--ckpt_path",
            "last",
        ),
        cwd=tmp_path,
    )
    for result in (first, resumed):
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        for noise in (
            "Tip:",
            "TPU available",
            "set_vital",
            "LeafSpec",
            "exists and is not empty",
            "LightningCLI's args parameter",
            "Loading `train_dataloader` to estimate",
        ):
            assert noise not in log, noise
        assert "lr_warmup_steps=500 is not shorter than the run" in log  # an actionable warning stays
