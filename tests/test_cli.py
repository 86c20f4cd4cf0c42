"""End to end through the real entry point: `main([...])` with configs/tiny.yaml, as a user runs it."""

from __future__ import annotations

import logging
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from PIL import Image

from ddpm_lightning.cli import main

from conftest import (
    HELICONIUS,
    NO_SAVES,
    REPO,
    TINY_CONFIG,
    child_env,
    crash_args,
    ddp_fit_command,
    fit_args,
    max_steps,
    scalars,
    tb_events,
)


@pytest.mark.slow
def test_fit_writes_grid_model_logs_and_checkpoints(image_folder, tmp_path):
    out = tmp_path / "run"
    main(fit_args(image_folder, out, "--trainer.max_epochs", "2", "--grid.save_image_epochs", "1"))

    # a grid per epoch (every epoch here), 2 x 2 images of 16 px, no padding
    grids = sorted((out / "samples").glob("[0-9]*.png"))
    assert [g.name for g in grids] == ["0000.png", "0001.png"]
    assert Image.open(grids[-1]).size == (32, 32)

    # the diffusers folder loads and generates
    pipe = DDPMPipeline.from_pretrained(out)
    images = pipe(
        batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3)
    assert pipe.unet.config.sample_size == 16

    # TensorBoard holds loss and learning rate at every step; the run's config sits beside the logs
    loss = scalars(out / "logs", "train/loss")
    assert sorted(loss) == list(range(6)) and all(math.isfinite(v) for v in loss.values())
    assert len(scalars(out / "logs", "train/lr")) == 6
    assert "output_dir: " + str(out) in (out / "logs" / "config.yaml").read_text()

    # checkpoints go to ./checkpoints/<output_dir name> (relative to the working directory), last.ckpt kept
    last = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 6 and last["epoch"] == 1


@pytest.mark.slow
def test_learning_rate_follows_warmup_then_cosine(image_folder, tmp_path):
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            *max_steps(12),
            "--model.lr_warmup_steps",
            "4",
            "--model.learning_rate",
            "0.002",
        )
    )
    lr = scalars(out / "logs", "train/lr")
    assert sorted(lr) == list(range(12))
    for k, value in lr.items():  # the rate used by optimizer step k
        expected = 0.002 * (k / 4 if k < 4 else 0.5 * (1 + math.cos(math.pi * (k - 4) / (12 - 4))))
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_resume_from_last_continues_to_max_steps(image_folder, tmp_path):
    out = tmp_path / "run"
    main(fit_args(image_folder, out, *max_steps(6)))  # 12 images / batch 4: two epochs
    first = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert first["global_step"] == 6

    main(fit_args(image_folder, out, *max_steps(10), "--ckpt_path", "last"))
    final = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False, map_location="cpu")
    assert final["global_step"] == 10  # not more, not less
    # the optimizer and the schedule continued instead of starting again
    assert final["lr_schedulers"][0]["last_epoch"] == 10
    assert final["optimizer_states"][0]["state"][0]["step"] == 10
    # the same log folder continues: every step once, from both runs
    assert sorted(e.step for e in tb_events(out / "logs", "train/loss")) == list(range(10))
    assert not (out / "logs" / "version_1").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_write_one_grid_and_one_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    cmd = [
        *ddp_fit_command(image_folder, out, "--trainer.max_epochs", "2"),
        "--grid.save_image_epochs",
        "100",
        "--save.save_model_epochs",
        "100",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0001.png", "data.png"]
    assert log.count("Saved a grid") == 1 and "[rank 0] Saved a grid" in log
    assert log.count("Saved the model") == 1 and "[rank 0] Saved the model" in log
    DDPMPipeline.from_pretrained(out)
    # 12 images over 2 ranks with batch 4: 2 optimizer steps per epoch
    assert torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.slow
def test_fit_on_the_shipped_heliconius_photos(tmp_path):
    """The quick start's data as configs/tiny.yaml names it (a Hub-format parquet folder in the checkout), 2 steps."""
    out = tmp_path / "run"
    main(fit_args(HELICONIUS, out, "--trainer.max_steps", "2"))
    assert Image.open(out / "samples" / "0000.png").size == (32, 32)
    assert len(scalars(out / "logs", "train/loss")) == 2
    assert yaml.safe_load(TINY_CONFIG.read_text())["data"]["dataset"] == "./data/heliconius"


def test_print_config_shows_tutorial_keys(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / "configs" / "butterflies.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)  # the printed config, parsed: exact values, not substrings
    expected = {
        "grid.save_image_epochs": 10,
        "save.save_model_epochs": 30,
        "grid.eval_batch_size": 16,
        "data.image_size": 128,
        "data.train_batch_size": 16,
        "model.learning_rate": 1e-4,
        "model.lr_warmup_steps": 500,
        "trainer.precision": "16-mixed",
        "trainer.max_epochs": 50,
        "output_dir": "ddpm-butterflies-128",
        "save.push_to_hub": False,
        "seed_everything": 0,
        "trainer.gradient_clip_val": 1.0,
        "trainer.accumulate_grad_batches": 1,
        "data.dataset": "huggan/smithsonian_butterflies_subset",
        "model.loss_weighting": "uniform",  # the tutorial's plain MSE: no min-SNR
    }
    for key, value in expected.items():
        found = config
        for part in key.split("."):
            found = found[part]
        assert found == value and type(found) is type(value), (key, found)


@pytest.mark.slow
def test_ddp_grid_longer_than_the_collective_timeout_does_not_time_out(image_folder, tmp_path):
    """Drawing the grid (1000 DDPM steps, padded to 12 s on a fast machine) takes longer than the 10 s collective
    timeout: a design where rank 0 draws it alone while rank 1 waits at the checkpoint barrier fails here with a
    gloo timeout. (10 s, not less: the same timeout bounds the ranks' rendezvous, slow on a loaded machine.)"""
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
        "0:00:10",
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
        "    time.sleep(max(0.0, 12 - (time.perf_counter() - start)))  # a slower GPU grid, on any machine\n"
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
    assert min(seconds.values()) > 10, seconds  # the grid's sampling itself really outlasted the 10 s timeout


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_crash_in_one_rank_ends_the_run_with_the_error(image_folder, tmp_path, rank):
    """With the default 30-minute collective timeout, a hang would be caught by the 120 s limit here."""
    cmd = [*ddp_fit_command(image_folder, tmp_path / "run", "--trainer.max_epochs", "3"), *crash_args(2, rank)]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"injected crash on rank {rank} at step 2" in result.stdout + result.stderr


@pytest.mark.slow
def test_the_old_spelling_quality_every_n_epochs_still_works_and_warns(image_folder, tmp_path, monkeypatch):
    """quality.every_n_epochs was renamed quality.measure_quality_epochs: a config that still says it trains
    with its value, and a FutureWarning names the new key."""
    from ddpm_lightning.callbacks import MeasureQuality

    seen = []
    monkeypatch.setattr(MeasureQuality, "setup", lambda self, *_, **__: seen.append(self.measure_quality_epochs))
    with pytest.warns(FutureWarning, match="quality.every_n_epochs is renamed quality.measure_quality_epochs"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_steps", "1", "--quality.every_n_epochs", "3"))
    assert seen == [3]


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for subcommand in ("fit", "validate"):
        assert f"    {subcommand} " in text, subcommand
    for command in ("sample", "export", "prepare"):  # outside LightningCLI: their own --help
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and f"usage: ddpm-lightning [options] {command}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- failures in a run
# Each ends in one line (main's raised_by_this_package), never in a library's traceback.


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", *args], cwd=cwd, env=child_env(), capture_output=True, text=True
    )


def weights_bytes() -> int:
    from conftest import tiny_module

    return sum(p.numel() * p.element_size() for p in tiny_module().unet.parameters())


@pytest.mark.slow
def test_a_full_disk_during_a_model_save_stops_in_one_line_and_the_resume_saves_that_model(
    twelve, tmp_path, tmpfs, caplog
):
    """Model saves every epoch into an output_dir with room for one model (a save stages the next beside it);
    a checkpoint every 3 steps: epoch 1's last, written just before its model save."""
    from ddpm_lightning.cli import raised_by_this_package
    from ddpm_lightning.model_source import load_model

    disk = tmpfs(int(1.5 * weights_bytes()))
    out, last = disk / "run", tmp_path / "checkpoints" / "run" / "last.ckpt"
    saves = ["--save.save_model_epochs", "1", "--grid.save_image_epochs", "1", "--checkpoint.every_n_train_steps", "3"]
    args = fit_args(twelve, out, "--trainer.max_epochs", "2", *saves)
    with pytest.raises(OSError, match=r"Cannot write the model to .*No space left on device") as failed:
        main(args)
    assert raised_by_this_package(failed.value)
    assert "no checkpoint deleted" in str(failed.value) and str(failed.value).endswith("--ckpt_path last.")
    assert "Steps trained: 3" in (out / "README.md").read_text() and not list(out.glob(".*partial*"))
    DDPMPipeline.from_pretrained(out)  # epoch 0's model, whole
    assert torch.load(last, weights_only=True, mmap=True)["global_step"] == 6

    subprocess.run(["mount", "-o", f"remount,size={8 * weights_bytes()}", str(disk)], check=True)  # space freed
    caplog.set_level("INFO", logger="ddpm_lightning")
    main([*args, "--ckpt_path", "last"])  # epoch 1 was the last: nothing left to train, but its model is saved
    assert "written just before epoch 1's model save (step 6)" in caplog.text
    assert "Steps trained: 6" in (out / "README.md").read_text()
    saved, expected = DDPMPipeline.from_pretrained(out).unet.state_dict(), load_model(str(last)).unet.state_dict()
    assert all(torch.equal(saved[name], value) for name, value in expected.items())


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["nan_loss", "max_epochs_below_the_checkpoint"])
def test_a_stop_inside_lightnings_loop_ends_in_one_line(twelve, tmp_path, failure):
    if failure == "nan_loss":  # the command: the first step diverges
        args = fit_args(
            twelve, tmp_path / "run", *max_steps(6), "--model.learning_rate", "1e9", "--model.lr_warmup_steps", "0"
        )
        said = "error: The loss became NaN or infinite at step 1"
    else:
        main(fit_args(twelve, tmp_path / "run", "--trainer.max_epochs", "3", *NO_SAVES))  # last: epoch=2-step=9
        args = fit_args(twelve, tmp_path / "run", "--trainer.max_epochs", "1", "--ckpt_path", "last")
        said = r"error: --trainer.max_epochs 1: the checkpoint last \(.*\) is at epoch 2 \(step 9;"
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(said, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]


@pytest.mark.slow
def test_a_resume_with_another_checkpoint_cadence_warns_nothing_the_user_cannot_act_on(twelve, tmp_path):
    import warnings

    args = fit_args(twelve, tmp_path / "run", "--trainer.max_epochs", "-1")
    main([*args, "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "2"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main([*args, "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "3", "--ckpt_path", "last"])
        lost = "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"
        warnings.warn(
            f"{lost} during `Trainer` instantiation. Please add the following callbacks: ['MyCallback'].", stacklevel=1
        )
    said = [str(w.message) for w in seen if "Be aware" in str(w.message)]
    assert len(said) == 1 and said[0].endswith("['MyCallback'].")  # one the user left out still warns


@pytest.mark.slow
def test_a_ctrl_c_is_logged_as_a_ctrl_c(twelve, tmp_path, caplog):
    import signal

    caplog.set_level("INFO")
    lightning_log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
    lightning_log.addHandler(caplog.handler)  # (Lightning's loggers need not reach the root)
    stop = ["--trainer.callbacks+=conftest.SignalAtBatch", "--trainer.callbacks.batch", "2"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(twelve, tmp_path / "run", *max_steps(6), *stop, "--trainer.callbacks.signum", "2"))
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert exit_info.value.code == 130
    assert "Ctrl-C: saving a checkpoint" in caplog.text and "Stopped by a signal at step 2" in caplog.text
    assert "SIGTERM" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
