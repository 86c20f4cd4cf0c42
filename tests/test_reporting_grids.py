"""Grids (reporting/grids.py): their shape, the grid an eval batch cannot fill refused, and the images reaching each
tracker through its own image call: W&B (offline) and MLflow (a local file store) beside TensorBoard, all three
given to one `fit` through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import wandb
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.reporting.grids import grid_shape

from conftest import fit_args, tb_events


def test_grid_shape_is_as_square_as_possible():
    assert [grid_shape(n) for n in (1, 6, 7, 12, 16)] == [(1, 1), (2, 3), (1, 7), (3, 4), (4, 4)]


def test_grid_shape_takes_the_rows_given_and_refuses_rows_that_do_not_divide_the_images():
    assert grid_shape(16, None) == (4, 4)
    assert grid_shape(8, None) == (2, 4)
    assert grid_shape(6, 3) == (3, 2)
    with pytest.raises(ValueError, match="grid_rows"):
        grid_shape(10, 4)


@pytest.mark.slow
def test_grid_that_eval_batch_cannot_fill_is_refused(image_folder, tmp_path):
    with pytest.raises(ValueError, match="eval_batch_size=10 images do not fill a grid of 4 rows"):
        main(fit_args(image_folder, tmp_path / "run", "--grid.eval_batch_size", "10", "--grid.grid_rows", "4"))


def pixels(path) -> bytes:
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


@pytest.mark.slow
def test_grids_and_data_png_reach_wandb_mlflow_and_tensorboard(image_folder, tmp_path, monkeypatch):
    home = tmp_path / "tracker-home"  # W&B's and MLflow's own files, never the user's
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a plain folder store without it
    loggers = [
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(tmp_path / "wb")}},
        {
            "class_path": "lightning.pytorch.loggers.MLFlowLogger",
            "init_args": {"tracking_uri": (tmp_path / "mlruns").as_uri()},
        },
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
    ]
    out = tmp_path / "run"
    args = ["--trainer.max_epochs", "2", "--grid.save_image_epochs", "1", "--trainer.logger", json.dumps(loggers)]
    try:
        main(fit_args(image_folder, out, *args))
    finally:
        wandb.finish()  # the run would otherwise stay open for the next test in this process
    written = {pixels(out / "samples" / name) for name in ("data.png", "0000.png", "0001.png")}
    assert len(written) == 3

    [run] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    media = run / "files" / "media" / "images"
    assert len(list(media.glob("data/images_*.png"))) == 1 and len(list(media.glob("samples_*.png"))) == 2
    assert {pixels(p) for p in media.rglob("*.png")} == written

    [images] = (tmp_path / "mlruns").glob("*/*/artifacts/images")
    logged = sorted(p.name.split("+")[0] for p in images.glob("*.png") if "compressed" not in p.name)
    assert logged == ["data~images", "samples", "samples"]  # MLflow's key for "data/images"
    assert {pixels(p) for p in images.glob("*.png") if "compressed" not in p.name} == written

    [tb] = (tmp_path / "tb").glob("lightning_logs/version_*")
    assert len(tb_events(tb, "samples", "images")) == 2 and len(tb_events(tb, "data/images", "images")) == 1
