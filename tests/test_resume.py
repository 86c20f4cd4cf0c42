"""Resuming exactly from every checkpoint the product writes, and runs that cannot take each other's place."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import main

from conftest import NO_SAVES, crash_args, fit_args, scalars, tb_events, write_image


def state(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    return checkpoint["global_step"], checkpoint["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The run that never crashes: 12 images, 3 steps an epoch, 2 epochs (its checkpoint cadence is irrelevant)."""
    tmp = tmp_path_factory.mktemp("straight")
    for i in range(12):
        write_image(tmp / "twelve" / f"{i}.png", seed=i)
    with pytest.MonkeyPatch.context() as env:
        env.chdir(tmp)
        env.setenv("HF_HUB_OFFLINE", "1")
        main(fit_args(tmp / "twelve", tmp / "straight", *NO_SAVES, "--trainer.max_epochs", "2"))
    step, weights = state(tmp / "checkpoints" / "straight" / "last.ckpt")
    assert step == 6
    return weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "cadence, crash_at, saved_at",
    [
        (["--checkpoint.every_n_epochs", "1"], 4, 3),  # the checkpoint an epoch's end leaves (the crash case)
        (["--checkpoint.every_n_train_steps", "3"], 5, 3),  # a step cadence landing on an epoch's last step
        (["--checkpoint.every_n_train_steps", "2"], 3, 2),  # a step cadence in the middle of an epoch
    ],
)
def test_resume_after_a_crash_equals_the_straight_run(straight_run, twelve, tmp_path, cadence, crash_at, saved_at):
    """A crash (an exception at step `crash_at`) leaves the cadence's last checkpoint; `--ckpt_path last` from it
    ends with the very weights of the run that never crashed (max_epochs runs, as the configs are)."""
    crashing = fit_args(twelve, tmp_path / "crashed", *NO_SAVES, "--trainer.max_epochs", "2", *cadence)
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(crash_at)])
    assert state(tmp_path / "checkpoints" / "crashed" / "last.ckpt")[0] == saved_at
    main([*crashing, "--ckpt_path", "last"])
    step, weights = state(tmp_path / "checkpoints" / "crashed" / "last.ckpt")
    assert step == 6
    assert_same_weights(straight_run, weights)


@pytest.mark.slow
def test_a_checkpoint_in_the_middle_of_an_epoch_holds_that_steps_ema_and_resumes_to_the_straight_runs(twelve, tmp_path):
    """A step cadence saves at the end of a training batch: the weight average of that very step is in it (not
    the step before's), so `--ckpt_path last` ends with the straight run's average."""
    ema = ["--model.use_ema", "true", "--model.ema_max_decay", "0.9", "--trainer.max_epochs", "2"]
    main(fit_args(twelve, tmp_path / "straight", *NO_SAVES, *ema))
    crashing = fit_args(twelve, tmp_path / "crashed", *NO_SAVES, *ema, "--checkpoint.every_n_train_steps", "2")
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(3)])
    saved = torch.load(tmp_path / "checkpoints" / "crashed" / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["global_step"] == saved["ema"]["optimization_step"] == 2
    main([*crashing, "--ckpt_path", "last"])
    a, b = (
        torch.load(tmp_path / "checkpoints" / run / "last.ckpt", weights_only=False) for run in ("straight", "crashed")
    )
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_with_the_compiled_optimizer_step_equals_the_straight_run(twelve, tmp_path):
    """`model.compile_optimizer` keeps its LR in a tensor on the device and saves plain
    AdamW's state: crashed at step 4 and resumed from the epoch-end checkpoint, the run ends with the weights of
    the compiled run that never crashed."""
    compiled = [
        *NO_SAVES,
        "--trainer.max_epochs",
        "2",
        "--model.compile_optimizer",
        "true",
        "--trainer.gradient_clip_val",
        "0.1",
        "--checkpoint.every_n_epochs",
        "1",
    ]
    torch._dynamo.reset()
    main(fit_args(twelve, tmp_path / "straight", *compiled))
    crashing = fit_args(twelve, tmp_path / "crashed", *compiled)
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(4)])
    assert state(tmp_path / "checkpoints" / "crashed" / "last.ckpt")[0] == 3
    main([*crashing, "--ckpt_path", "last"])
    step_a, a = state(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    step_b, b = state(tmp_path / "checkpoints" / "crashed" / "last.ckpt")
    assert step_a == step_b == 6
    assert_same_weights(a, b)


@pytest.mark.slow
def test_a_checkpoint_with_the_rng_states_at_the_top_level_resumes_exactly(straight_run, twelve, tmp_path):
    """Checkpoints written before `RNGStates` (ddpm-lightning 0.1.0) hold the RNG states at the top level."""
    crashing = fit_args(
        twelve, tmp_path / "old", *NO_SAVES, "--trainer.max_epochs", "2", "--checkpoint.every_n_epochs", "1"
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(4)])
    path = (tmp_path / "checkpoints" / "old" / "last.ckpt").resolve()
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    checkpoint["rng_states"] = checkpoint["callbacks"].pop("RNGStates")  # the old layout
    torch.save(checkpoint, path)
    main([*crashing, "--ckpt_path", "last"])
    step, weights = state(tmp_path / "checkpoints" / "old" / "last.ckpt")
    assert step == 6
    assert_same_weights(straight_run, weights)


@pytest.mark.slow
def test_run_ended_then_extended_equals_the_longer_run_while_the_lr_is_the_same(twelve, tmp_path):
    """The issue's run B: `max_epochs 1`, then resumed with `max_epochs 2`. With a warm-up longer than the run the
    LR does not depend on the schedule's length, so the weights must match the straight 2-epoch run exactly."""
    common = [*NO_SAVES, "--model.lr_warmup_steps", "100"]
    main(fit_args(twelve, tmp_path / "straight", *common, "--trainer.max_epochs", "2"))
    main(fit_args(twelve, tmp_path / "extended", *common, "--trainer.max_epochs", "1"))
    main(fit_args(twelve, tmp_path / "extended", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    step_a, a = state(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    step_b, b = state(tmp_path / "checkpoints" / "extended" / "last.ckpt")
    assert step_a == step_b == 6
    assert_same_weights(a, b)


@pytest.mark.slow
def test_raising_max_epochs_on_resume_stretches_the_schedule_and_the_lr_jumps(twelve, tmp_path):
    """docs/long-runs.md, "Raising `max_epochs` on resume": the cosine's length becomes the new run's, so at the resumed step the LR jumps up."""
    common = [*NO_SAVES, "--model.lr_warmup_steps", "1", "--model.learning_rate", "0.002"]
    main(fit_args(twelve, tmp_path / "run", *common, "--trainer.max_epochs", "1"))
    main(fit_args(twelve, tmp_path / "run", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    lr = scalars(tmp_path / "run" / "logs", "train/lr")
    cosine = lambda k, total: 0.002 * 0.5 * (1 + math.cos(math.pi * (k - 1) / (total - 1)))  # noqa: E731
    assert lr[2] == pytest.approx(cosine(2, 3), rel=1e-5)  # the first run's schedule: 3 steps
    assert lr[3] == pytest.approx(cosine(3, 3), abs=1e-9)  # the first resumed step: the rate the old one reached
    assert lr[4] == pytest.approx(cosine(4, 6), rel=1e-5)  # then the resumed run's, stretched to 6 steps
    assert lr[5] == pytest.approx(cosine(5, 6), rel=1e-5)
    assert lr[4] > lr[3]  # the jump


@pytest.mark.slow
def test_each_run_has_its_own_last_checkpoint(twelve, tmp_path):
    """The issue's three runs in one folder: the third resumes run 1 (its own output_dir), not run 2."""
    main(fit_args(twelve, tmp_path / "out", *NO_SAVES, "--trainer.max_epochs", "2"))
    main(fit_args(twelve, tmp_path / "out2", *NO_SAVES, "--trainer.max_epochs", "1", "--model.learning_rate", "5e-4"))
    assert (tmp_path / "checkpoints" / "out" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "out2" / "last.ckpt").is_file()
    main(fit_args(twelve, tmp_path / "out", *NO_SAVES, "--trainer.max_epochs", "3", "--ckpt_path", "last"))
    # Run 1 stopped at step 6: the resumed run logs steps 6-8 after them, none twice (run 2's would restart at 3).
    assert [e.step for e in tb_events(tmp_path / "out" / "logs", "train/loss")] == list(range(9))
    assert state(tmp_path / "checkpoints" / "out" / "last.ckpt")[0] == 9
    assert state(tmp_path / "checkpoints" / "out2" / "last.ckpt")[0] == 3


@pytest.mark.slow
def test_default_checkpointing_is_one_file_linked_as_last(twelve, tmp_path):
    """No cadence reached in a short run: one checkpoint, at the end, and last.ckpt a link to it."""
    main(fit_args(twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "2"))
    folder = tmp_path / "checkpoints" / "run"
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[1] == "last.ckpt" and files[0].startswith("epoch="), files
    assert os.readlink(folder / "last.ckpt") == files[0]
    assert state(folder / "last.ckpt")[0] == 6


@pytest.mark.slow
def test_step_cadence_keeps_one_file_and_moves_the_link(twelve, tmp_path):
    main(
        fit_args(
            twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "2"
        )
    )
    folder = tmp_path / "checkpoints" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=1-step=6.ckpt", "last.ckpt"]  # one file kept
    assert os.readlink(folder / "last.ckpt") == "epoch=1-step=6.ckpt"
    main(
        fit_args(
            twelve,
            tmp_path / "all",
            *NO_SAVES,
            "--trainer.max_epochs",
            "2",
            "--checkpoint.every_n_train_steps",
            "2",
            "--checkpoint.save_top_k",
            "-1",
        )
    )
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "all").glob("epoch*.ckpt"))
    assert kept == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "epoch=1-step=6.ckpt"]


@pytest.mark.slow
def test_fresh_run_into_a_used_output_dir_is_refused_and_overwrite_starts_it_again(twelve, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_epochs", "1"))
    with pytest.raises(FileExistsError, match=r"already holds a run .*--output_dir.*--overwrite true"):
        main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_epochs", "1"))
    main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_epochs", "1", "--overwrite", "true"))
    assert [e.step for e in tb_events(out / "logs", "train/loss")] == [0, 1, 2]  # one run's curve, not two merged
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_fresh_run_never_replaces_the_users_readme(twelve, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match="README.md"):
        main(fit_args(twelve, out, "--trainer.max_epochs", "1"))
    assert (out / "README.md").read_text() == "my notes"


# The model's hyperparameters as ddpm-lightning 0.1.0 wrote them (before EMA, the NaN check and the speed
# switches moved out of DDPMModule): LightningCLI parses a checkpoint's hyperparameters back into the model's
# arguments on resume, so each must still be one.
OLD_HPARAMS = {
    "unet", "image_size", "learning_rate", "lr_warmup_steps", "adam_betas", "adam_weight_decay", "adam_epsilon",
    "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "use_ema", "ema_max_decay",
    "ema_inv_gamma", "ema_power", "val_timesteps", "stop_on_nan", "nan_check_every_n_steps", "compile",
    "compile_mode", "channels_last", "fused_adamw", "compile_optimizer", "gradient_checkpointing",
    "float32_matmul_precision",
}  # fmt: skip
OLD_EMA_KEYS = {"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"}


@pytest.mark.slow
def test_a_checkpoint_in_the_layout_before_the_module_split_resumes_exactly_with_its_ema(twelve, tmp_path):
    """Checkpoints keep 0.1.0's layout: the EMA at checkpoint["ema"] (EMAModel's state), every 0.1.0
    hyperparameter and no state of the callbacks the module now adds; one in that layout (the arguments added
    since removed) resumes to the straight run's weights and EMA."""
    ema = ["--model.use_ema", "true", "--model.ema_max_decay", "0.9"]
    main(fit_args(twelve, tmp_path / "straight", *NO_SAVES, *ema, "--trainer.max_epochs", "2"))
    crashing = fit_args(
        twelve, tmp_path / "old", *NO_SAVES, *ema, "--trainer.max_epochs", "2", "--checkpoint.every_n_epochs", "1"
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(4)])
    path = (tmp_path / "checkpoints" / "old" / "last.ckpt").resolve()
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    hparams = checkpoint["hyper_parameters"]
    added = set(hparams) - OLD_HPARAMS - {"_instantiator", "_class_path"}
    assert OLD_HPARAMS <= set(hparams)
    for key in added:  # arguments added since 0.1.0 (fine-tuning, start-up switches): absent from its checkpoints
        del hparams[key]
    assert OLD_EMA_KEYS | {"shadow_params"} <= set(checkpoint["ema"])
    assert checkpoint["ema"]["optimization_step"] == 3
    assert not any(k.startswith(("StopOnNaN", "EMAWeights", "UpdateEMA")) for k in checkpoint["callbacks"])
    torch.save(checkpoint, path)
    main([*crashing, "--ckpt_path", "last"])
    a = torch.load(tmp_path / "checkpoints" / "straight" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(tmp_path / "checkpoints" / "old" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_weights(a["state_dict"], b["state_dict"])
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_says_what_changes(twelve, tmp_path):
    """A checkpoint records the run's world size, global batch and steps per epoch; saved by 2 DDP processes (12
    cached images, batch 4: 2 steps an epoch) and resumed on 1, the warning names each change."""
    import subprocess

    from conftest import child_env, ddp_fit_command

    common = [*NO_SAVES, "--trainer.max_epochs", "2"]
    stop = ["--trainer.callbacks+=conftest.StopAtStep", "--trainer.callbacks.step", "1"]
    cmd = [*ddp_fit_command(twelve, tmp_path / "run", *common), *stop]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    saved = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert saved["data_layout"] == {"world_size": 2, "global_batch": 8, "steps_per_epoch": 2}
    with pytest.warns(UserWarning) as warned:
        main([*fit_args(twelve, tmp_path / "run", *common), "--ckpt_path", "last"])
    messages = [str(w.message) for w in warned if "Resuming on" in str(w.message)]
    assert messages == [
        "Resuming on 1 processes (devices x nodes) a run saved on 2: the global batch is 4 images instead of 8, an "
        "epoch is 3 optimizer steps instead of 2, and the images now come in another order than in the uninterrupted "
        "run (prepared shards: the epoch underway goes on with its remaining images, each once; other data: that "
        "epoch is drawn again from the new split, so some images may come twice in it and others not at all), so the "
        "result will not equal that run's. To continue exactly, resume on the checkpoint's number of processes."
    ]
    assert state(tmp_path / "checkpoints" / "run" / "last.ckpt")[0] > 1  # and training went on
