"""The LR schedule under gradient accumulation, and the fsync of the atomic checkpoint write, observed in real runs."""

from __future__ import annotations

import math
import os

import pytest
import torch

from ddpm_lightning.cli import main

from conftest import fit_args, scalars


@pytest.mark.slow
def test_schedule_steps_once_per_optimizer_step_and_ends_at_zero_under_accumulation(image_folder, tmp_path):
    """12 images, batch 4, accumulate 2: 3 micro-batches and 2 optimizer steps an epoch; 3 epochs = 6 optimizer
    steps. The schedule (warm-up 2, cosine to 0) is 6 steps long and steps 6 times, once per optimizer step."""
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            "--trainer.max_epochs",
            "3",
            "--trainer.accumulate_grad_batches",
            "2",
            "--model.lr_warmup_steps",
            "2",
            "--model.learning_rate",
            "0.002",
        )
    )
    last = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 6
    assert last["lr_schedulers"][0]["last_epoch"] == 6  # not once per micro-batch (9)
    assert last["lr_schedulers"][0]["_last_lr"] == [0.0]  # the cosine reached 0 at the run's last optimizer step
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    # the rate each micro-batch logged is the one of the optimizer step it belongs to
    lr = scalars(out / "logs", "train/lr")
    assert sorted(lr) == list(range(6))
    for k, value in lr.items():
        expected = 0.002 * (k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / (6 - 2))))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_checkpoint_bytes_are_fsynced_before_the_rename(image_folder, tmp_path, monkeypatch):
    """docs/long-runs.md: a checkpoint goes to a temporary file, is fsync'ed, then renamed. In a real fit, every rename onto
    a checkpoint is preceded by an fsync of the very file being renamed, with all its bytes written."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        stat = os.fstat(fd)
        events.append(("fsync", stat.st_ino, stat.st_size))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        stat = os.stat(src)
        events.append(("replace", stat.st_ino, stat.st_size, str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1"))
    ckpt_renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[3].endswith(".ckpt")]
    assert ckpt_renames, events
    for i in ckpt_renames:
        _, inode, size, dst = events[i]
        synced = [e for e in events[:i] if e[0] == "fsync" and e[1] == inode]
        assert synced and synced[-1][2] == size, f"{dst} renamed into place without an fsync of its bytes"
