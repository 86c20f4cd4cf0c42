"""Every mistake ends in one line naming the problem and the fix, through a child `python -m ddpm_lightning`: one of
each kind (a value, a UNet, a checkpoint, `sample`'s output, a read-only checkpoint folder). Each error's own test is
beside the module that raises it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET, fit_args, run_cli, write_image


@pytest.fixture
def four_images(tmp_path) -> Path:
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.png", seed=i)
    return tmp_path / "images"


def read_only_folder(tmp_path: Path) -> Path:
    """A read-only file system where this process may mount one (root ignores permissions), else a 0o555 folder."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode != 0:
        folder.chmod(0o555)
    return folder


def mistake(name: str, tmp_path: Path, images: Path) -> tuple[list[str], str]:
    """The command line of mistake `name`, and what its one line must say."""
    if name == "val_fraction":
        return fit_args(
            images, tmp_path / "run", "--data.val_fraction", "2"
        ), "--data.val_fraction 2.0: the share of images held out must be in [0, 1)"
    if name == "norm_groups":
        unet = {**TINY_UNET, "block_out_channels": [16, 32]}  # not multiples of the default 32 groups
        return fit_args(images, tmp_path / "run", "--model.unet", json.dumps(unet)), "multiples of norm_num_groups 32"
    if name == "plain_torch_save":
        torch.save({"w": torch.ones(2)}, tmp_path / "weights.ckpt")
        args = fit_args(images, tmp_path / "run", "--data.val_fraction", "0.5", "--ckpt_path", "weights.ckpt")
        return ["validate", *args[1:]], "weights.ckpt is not a Lightning checkpoint"
    if name == "sample_onto_a_file":
        (tmp_path / "taken").write_text("mine")
        return ["sample", "google/ddpm-cifar10-32", "--output_dir", "taken"], "--output_dir taken is a file"
    if name == "endless":
        args = fit_args(images, tmp_path / "run", "--trainer.max_epochs", "-1", "--trainer.max_time", "00:00:01:00")
        return args, "the run has no set length (trainer.max_epochs -1 and no trainer.max_steps)"
    if name == "read_only_checkpoints":
        folder = read_only_folder(tmp_path)
        return fit_args(images, tmp_path / "run", "--checkpoint.dirpath", str(folder)), "checkpoint.dirpath "
    raise AssertionError(name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["val_fraction", "norm_groups", "plain_torch_save", "sample_onto_a_file", "endless", "read_only_checkpoints"],
)
def test_mistakes_end_in_one_line_with_the_fix(tmp_path, four_images, name):
    args, said = mistake(name, tmp_path, four_images)
    try:
        result = run_cli(*args, cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(tmp_path / "read_only")], capture_output=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"ddpm-lightning {args[0]}: error: ") and said in last, last
