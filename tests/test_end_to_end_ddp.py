"""DDP with two CPU processes (child `python -m ddpm_lightning`): one grid and one model folder, a grid longer than
the collective timeout, a crash in one rank."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from ddpm_lightning import posthoc_ema

from conftest import child_env, crash_args, ddp_fit_command, fit_args


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_grid_and_one_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [
        *ddp_fit_command(image_folder, out, "--trainer.max_epochs", "2"),
        "--grid.save_image_epochs",
        "100",
        "--save.save_model_epochs",
        "100",
        "--posthoc_ema.enabled",
        "true",
        "--posthoc_ema.every_n_steps",
        "2",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0001.png", "data.png"]
    # The post-hoc EMA profiles are rank 0's: one set of snapshots, one line, and the checkpoint holds them
    snapshots = posthoc_ema.snapshots(tmp_path / "checkpoints" / "run" / posthoc_ema.SNAPSHOTS)
    assert sorted(snapshots) == [(0, 2), (0, 4), (1, 2), (1, 4)] and log.count("posthoc_ema: sigma_rels") == 1
    assert log.count("Saved a grid") == 1 and "[rank 0] Saved a grid" in log
    assert log.count("Saved the model") == 1 and "[rank 0] Saved the model" in log
    DDPMPipeline.from_pretrained(out)
    # 12 images over 2 ranks with batch 4: 2 optimizer steps per epoch
    checkpoint = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert posthoc_ema.checkpoint_state(checkpoint)["profiles"]["ema_models.0.step"] == 4


@pytest.mark.slow
def test_ddp_grid_longer_than_the_collective_timeout_does_not_time_out(image_folder, tmp_path):
    """Drawing the grid (1000 DDPM steps, padded to 32 s on a fast machine) takes longer than the 30 s collective
    timeout: a design where rank 0 draws it alone while rank 1 waits at the checkpoint barrier fails here with a
    gloo timeout. (30 s, not less: the same timeout bounds the ranks' rendezvous, where rank 1 must first import
    torch, Lightning and diffusers: about 9 s on an idle core, more while another test process loads the CPU.)"""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ddpm_lightning",
        *fit_args(image_folder, out, "--trainer.max_epochs", "1"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.timeout",
        "0:00:30",
        "--grid.num_inference_steps",
        "1000",
        "--grid.sampler",
        "ddpm",
    ]
    # each rank times its own share of the grid's sampling (sample_share, no collective inside) and prints it
    script = tmp_path / "timed_fit.py"
    script.write_text(
        "import sys, time\n"
        "from ddpm_lightning import callbacks\n"
        "from ddpm_lightning.cli import main\n"
        "real = callbacks.sample_share\n"
        "def timed(trainer, *args, **kwargs):\n"
        "    start = time.perf_counter()\n"
        "    images = real(trainer, *args, **kwargs)\n"
        "    time.sleep(max(0.0, 32 - (time.perf_counter() - start)))  # a slower GPU grid, on any machine\n"
        "    print(f'GRID rank {trainer.global_rank} sampled in {time.perf_counter() - start:.2f} s', flush=True)\n"
        "    return images\n"
        "callbacks.sample_share = timed\n"
        "main(sys.argv[1:])\n"
    )
    cmd = [sys.executable, str(script), *cmd[3:]]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.png", "data.png"]
    assert Image.open(out / "samples" / "0000.png").size == (32, 32)
    seconds = {int(rank): float(s) for rank, s in re.findall(r"GRID rank (\d) sampled in ([\d.]+) s", log)}
    assert sorted(seconds) == [0, 1], log[-3000:]
    assert min(seconds.values()) > 30, seconds  # the grid's sampling itself really outlasted the 30 s timeout


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_crash_in_one_rank_ends_the_run_with_the_error(image_folder, tmp_path, rank):
    """With the default 30-minute collective timeout, a hang would be caught by the 120 s limit here."""
    cmd = [*ddp_fit_command(image_folder, tmp_path / "run", "--trainer.max_epochs", "3"), *crash_args(2, rank)]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"injected crash on rank {rank} at step 2" in result.stdout + result.stderr
