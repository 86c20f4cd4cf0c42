"""What a resume checks and restores (checkpointing/resume.py): a `--ckpt_path` that is missing, broken or corrupt
fails before training naming the file; other data is refused or named; checkpoints in 0.1.0's layout resume
exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import build, main
from ddpm_lightning.module import DDPMModule

from conftest import (
    NO_SAVES,
    assert_same_weights,
    child_env,
    crash_args,
    ddp_fit_command,
    fit_args,
    max_steps,
    step_and_weights,
    step_of,
    write_image,
)


@pytest.mark.slow
def test_resume_last_without_checkpoint_fails_with_the_fix(image_folder, tmp_path):
    fix = "Leave --ckpt_path out to start it again from step 0"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in .*{fix}"):
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


def break_dangling(folder: Path) -> Path:
    target = folder / os.readlink(folder / "last.ckpt")
    target.unlink()
    return folder / "last.ckpt"


def break_truncated(folder: Path) -> Path:
    target = folder / os.readlink(folder / "last.ckpt")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def break_emptied(folder: Path) -> Path:
    for path in folder.iterdir():
        path.unlink()
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("damage", [break_dangling, break_truncated, break_emptied])
def test_resume_from_a_broken_last_fails_before_training_naming_the_file_and_the_fresh_start(twelve, tmp_path, damage):
    import shutil

    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, *max_steps(3))
    main(args)
    folder = tmp_path / "broken"
    shutil.copytree(tmp_path / "checkpoints" / "run", folder, symlinks=True)
    named = damage(folder)
    logs = sorted((tmp_path / "run" / "logs").iterdir())
    with pytest.raises((FileNotFoundError, ValueError), match=f"{named}.*--ckpt_path out and pass --overwrite true"):
        main([*args[:-1], "6", "--ckpt_path", "last", "--checkpoint.dirpath", str(folder)])
    assert sorted((tmp_path / "run" / "logs").iterdir()) == logs  # nothing trained: no new event file


@pytest.mark.slow
def test_a_resume_at_another_image_size_is_refused_and_other_data_changes_are_named(twelve, tmp_path):
    args = fit_args(twelve, tmp_path / "run", *NO_SAVES, "--trainer.max_epochs", "-1")
    main([*args, "--trainer.max_steps", "2"])
    with pytest.raises(ValueError, match="trained at data.image_size 16, not 32"):
        main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.image_size", "32"])
    for i in range(12, 16):  # images added to the folder, and another batch size
        write_image(twelve / f"{i}.png", seed=i)
    with pytest.warns(UserWarning, match=r"train_batch_size 4 -> 2; 12 -> 16 training images\): .*another order"):
        main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.train_batch_size", "2"])
    assert step_of(tmp_path / "checkpoints" / "run" / "last.ckpt") == 4


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
    step, weights = step_and_weights(tmp_path / "checkpoints" / "old" / "last.ckpt")
    assert step == 6
    assert_same_weights(straight_run, weights)


# The model's hyperparameters as ddpm-lightning 0.1.0 wrote them (before EMA, the NaN check and the speed
# switches moved out of DDPMModule): LightningCLI parses a checkpoint's hyperparameters back into the model's
# arguments on resume, so each must still be one, or (the speed switches, now the `speed` group) an old key the
# parser still reads.
OLD_HPARAMS = {
    "unet", "image_size", "learning_rate", "lr_warmup_steps", "adam_betas", "adam_weight_decay", "adam_epsilon",
    "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "use_ema", "ema_max_decay",
    "ema_inv_gamma", "ema_power", "val_timesteps", "stop_on_nan", "nan_check_every_n_steps", "compile",
    "compile_mode", "channels_last", "fused_adamw", "compile_optimizer", "gradient_checkpointing",
    "float32_matmul_precision",
}  # fmt: skip


# The speed switches among them, with the values the runs below use (the defaults): 0.1.0 saved every argument.
OLD_SPEED_HPARAMS = {
    "compile": False, "compile_mode": "default", "channels_last": False, "fused_adamw": None,
    "compile_optimizer": False, "gradient_checkpointing": False, "float32_matmul_precision": "high",
}  # fmt: skip


OLD_EMA_KEYS = {"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"}


@pytest.mark.slow
def test_a_checkpoint_in_the_0_1_0_layout_resumes_exactly_with_its_ema(twelve, tmp_path, recwarn):
    """Checkpoints keep 0.1.0's layout: the EMA at checkpoint["ema"] (EMAModel's state), every 0.1.0
    hyperparameter but the speed switches (the `speed` group's now, which no checkpoint holds) and no state of the
    callbacks the module now adds. One in 0.1.0's layout (the arguments added since removed, the speed switches
    put back among the model's hyperparameters, as 0.1.0 wrote them) resumes to the straight run's weights and EMA
    without a word about the old keys (the user did not write them), starts a fine-tuning as --model.pretrained
    from its EMA weights, and loads with DDPMModule.load_from_checkpoint."""
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
    assert OLD_HPARAMS - set(OLD_SPEED_HPARAMS) <= set(hparams)
    assert not set(OLD_SPEED_HPARAMS) & set(hparams)  # the speed switches: no longer the model's
    for key in added:  # arguments added since 0.1.0 (fine-tuning, start-up switches): absent from its checkpoints
        del hparams[key]
    hparams.update(OLD_SPEED_HPARAMS)  # the model's arguments in 0.1.0, saved with the others
    assert OLD_EMA_KEYS | {"shadow_params"} <= set(checkpoint["ema"])
    assert checkpoint["ema"]["optimization_step"] == 3
    assert not any(k.startswith(("StopOnNaN", "EMAWeights", "UpdateEMA")) for k in checkpoint["callbacks"])
    torch.save(checkpoint, path)
    old = tmp_path / "old.ckpt"
    shutil.copy(path, old)  # (the resume replaces last.ckpt)
    main([*crashing, "--ckpt_path", str(path)])  # a file, not "last": LightningCLI parses its hyperparameters
    assert not [w for w in recwarn if "is renamed" in str(w.message)]
    a = torch.load(tmp_path / "checkpoints" / "straight" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(tmp_path / "checkpoints" / "old" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_weights(a["state_dict"], b["state_dict"])
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)

    tuned = build(fit_args(twelve, tmp_path / "tuned", "--model.pretrained", str(old))[1:])  # (no "fit")
    assert tuned.model.base_model == {"name": f"{tmp_path.name}/old.ckpt", "source": "checkpoint"}
    for weight, ema in zip(tuned.model.unet.parameters(), checkpoint["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(weight.detach(), ema, rtol=0, atol=0)
    loaded = DDPMModule.load_from_checkpoint(old, map_location="cpu", weights_only=False)
    assert loaded.hparams.use_ema and not set(OLD_SPEED_HPARAMS) & set(loaded.hparams)
    assert_same_weights(loaded.state_dict(), checkpoint["state_dict"])


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_says_what_changes(twelve, tmp_path):
    """A checkpoint records the run's world size, global batch and steps per epoch; saved by 2 DDP processes (12
    cached images, batch 4: 2 steps an epoch) and resumed on 1, the warning names each change."""
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
    assert step_of(tmp_path / "checkpoints" / "run" / "last.ckpt") > 1  # and training went on


@pytest.mark.slow
def test_validate_on_other_held_out_images_says_so_and_nothing_of_training(twelve, image_folder, tmp_path):
    import warnings

    out = tmp_path / "run"
    main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "1", "--data.val_fraction", "0.25"))
    ckpt = str(tmp_path / "checkpoints" / "run" / "last.ckpt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        main(
            [
                "validate",
                "-c",
                str(out / "logs" / "config.yaml"),
                "--ckpt_path",
                ckpt,
                "--data.val_dataset",
                str(image_folder),
                "--data.val_fraction",
                "0",
            ]
        )
    said = [str(w.message) for w in seen if "checkpoint's run" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("Validating on other held-out images than the checkpoint's run (")
    assert f"val_dataset None -> '{image_folder}'" in said[0] and "val_fraction 0.25 -> 0.0" in said[0]
    assert "training" not in said[0] and "Resuming" not in said[0]
