"""A resumed run equals the run that never stopped: after a crash, a real SIGTERM (with EMA, accumulation and fp16),
or the end of a shorter run; `--ckpt_path last` continues its own run to the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import main

from conftest import (
    EMA_AT_A_HIGH_LR,
    NO_SAVES,
    assert_same_weights,
    crash_args,
    fit_args,
    last_step,
    max_steps,
    scalars,
    step_and_weights,
    tb_events,
    write_image,
)


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
def test_each_run_has_its_own_last_checkpoint(twelve, tmp_path):
    """Two runs from one folder (two output_dirs), then the first resumed: `--ckpt_path last` continues the first
    run (its own output_dir's checkpoints), not the second, more recent one."""
    main(fit_args(twelve, tmp_path / "out", *NO_SAVES, "--trainer.max_epochs", "2"))
    main(fit_args(twelve, tmp_path / "out2", *NO_SAVES, "--trainer.max_epochs", "1", "--model.learning_rate", "5e-4"))
    assert (tmp_path / "checkpoints" / "out" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "out2" / "last.ckpt").is_file()
    main(fit_args(twelve, tmp_path / "out", *NO_SAVES, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    # Run 1 stopped at step 6: the resumed run logs steps 6-8 after them, none twice (run 2's would restart at 3).
    assert [e.step for e in tb_events(tmp_path / "out" / "logs", "train/loss")] == list(range(9))
    assert step_and_weights(tmp_path / "checkpoints" / "out" / "last.ckpt")[0] == 9
    assert step_and_weights(tmp_path / "checkpoints" / "out2" / "last.ckpt")[0] == 3


TWO_EPOCHS = ["--trainer.max_epochs", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "length, cadence, crash_at, saved_at",
    [
        (
            TWO_EPOCHS,
            ["--checkpoint.every_n_epochs", "1"],
            4,
            3,
        ),  # the checkpoint an epoch's end leaves (a crash early in the next epoch)
        (TWO_EPOCHS, ["--checkpoint.every_n_train_steps", "3"], 5, 3),  # a step cadence landing on an epoch's last step
        (TWO_EPOCHS, ["--checkpoint.every_n_train_steps", "2"], 3, 2),  # a step cadence in the middle of an epoch
        # The same by max_steps (max_epochs -1): Lightning then applies its own loader position on resume, the end of
        # the epoch whose last step was saved, which must not empty the next epoch.
        (max_steps(6), ["--checkpoint.every_n_train_steps", "3"], 5, 3),
    ],
    ids=["epochs_every_epoch", "epochs_every_3_steps", "epochs_every_2_steps", "max_steps_every_3_steps"],
)
def test_resume_after_a_crash_equals_the_straight_run(
    straight_run, twelve, tmp_path, length, cadence, crash_at, saved_at
):
    """A crash (an exception at step `crash_at`) leaves the cadence's last checkpoint; `--ckpt_path last` from it
    ends with the very weights of the run that never crashed (max_epochs runs, as the configs are, and max_steps)."""
    crashing = fit_args(twelve, tmp_path / "crashed", *NO_SAVES, *length, *cadence)
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(crash_at)])
    assert step_and_weights(tmp_path / "checkpoints" / "crashed" / "last.ckpt")[0] == saved_at
    main([*crashing, "--ckpt_path", "last"])
    step, weights = step_and_weights(tmp_path / "checkpoints" / "crashed" / "last.ckpt")
    assert step == 6
    assert_same_weights(straight_run, weights)


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


@pytest.mark.slow
def test_run_ended_then_extended_equals_the_longer_run_while_the_lr_is_the_same(twelve, tmp_path):
    """A run of `max_epochs 1`, then resumed with `max_epochs 2`. With a warm-up longer than the run the
    LR does not depend on the schedule's length, so the weights must match the straight 2-epoch run exactly."""
    common = [*NO_SAVES, "--model.lr_warmup_steps", "100"]
    main(fit_args(twelve, tmp_path / "straight", *common, "--trainer.max_epochs", "2"))
    main(fit_args(twelve, tmp_path / "extended", *common, "--trainer.max_epochs", "1"))
    main(fit_args(twelve, tmp_path / "extended", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    step_a, a = step_and_weights(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    step_b, b = step_and_weights(tmp_path / "checkpoints" / "extended" / "last.ckpt")
    assert step_a == step_b == 6
    assert_same_weights(a, b)


@pytest.fixture
def sixty_four(tmp_path) -> Path:
    """64 images: 16 steps an epoch at batch 4."""
    for i in range(64):
        write_image(tmp_path / "sixty_four" / f"{i}.png", seed=i)
    return tmp_path / "sixty_four"


def run_record(out: Path, checkpoints: Path) -> dict:
    """What a run leaves to compare: every step's loss and epoch, its grids' names, its checkpoints' names, and its
    last checkpoint's loop state and weights."""
    last = torch.load(checkpoints / "last.ckpt", weights_only=False, map_location="cpu")
    return {
        "losses": scalars(out / "logs", "train/loss"),
        "epochs": scalars(out / "logs", "epoch"),
        "grids": sorted(p.name for p in (out / "samples").glob("[0-9]*.png")),
        "checkpoints": sorted(p.name for p in checkpoints.glob("epoch=*.ckpt")),
        "loops": last["loops"],
        "weights": last["state_dict"],
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "longer, cadence, held_out",
    [
        (max_steps(20), [], []),  # the default cadence: the run's end is its only checkpoint
        (["--trainer.max_steps", "-1", "--trainer.max_epochs", "2"], ["--checkpoint.every_n_epochs", "1"], []),
        # held-out images: the short run is validated at its last step too (a run's end is always measured), which
        # the straight run is not; training goes on as if it had not been
        (max_steps(20), [], ["--data.val_fraction", "0.25", "--quality.num_samples", "0"]),
    ],
    ids=["to_max_steps_20", "to_max_epochs_2_saving_every_epoch", "to_max_steps_20_validated"],
)
def test_a_run_ended_by_max_steps_inside_an_epoch_then_extended_equals_the_longer_run(
    sixty_four, tmp_path, longer, cadence, held_out
):
    """3 steps of a 16-step epoch, then extended past the epoch's end (to step 20, or to 2 epochs: 32 steps): every
    step's loss and epoch bit for bit, the same grids and checkpoint names, and the same final state as the run that
    went there straight. The short run's end checkpoint is saved as the middle of epoch 0, and named so."""
    common = [*NO_SAVES, "--grid.save_image_epochs", "1", *cadence, "--checkpoint.save_top_k", "-1"]  # (keep all)
    common += ["--model.lr_warmup_steps", "100", *held_out]  # a step's LR does not depend on the run's length
    main(fit_args(sixty_four, tmp_path / "straight", *common, *longer))
    main(fit_args(sixty_four, tmp_path / "extended", *common, *max_steps(3)))
    short = sorted(p.name for p in (tmp_path / "checkpoints" / "extended").glob("epoch=*.ckpt"))
    assert short == ["epoch=0-step=3.ckpt"]
    saved = torch.load(tmp_path / "checkpoints" / "extended" / short[0], weights_only=False, map_location="cpu")
    assert saved["epoch"] == 0 and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    main(fit_args(sixty_four, tmp_path / "extended", *common, *longer, "--ckpt_path", "last"))

    straight = run_record(tmp_path / "straight", tmp_path / "checkpoints" / "straight")
    extended = run_record(tmp_path / "extended", tmp_path / "checkpoints" / "extended")
    steps = 20 if "20" in longer else 32
    assert sorted(straight["losses"]) == sorted(extended["losses"]) == list(range(steps))
    assert extended["losses"] == straight["losses"]  # bit for bit (TensorBoard keeps the float32 loss)
    assert extended["epochs"] == straight["epochs"]
    assert extended["grids"] == straight["grids"] == [f"{e:04d}.png" for e in range(2)]
    assert extended["checkpoints"] == sorted([*straight["checkpoints"], "epoch=0-step=3.ckpt"])
    assert f"epoch=1-step={steps}.ckpt" in straight["checkpoints"]
    if held_out:  # one validation more (at step 3): the training loops' state alike
        fit_loop = ("epoch_progress", "epoch_loop.batch_progress", "epoch_loop.automatic_optimization.optim_progress")
        assert [extended["loops"]["fit_loop"][k] for k in fit_loop] == [
            straight["loops"]["fit_loop"][k] for k in fit_loop
        ]
    else:
        assert extended["loops"] == straight["loops"]
    assert_same_weights(straight["weights"], extended["weights"])
