"""Checkpoint writes (checkpointing/writes.py): atomic, fsync'ed before the rename, in a background thread that
moves `last` and removes the old file only once the new one is whole; a full disk keeps the last good checkpoint;
a killed write's leftovers are swept at the next start."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_lightning.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from ddpm_lightning.cli import main, raised_by_this_package

from conftest import NO_SAVES, child_env, fit_args, max_steps, step_of


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def dies_half_way(obj, f):  # a crash while the bytes go out: half a file, then the process is gone
        f.write(b"PK\x03\x04" + b"\0" * 4000)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_background_writes_are_atomic_and_the_link_and_removal_wait_for_them(tmp_path, monkeypatch):
    """The write runs in a thread on a copy taken at once; `last` moves to the new file, and the old file goes,
    only after the new one is complete; a failed write is raised on the training thread."""
    from ddpm_lightning.checkpointing import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    old, new, last = tmp_path / "epoch=0-step=1.ckpt", tmp_path / "epoch=0-step=2.ckpt", tmp_path / "last.ckpt"
    io.checkpoint_io.save_checkpoint({"global_step": 1}, old)
    io.checkpoint_io.link(str(old), str(last))
    release = __import__("threading").Event()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (release.wait(30), real_save(obj, f)))
    weights = torch.ones(3)
    io.save_checkpoint({"global_step": 2, "w": weights}, new)
    io.link(str(new), str(last))
    io.remove_checkpoint(old)
    weights.zero_()  # training goes on and changes the weights: the checkpoint holds the values at the save
    time.sleep(0.2)
    assert not new.exists() and old.exists() and os.readlink(last) == old.name  # nothing moved before the write
    release.set()
    io.teardown()  # what fit does at its end: wait for the queue
    assert os.readlink(last) == new.name and not old.exists()
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 2 and torch.equal(saved["w"], torch.ones(3))
    assert not list(tmp_path.glob(".*partial*"))

    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError("disk full")))
    # The failure reaches the training thread: at this save call if the thread has already failed (it is fast),
    # else when fit waits for the queue at its end. Both raise it; which one depends on thread timing.
    with pytest.raises(OSError, match="disk full"):
        try:
            io.save_checkpoint({"global_step": 3}, tmp_path / "epoch=0-step=3.ckpt")
        finally:
            io.teardown()
    assert torch.load(last, weights_only=False)["global_step"] == 2


@pytest.mark.slow
def test_checkpoint_bytes_are_fsynced_before_the_rename(image_folder, tmp_path, monkeypatch):
    """docs/long-runs.md: a checkpoint goes to a temporary file, is fsync'ed, then renamed. In a real fit, every
    rename onto a checkpoint is preceded by an fsync of the very file being renamed, with all its bytes written."""
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


@pytest.mark.slow
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


KILLED_WRITE = """
import sys, time, torch
from ddpm_lightning.checkpointing import AtomicCheckpointIO

def stalls(obj, f):  # half a checkpoint out, then the process hangs until it is killed
    f.write(b"PK" + bytes(100_000)); f.flush(); print("writing", flush=True); time.sleep(600)

torch.save = stalls
AtomicCheckpointIO().save_checkpoint({"global_step": 9}, sys.argv[1])
"""


@pytest.mark.slow
def test_files_of_a_killed_write_and_of_an_old_cadence_are_removed_on_resume(twelve, tmp_path):

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
