"""A full disk, a NaN or a broken `last.ckpt` never costs the last good checkpoint, and never silently restarts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_lightning.checkpointing import CheckpointWriteError
from ddpm_lightning.cli import main, raised_by_this_package

from conftest import NO_SAVES, fit_args, max_steps, write_image

pytestmark = pytest.mark.slow  # each test runs `fit` (or the CLI) at least once


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """small_disk(size) -> a folder on a file system of `size` bytes: a tmpfs where this process may mount one
    (root on Linux), else a folder whose checkpoint writes fail with ENOSPC once they would pass `size`."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
        if mount.returncode == 0:
            mounted.append(folder)
            return folder
        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # the bytes go out, then the disk says it is full
            real_save(obj, f, *args, **kwargs)
            target = Path(getattr(f, "name", "")).parent
            if target == folder and sum(p.stat().st_size for p in folder.iterdir()) > size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", save)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def checkpoint_size(twelve: Path, tmp_path: Path) -> int:
    main(fit_args(twelve, tmp_path / "sizing", *NO_SAVES, *max_steps(1)))
    return (tmp_path / "checkpoints" / "sizing" / "last.ckpt").stat().st_size


@pytest.mark.parametrize("room", [1.5, 0.5])  # one checkpoint fits (the second write fails), or none does
def test_a_full_disk_keeps_the_last_good_checkpoint_and_stops_with_one_line(twelve, tmp_path, small_disk, room):
    disk = small_disk(int(room * checkpoint_size(twelve, tmp_path)))
    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, *max_steps(12), "--checkpoint.every_n_train_steps", "4")
    with pytest.raises(CheckpointWriteError, match="Cannot write the checkpoint ") as failed:
        main([*args, "--checkpoint.dirpath", str(disk)])
    assert raised_by_this_package(failed.value)  # the command line shows it as one line
    names = sorted(p.name for p in disk.iterdir() if p.name != "lost+found")
    if room > 1:
        assert f"{disk / 'epoch=2-step=8.ckpt'}" in str(failed.value)
        assert str(failed.value).endswith("then resume with --ckpt_path last.")
        assert names == ["epoch=1-step=4.ckpt", "last.ckpt"]  # the step-4 file kept, no partial file left
        assert os.readlink(disk / "last.ckpt") == "epoch=1-step=4.ckpt" and step_of(disk / "last.ckpt") == 4
    else:
        assert names == []  # no link to a file that was never written, and no resume to advise
        assert str(failed.value).endswith(
            "start the run again with --overwrite true (no checkpoint was saved to resume from)."
        )


def break_dangling(folder: Path) -> Path:
    target = folder / os.readlink(folder / "last.ckpt")
    target.unlink()
    return folder / "last.ckpt"


def break_truncated(folder: Path) -> Path:
    target = folder / os.readlink(folder / "last.ckpt")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def break_emptied(folder: Path) -> Path:
    for path in folder.iterdir():
        path.unlink()
    return folder


@pytest.mark.parametrize("damage", [break_dangling, break_truncated, break_emptied])
def test_resume_from_a_broken_last_fails_before_training_naming_the_file_and_the_fresh_start(twelve, tmp_path, damage):
    import shutil

    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, *max_steps(3))
    main(args)
    folder = tmp_path / "broken"
    shutil.copytree(tmp_path / "checkpoints" / "run", folder, symlinks=True)
    named = damage(folder)
    logs = sorted((tmp_path / "run" / "logs").iterdir())
    with pytest.raises((FileNotFoundError, ValueError), match=f"{named}.*--ckpt_path out and pass --overwrite true"):
        main([*args[:-1], "6", "--ckpt_path", "last", "--checkpoint.dirpath", str(folder)])
    assert sorted((tmp_path / "run" / "logs").iterdir()) == logs  # nothing trained: no new event file


@pytest.mark.parametrize(
    "diverge, first_bad, last_good",
    [
        (["--trainer.callbacks+=conftest.NaNAtStep", "--trainer.callbacks.step", "5"], 5, 4),
        (["--model.learning_rate", "1e9", "--model.lr_warmup_steps", "0"], 1, None),  # the command
    ],
)
def test_no_checkpoint_grid_or_model_is_written_after_a_nan_loss(twelve, tmp_path, diverge, first_bad, last_good):
    """Checkpoints every 2 steps, the NaN check every 10: each save checks first. Grids and saves every epoch."""
    out, folder = tmp_path / "run", tmp_path / "checkpoints" / "run"
    saves = ["--grid.save_image_epochs", "1", "--save.save_model_epochs", "1", "--checkpoint.every_n_train_steps", "2"]
    with pytest.raises(FloatingPointError, match=f"NaN or infinite at step {first_bad}"):
        main(fit_args(twelve, out, *saves, *max_steps(12), *diverge))
    if last_good is None:
        assert not folder.exists() or not list(folder.iterdir())
        assert not list((out / "samples").glob("0*.png")) and not (out / "unet").exists()  # no grid, no model
        return
    assert step_of(folder / "last.ckpt") == last_good
    assert sorted(p.name for p in folder.iterdir()) == [f"epoch=1-step={last_good}.ckpt", "last.ckpt"]
    weights = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sorted((out / "samples").glob("0*.png")) == [out / "samples" / "0000.png"]  # epoch 0 (steps 0-2) only
    from diffusers import UNet2DModel

    saved = UNet2DModel.from_pretrained(out / "unet")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


KILLED_WRITE = """
import sys, time, torch
from ddpm_lightning.checkpointing import AtomicCheckpointIO

def stalls(obj, f):  # half a checkpoint out, then the process hangs until it is killed
    f.write(b"PK" + bytes(100_000)); f.flush(); print("writing", flush=True); time.sleep(600)

torch.save = stalls
AtomicCheckpointIO().save_checkpoint({"global_step": 9}, sys.argv[1])
"""


def test_files_of_a_killed_write_and_of_an_old_cadence_are_removed_on_resume(twelve, tmp_path):
    from conftest import child_env

    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "-1")
    folder = tmp_path / "checkpoints" / "run"
    main([*args, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2"])
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITE, str(folder / "epoch=9-step=99.ckpt")],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert [p.name for p in folder.glob(".*partial*")] == [f".epoch=9-step=99.ckpt.partial-{writer.pid}"]
    # resumed with another cadence: the old cadence's file goes once the new one is written, as does the partial
    main([*args, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "3", "--ckpt_path", "last"])
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]


def test_a_resume_at_another_image_size_is_refused_and_other_data_changes_are_named(twelve, tmp_path):
    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "-1")
    main([*args, "--trainer.max_steps", "2"])
    with pytest.raises(ValueError, match="trained at data.image_size 16, not 32"):
        main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.image_size", "32"])
    for i in range(12, 16):  # images added to the folder, and another batch size
        write_image(twelve / f"{i}.png", seed=i)
    with pytest.warns(UserWarning, match=r"train_batch_size 4 -> 2; 12 -> 16 training images\): .*another order"):
        main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.train_batch_size", "2"])
    assert step_of(tmp_path / "checkpoints" / "run" / "last.ckpt") == 4
