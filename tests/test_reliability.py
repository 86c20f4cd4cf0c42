"""Interruptions and bad resumes: SIGTERM / SIGUSR1 save and exit, atomic checkpoints, clear resume errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import child_env, fit_args, scalar_steps
from ddpm_lightning.checkpointing import AtomicCheckpointIO
from ddpm_lightning.cli import main


def last_step(folder: Path) -> int:
    return torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_last_checkpoint_exits_cleanly_and_resume_finishes(image_folder, tmp_path, signum):
    out, ckpts = tmp_path / "run", tmp_path / "checkpoints"
    args = fit_args(image_folder, out, "--trainer.max_steps", "90", "--trainer.max_epochs", "-1",
                    "--grid.save_image_epochs", "1000", "--save.save_model_epochs", "1000")
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_lightning", *args], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (ckpts / "last.ckpt").exists():  # the first epoch's checkpoint: training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # into a later epoch
    proc.send_signal(signum)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    stopped_at = last_step(ckpts)
    assert 3 < stopped_at < 90 and f"Stopped by a signal at step {stopped_at}" in log
    assert not list(ckpts.glob(".*partial*"))

    main([*args, "--ckpt_path", "last"])
    assert last_step(ckpts) == 90
    steps = scalar_steps(out / "logs", "train/loss")
    assert sorted(set(steps)) == list(range(90))  # no step lost; the one in flight at the signal may log twice


def test_resume_last_without_checkpoint_fails_with_the_fix(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.ckpt in .*Leave --ckpt_path out to start from scratch"):
        main(fit_args(image_folder, tmp_path / "run", "--ckpt_path", "last"))
    assert not (tmp_path / "run" / "samples").exists()


def test_corrupt_checkpoint_is_named(image_folder, tmp_path):
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1"))
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{bad}.*truncated or corrupt"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "2", "--ckpt_path", str(bad)))


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
