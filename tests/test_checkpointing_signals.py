"""Stop signals (checkpointing/signals.py), real ones to a child `python -m ddpm_lightning fit`: SIGTERM, SIGUSR1
and Ctrl-C save and exit, a second Ctrl-C aborts at once, a repeated SIGTERM is the same request, and a grid or a
quality measurement in progress ends at its next denoising step."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from lightning.pytorch import Callback

from ddpm_lightning.cli import main

from conftest import NO_SAVES, child_env, fit_args, last_step, max_steps, tb_events


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 0), (signal.SIGUSR1, 0), (signal.SIGINT, 130)])
def test_signal_saves_last_checkpoint_exits_cleanly_and_resume_finishes(image_folder, tmp_path, signum, status):
    out, ckpts = tmp_path / "run", tmp_path / "checkpoints" / "run"
    args = fit_args(
        image_folder,
        out,
        *max_steps(90),
        *NO_SAVES,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning", *args, "--checkpoint.every_n_train_steps", "3"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (ckpts / "last.ckpt").exists():  # the first checkpoint: training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # a few steps later
    proc.send_signal(signum)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == status, log[-3000:]
    stopped_at = last_step(ckpts)
    assert 3 < stopped_at < 90 and f"Stopped by a signal at step {stopped_at}" in log
    assert not list(ckpts.glob(".*partial*"))

    main([*args, "--ckpt_path", "last"])
    assert last_step(ckpts) == 90
    steps = [e.step for e in tb_events(out / "logs", "train/loss")]
    assert sorted(set(steps)) == list(range(90))  # no step lost; the one in flight at the signal may log twice


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(image_folder, tmp_path):
    ckpts = tmp_path / "checkpoints" / "run"
    args = fit_args(
        image_folder,
        tmp_path / "run",
        *max_steps(90),
        "--checkpoint.every_n_train_steps",
        "1",
        "--trainer.callbacks+=conftest.SlowSteps",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning", *args],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (ckpts / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # within the same (1 s) step
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1, log[-3000:]
    assert "Ctrl-C: saving a checkpoint at the end of this step" in log
    assert "Stopped by a signal" not in log  # it did not wait for the step's end to save


IMAGES, BATCH = 12, 4  # the image_folder fixture's images; TINY_RUN_ARGS' batch size


STEPS_PER_EPOCH = math.ceil(IMAGES / BATCH)


GRID_STEPS = 1000  # the ddpm sampler's every timestep: a grid of minutes on a CPU


SIGNAL_AT = 11  # the denoising step after which the test signals (steps 1 to 11 time one step)


class PrintDenoisingSteps(Callback):
    """Prints "denoising step N" at each UNet call in eval mode: a grid's steps (training runs the UNet in train
    mode, and these runs have no validation)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.steps = 0
        pl_module.unet.register_forward_hook(self.printed)

    def printed(self, module, args, output) -> None:
        if not module.training:
            self.steps += 1
            print(f"denoising step {self.steps}", flush=True)


def grid_run_args(image_folder: Path, out: Path, *extra: str) -> list[str]:
    """Two epochs, a ddpm grid of GRID_STEPS steps and a model save at the end of each."""
    return fit_args(
        image_folder,
        out,
        "--trainer.max_epochs",
        "2",
        "--grid.save_image_epochs",
        "1",
        "--save.save_model_epochs",
        "1",
        "--grid.sampler",
        "ddpm",
        "--grid.eval_batch_size",
        "16",  # a step long enough that the stop (a save, the exit) is short beside the rest of the grid
        *extra,
    )


def start_and_signal_in_the_grid(
    args: list[str], cwd: Path, before: int = 0
) -> tuple[subprocess.Popen, float, float, list[str]]:
    """Start `fit`, send SIGTERM after the first grid's step SIGNAL_AT (after `before` other eval-mode UNet calls:
    a validation's); return the process, the time it was sent, one denoising step's measured length, and the
    lines read so far."""
    command = [
        sys.executable,
        "-m",
        "ddpm_lightning",
        *args,
        "--grid.num_inference_steps",
        str(GRID_STEPS),
        "--trainer.callbacks+=test_checkpointing_signals.PrintDenoisingSteps",
    ]
    proc = subprocess.Popen(
        command, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    first = None
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == f"denoising step {before + 1}":
            first = time.monotonic()
        if line.strip() == f"denoising step {before + SIGNAL_AT}" and first is not None:
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            return proc, sent, (sent - first) / (SIGNAL_AT - 1), lines
    proc.wait()
    pytest.fail(f"the grid never reached step {SIGNAL_AT}:\n" + "".join(lines)[-3000:])


@pytest.mark.slow
def test_a_stop_signal_during_an_epoch_end_grid_ends_it_at_the_next_step_then_saves_exits_0_and_resumes(
    image_folder, tmp_path
):
    out, ckpts = tmp_path / "run", tmp_path / "checkpoints" / "run"
    args = grid_run_args(image_folder, out)
    proc, sent, step_seconds, lines = start_and_signal_in_the_grid(args, tmp_path)
    rest_of_grid = (GRID_STEPS - SIGNAL_AT) * step_seconds  # what waiting for the grid would have cost
    try:
        log = "".join(lines) + proc.communicate(timeout=rest_of_grid / 2)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {rest_of_grid / 2:.0f} s after SIGTERM: the grid was not interrupted")
    stopped_after = time.monotonic() - sent
    print(f"one step {step_seconds:.3f} s, the rest of the grid {rest_of_grid:.0f} s, stopped in {stopped_after:.1f} s")
    assert proc.returncode == 0, log[-3000:]
    assert stopped_after < rest_of_grid / 2, f"{stopped_after:.1f} s to stop; one step takes {step_seconds:.3f} s"
    steps_drawn = log.count("denoising step ")
    assert SIGNAL_AT <= steps_drawn < GRID_STEPS
    assert f"Stopped by a signal at step {STEPS_PER_EPOCH}" in log and "during the end of epoch 0" in log
    assert not (out / "samples" / "0000.png").exists()  # no grid from the interrupted draw
    assert not list(ckpts.glob(".*partial*")) and not list(out.glob(".*partial*"))
    checkpoint = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == STEPS_PER_EPOCH

    # Resumed (with a short grid): epoch 0's grid and model save are skipped with one warning; epoch 1 trains
    # every batch once and writes its grid and model.
    with pytest.warns(UserWarning, match="stopped by a signal during the end of epoch 0 .*not redone") as caught:
        main([*args, "--grid.num_inference_steps", "2", "--ckpt_path", "last"])
    assert sum("stopped by a signal" in str(w.message) for w in caught) == 1
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 2 * STEPS_PER_EPOCH
    assert sorted(e.step for e in tb_events(out / "logs", "train/loss")) == list(range(2 * STEPS_PER_EPOCH))
    assert not (out / "samples" / "0000.png").exists() and (out / "samples" / "0001.png").is_file()
    DDPMPipeline.from_pretrained(out)  # epoch 1's model save


@pytest.mark.slow
def test_a_repeated_stop_signal_is_the_same_request_the_run_exits_0_with_its_checkpoint(image_folder, tmp_path):
    """After the first SIGTERM, one every 50 ms (one of them 0.3 s after it) until the process has exited: through
    the save, Lightning's teardown (which puts SIGTERM's default back) and the interpreter's exit."""
    ckpts = tmp_path / "checkpoints" / "run"
    proc, sent, step_seconds, lines = start_and_signal_in_the_grid(
        grid_run_args(image_folder, tmp_path / "run"), tmp_path
    )
    repeats = 0
    while proc.poll() is None and time.monotonic() - sent < 120:
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        repeats += 1
    log = "".join(lines) + proc.communicate(timeout=60)[0]
    assert repeats >= 1 and proc.returncode == 0, f"exit {proc.returncode} after {repeats} repeats\n{log[-3000:]}"
    assert f"Stopped by a signal at step {STEPS_PER_EPOCH}" in log
    checkpoint = torch.load(ckpts / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == STEPS_PER_EPOCH


@pytest.mark.slow
def test_a_stop_signal_during_a_quality_measurement_ends_its_sampling_and_the_resume_names_the_skipped_metrics(
    image_folder, tmp_path
):
    """FID/KID at the end of epoch 0 (its validation), drawn with the ddpm sampler's GRID_STEPS steps."""
    args = fit_args(
        image_folder,
        tmp_path / "run",
        "--trainer.max_epochs",
        "1",
        "--data.val_fraction",
        "0.25",
        "--quality.measure_quality_epochs",
        "1",
        "--quality.feature",
        "conftest.TinyFeatures",
        "--quality.num_samples",
        "16",
        "--quality.sampler",
        "ddpm",
        "--quality.num_inference_steps",
        str(GRID_STEPS),
        "--model.val_timesteps",
        "2",
    )
    # the validation loss first: 2 timesteps of the one validation batch (3 images), then the FID/KID draw
    proc, sent, step_seconds, lines = start_and_signal_in_the_grid(args, tmp_path, before=2)
    rest = (GRID_STEPS - SIGNAL_AT) * step_seconds
    try:
        log = "".join(lines) + proc.communicate(timeout=rest / 2)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {rest / 2:.0f} s after SIGTERM: the quality measurement was not interrupted")
    assert proc.returncode == 0, log[-3000:]
    assert "during epoch 0's validation" in log
    with pytest.warns(UserWarning, match="stopped by a signal during epoch 0's validation"):
        main([*args, "--ckpt_path", "last"])


@pytest.mark.slow
def test_a_ctrl_c_is_logged_as_a_ctrl_c(twelve, tmp_path, caplog):
    import signal

    caplog.set_level("INFO")
    lightning_log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")
    lightning_log.addHandler(caplog.handler)  # (Lightning's loggers need not reach the root)
    stop = ["--trainer.callbacks+=conftest.SignalAtBatch", "--trainer.callbacks.batch", "2"]
    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN in a shell's background job
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(twelve, tmp_path / "run", *max_steps(6), *stop, "--trainer.callbacks.signum", "2"))
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert exit_info.value.code == 130
    assert "Ctrl-C: saving a checkpoint" in caplog.text and "Stopped by a signal at step 2" in caplog.text
    assert "SIGTERM" not in caplog.text
    assert signal.getsignal(signal.SIGINT) is before  # the run's handler is gone again
