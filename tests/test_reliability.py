"""Interruptions and bad resumes: SIGTERM / SIGUSR1 save and exit, atomic checkpoints, clear resume errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from ddpm_lightning.checkpointing import AtomicCheckpointIO
from ddpm_lightning.cli import main

from conftest import EMA_AT_A_HIGH_LR, NO_SAVES, child_env, fit_args, max_steps, scalars, tb_events


def last_step(folder: Path) -> int:
    return torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")["global_step"]


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


class SlowSteps(Callback):
    """A second per step, asleep: a signal sent during a step arrives before its end."""

    def on_train_batch_start(self, *args) -> None:
        time.sleep(1.0)


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(image_folder, tmp_path):
    ckpts = tmp_path / "checkpoints" / "run"
    args = fit_args(
        image_folder,
        tmp_path / "run",
        *max_steps(90),
        "--checkpoint.every_n_train_steps",
        "1",
        "--trainer.callbacks+=test_reliability.SlowSteps",
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


@pytest.mark.slow
def test_resume_last_without_checkpoint_fails_with_the_fix(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no last.ckpt in .*leave --ckpt_path out and pass --overwrite true"):
        main(fit_args(image_folder, tmp_path / "run", "--ckpt_path", "last"))
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_named(image_folder, tmp_path):
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1"))
    good = (tmp_path / "checkpoints" / "run" / "last.ckpt").read_bytes()
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


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(image_folder, tmp_path, cache):
    """8 steps straight vs. stopped at step 4 (in the middle of epoch 1: 3 steps an epoch) and resumed."""
    common = [
        *max_steps(8),
        "--data.cache",
        cache,
        *NO_SAVES,
    ]
    if cache == "none":
        common += ["--data.num_workers", "2"]  # worker processes, their seeds and prefetching too
    main(fit_args(image_folder, tmp_path / "straight", *common))

    resumed = fit_args(image_folder, tmp_path / "resumed", *common, "--checkpoint.dirpath", "resumed_ckpt")
    with pytest.raises(SystemExit) as stopped:  # a real SIGTERM, handled by Lightning and PreemptionCheckpoint
        main([*resumed, "--trainer.callbacks+=conftest.SignalAtBatch", "--trainer.callbacks.batch", "4"])
    assert stopped.value.code in (0, None)
    assert last_step(tmp_path / "resumed_ckpt") == 4
    main([*resumed, "--ckpt_path", "last"])

    a = weights(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    b = weights(tmp_path / "resumed_ckpt" / "last.ckpt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    losses_a = scalars(tmp_path / "straight" / "logs", "train/loss")
    losses_b = scalars(tmp_path / "resumed" / "logs", "train/loss")
    assert sorted(losses_a) == sorted(losses_b) == list(range(8))
    assert [losses_b[k] for k in range(8)] == pytest.approx([losses_a[k] for k in range(8)], rel=1e-5)


@pytest.mark.slow
def test_unknown_keys_are_named_by_the_cli(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(image_folder, tmp_path / "run", "--model.learnin_rate", "0.1"))
    assert "unrecognized arguments: --model.learnin_rate" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  learnin_rate: 0.1\n")
    with pytest.raises(SystemExit):
        main([*fit_args(image_folder, tmp_path / "run"), "-c", str(typo)])
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage text, no traceback
    assert last_line == "error: Subcommand 'fit' does not accept option 'model.learnin_rate'"


@pytest.mark.slow
def test_unwritable_output_dir_fails_before_training(image_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeError, match="Cannot start training: .*a_file"):
        main(fit_args(image_folder, blocker / "run"))
    assert not (tmp_path / "checkpoints" / "run" / "last.ckpt").exists()


@pytest.mark.slow
def test_grid_that_eval_batch_cannot_fill_is_refused(image_folder, tmp_path):
    with pytest.raises(ValueError, match="eval_batch_size=10 images do not fill a grid of 4 rows"):
        main(fit_args(image_folder, tmp_path / "run", "--grid.eval_batch_size", "10", "--grid.grid_rows", "4"))


@pytest.mark.slow
def test_fp16_overflow_skips_the_update_and_the_schedule_and_ema_count_it_as_documented(image_folder):
    """docs/long-runs.md, "Numerics": a step whose fp16 gradients overflow leaves the weights unchanged and
    halves the loss scale; it still counts as an optimizer step for global_step, the LR schedule and EMA."""
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.plugins import MixedPrecision

    from ddpm_lightning.data import ImageDataModule

    from conftest import tiny_module

    model = tiny_module(use_ema=True, lr_warmup_steps=2)
    model.on_after_backward = lambda: (  # overflow in the backward pass of step 2
        next(model.unet.parameters()).grad.fill_(float("inf")) if model.trainer.global_step == 2 else None
    )
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = next(pl_module.unet.parameters()).detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            unchanged = torch.equal(next(pl_module.unet.parameters()), self.before)
            seen.append(
                (
                    trainer.global_step,
                    trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                    unchanged,
                    trainer.precision_plugin.scaler.get_scale(),
                )
            )

    trainer = Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        callbacks=[Record()],
    )
    trainer.fit(model, ImageDataModule(str(image_folder), image_size=16, train_batch_size=2, num_workers=0))
    step, schedule, unchanged, scale = zip(*seen)
    assert step == schedule == (1, 2, 3, 4)  # the schedule advanced on the skipped step too
    assert unchanged[2] and not unchanged[3]  # step 2 skipped (step 0 has lr 0: warm-up), step 3 updates
    assert scale[2] == scale[1] / 2
    assert model.ema.optimization_step == 4  # EMA counted it: it averaged in the unchanged weights


FP16_ON_CPU = """
trainer:
  precision: null
  plugins:
    - class_path: lightning.pytorch.plugins.MixedPrecision
      init_args: {precision: 16-mixed, device: cpu}
    - ddpm_lightning.checkpointing.AtomicCheckpointIO
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop_after_batch", [5, 3, 4])
def test_signal_and_resume_equal_the_straight_run_with_ema_accumulation_and_fp16(
    image_folder, tmp_path, stop_after_batch
):
    """EMA on, accumulate 2, fp16 with a loss scaler (on CPU), 3 micro-batches an epoch: 6 optimizer steps
    straight, or a real SIGTERM after micro-batch 5 (epoch 1's first optimizer step), 3 (the end of epoch 0) or 4
    (inside an accumulation window: it stops after the window's optimizer step), then resumed. The weights, the
    EMA weights, the loss scaler's state and every logged loss are the same."""
    plugins = tmp_path / "fp16.yaml"
    plugins.write_text(FP16_ON_CPU)
    common = [
        "-c",
        str(plugins),
        *max_steps(6),
        "--trainer.accumulate_grad_batches",
        "2",
        *EMA_AT_A_HIGH_LR,
        *NO_SAVES,
    ]
    main(fit_args(image_folder, tmp_path / "straight", *common, "--checkpoint.dirpath", "straight_ckpt"))
    resumed = fit_args(image_folder, tmp_path / "resumed", *common, "--checkpoint.dirpath", "resumed_ckpt")
    with pytest.raises(SystemExit):
        main(
            [
                *resumed,
                "--trainer.callbacks+=conftest.SignalAtBatch",
                "--trainer.callbacks.batch",
                str(stop_after_batch),
            ]
        )
    assert last_step(tmp_path / "resumed_ckpt") == {3: 2, 4: 3, 5: 3}[stop_after_batch]  # stopped early
    main([*resumed, "--ckpt_path", "last"])

    a = torch.load(tmp_path / "straight_ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(tmp_path / "resumed_ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == 6
    for name in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][name], a["state_dict"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    scaler = "FusedClipMixedPrecision"  # the precision plugin the CLI installs keeps the GradScaler's state
    assert b[scaler] == a[scaler] and a[scaler]["_growth_tracker"] == 6  # the scaler
    losses_a = scalars(tmp_path / "straight" / "logs", "train/loss")
    losses_b = scalars(tmp_path / "resumed" / "logs", "train/loss")
    assert sorted(losses_a) == sorted(losses_b) == list(range(6))
    assert [losses_b[k] for k in range(6)] == pytest.approx([losses_a[k] for k in range(6)], rel=1e-5)
