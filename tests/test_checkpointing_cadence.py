"""When checkpoints are written (checkpointing/cadence.py): one file at a time, `last.ckpt` a link to it."""

from __future__ import annotations

import os

import pytest

from ddpm_lightning.cli import main

from conftest import NO_SAVES, fit_args, step_and_weights


@pytest.mark.slow
def test_default_checkpointing_is_one_file_linked_as_last(twelve, tmp_path):
    """No cadence reached in a short run: one checkpoint, at the end, and last.ckpt a link to it."""
    main(fit_args(twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "2"))
    folder = tmp_path / "checkpoints" / "run"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[1] == "last.ckpt" and files[0].startswith("epoch="), files
    assert os.readlink(folder / "last.ckpt") == files[0]
    assert step_and_weights(folder / "last.ckpt")[0] == 6


@pytest.mark.slow
def test_step_cadence_keeps_one_file_and_moves_the_link(twelve, tmp_path):
    main(
        fit_args(
            twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "2"
        )
    )
    folder = tmp_path / "checkpoints" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]  # one file kept
    assert os.readlink(folder / "last.ckpt") == "epoch=1-step=6.ckpt"
    main(
        fit_args(
            twelve,
            tmp_path / "all",
            *NO_SAVES,
            "--trainer.max_epochs",
            "2",
            "--checkpoint.every_n_train_steps",
            "2",
            "--checkpoint.save_top_k",
            "-1",
        )
    )
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "all").glob("epoch*.ckpt"))
    assert kept == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=1-step=6.ckpt"]


@pytest.mark.slow
def test_an_epoch_cadence_saves_every_epoch_when_validation_runs_less_often(twelve, tmp_path):
    """--checkpoint.every_n_epochs 1 under trainer.check_val_every_n_epoch 5 (as configs/tiny.yaml validates):
    a checkpoint at each of the 3 epochs' ends, not only where validation runs."""
    cadence = ["--checkpoint.every_n_epochs", "1", "--checkpoint.save_top_k", "-1"]
    main(
        fit_args(
            twelve,
            tmp_path / "run",
            *NO_SAVES,
            *cadence,
            "--trainer.max_epochs",
            "3",
            "--trainer.check_val_every_n_epoch",
            "5",
            "--data.val_fraction",
            "0.25",
        )
    )
    folder = tmp_path / "checkpoints" / "run"
    assert sorted(p.name for p in folder.glob("epoch=*")) == [f"epoch={e}-step={3 * e + 3}.ckpt" for e in range(3)]
