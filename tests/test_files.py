"""A run's files (files.py): the run folder's layout as `RunFolder` hands it out, writes that are whole or not at
all, the sweep of what a killed write left, and the one-line account of a failed write. Each writer's own use of
them (grids, cards, model folders, checkpoints, `sample`) is tested beside that writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from ddpm_lightning.files import (
    PARTIAL,
    RunFolder,
    first_line,
    next_run,
    remove_partial_files,
    why_not_written,
    write_whole,
)

from conftest import write_image


def test_the_run_folder_hands_out_each_file_s_path(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.grid(3) == tmp_path / "run" / "samples" / "0003.png"
    assert run.grid(12345) == tmp_path / "run" / "samples" / "12345.png"
    assert run.data_preview == tmp_path / "run" / "samples" / "data.png"
    assert run.nearest == tmp_path / "run" / "samples" / "nearest.png"
    assert run.fid_reference == tmp_path / "run" / "fid_reference"
    assert run.config == tmp_path / "run" / "logs" / "config.yaml"
    assert run.summary == tmp_path / "run" / "run_summary.json"
    assert run.lock == tmp_path / "run" / ".ddpm-lightning.lock"


def test_the_grids_are_the_epoch_grids_and_the_newest_is_the_last_written(tmp_path):
    run = RunFolder(tmp_path)
    assert run.grids() == [] and run.newest_grid() is None  # no samples/ folder yet
    for name in ("0001.png", "0000.png", "data.png", "nearest.png"):
        write_image(run.samples / name, size=(8, 8))
    (run.samples / "0002.png").mkdir()  # not a file: never a grid
    assert run.grids() == [run.grid(0), run.grid(1)]
    os.utime(run.grid(0), ns=(0, 2 * 10**18))  # rewritten last (a resumed run's grid of an earlier epoch)
    os.utime(run.grid(1), ns=(0, 10**18))
    assert run.newest_grid() == run.grid(0)
    os.utime(run.data_preview, ns=(0, 3 * 10**18))  # the training images, even newer, are no grid
    assert run.newest_grid() == run.grid(0)


def test_a_whole_write_keeps_the_suffix_and_a_failed_one_leaves_the_old_file(tmp_path):
    path = tmp_path / "grid.png"
    seen = []

    def save(partial: Path) -> None:
        seen.append(partial.name)
        Image.new("RGB", (4, 4), "red").save(partial)  # PIL picks the format from the suffix

    write_whole(path, save)
    assert seen == [f".grid{PARTIAL}{os.getpid()}.png"] and Image.open(path).getpixel((0, 0)) == (255, 0, 0)

    def fail(partial: Path) -> None:
        partial.write_bytes(b"half an image")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_whole(path, fail)
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no partial file left


def test_partial_files_and_folders_are_removed_and_nothing_else(tmp_path):
    (tmp_path / f".last.ckpt{PARTIAL}123").write_bytes(b"x")
    (tmp_path / f".0003{PARTIAL}123.png").write_bytes(b"x")
    (tmp_path / f".model{PARTIAL}123" / "unet").mkdir(parents=True)  # a model folder's staging
    (tmp_path / ".ddpm-lightning.lock").write_text("")
    (tmp_path / "notes.partial-1.txt").write_text("")  # not hidden: not ours
    remove_partial_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ddpm-lightning.lock", "notes.partial-1.txt"]
    remove_partial_files(tmp_path / "missing")
    remove_partial_files(None)


def test_a_failed_write_is_told_in_one_line():
    assert first_line(OSError("No space left on device\n  at line 3\n")) == "No space left on device"
    assert first_line(RuntimeError("\n  unexpected pos 128\nmore")) == "unexpected pos 128"
    assert first_line(OSError()) == "OSError"
    reason = why_not_written(Path("/"), RuntimeError("unexpected pos 64\ntraceback"))
    assert reason.startswith("unexpected pos 64; ") and reason.endswith(" MiB free there")
    assert why_not_written(Path("/no/such/folder"), OSError()) == "OSError; its folder cannot be read"
    assert next_run(True) == "resume with --ckpt_path last"
    assert "--overwrite true" in next_run(False)
