"""The `ddpm-lightning` command line (cli.py): the configs it prints, its help, the values it checks before anything
is built, errors as one line (`--debug` for the traceback), the library noise it keeps quiet, and `validate`'s own
record beside the run's."""

from __future__ import annotations

import re
import warnings
import zipfile

import pytest
import tomllib
import yaml

from ddpm_lightning.cli import build, main
from ddpm_lightning.speed import SpeedSwitches

from conftest import NO_SAVES, REPO, TINY_CONFIG, TINY_RUN_ARGS, fit_args, max_steps, run_cli, tb_events


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


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    summary = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["description"]
    assert summary in " ".join(text.split()) and "Lightning Trainer command line tool" not in text  # this product's
    for subcommand in ("fit", "validate"):
        assert f"    {subcommand} " in text, subcommand
    for command in ("sample", "export", "prepare"):  # outside LightningCLI: their own --help
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0 and f"usage: ddpm-lightning [options] {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_help_lists_the_commands_that_work_and_documents_every_key(tmp_path):
    top = run_cli("--help", cwd=tmp_path).stdout
    assert all(f"    {name} " in top for name in ("fit", "validate", "sample", "export"))
    assert "    test " not in top and "    predict " not in top
    fit_help = run_cli("fit", "--help", cwd=tmp_path).stdout
    for key in ("--grid.eval_batch_size", "--grid.sampler", "--save.save_model_epochs", "--save.push_to_hub"):
        text = fit_help.split(f"\n  {key} ", 1)[1].split("\n  --", 1)[0]
        assert not text.strip().startswith("(type:"), f"{key} has no help text: {text}"


def test_the_old_spelling_of_each_speed_switch_still_works_and_warns_once_with_the_new_one(image_folder, tmp_path):
    """The speed switches were DDPMModule's arguments (`model.compile`, ...) before they were the `speed` group:
    each old key, in a config file (an old run's logs/config.yaml) or on the command line, sets its speed.* key,
    with one FutureWarning that names the new spelling; the model's hyperparameters and the config the run saves
    hold only the new."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  channels_last: true\n  compile_mode: reduce-overhead\n  gradient_checkpointing: true\n")
    args = fit_args(image_folder, tmp_path / "run", "-c", str(old), "--model.fused_adamw", "false")[1:]  # no "fit"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build(args)
    renamed = sorted(str(w.message).split(" (")[0] for w in caught if "is renamed" in str(w.message))
    keys = ["channels_last", "compile_mode", "fused_adamw", "gradient_checkpointing"]
    assert renamed == [f"model.{key} is renamed speed.{key}" for key in keys]
    speed = SpeedSwitches.of(cli.trainer)
    assert speed is not None and (speed.channels_last, speed.compile_mode, speed.gradient_checkpointing) == (
        True,
        "reduce-overhead",
        True,
    )
    assert speed.fused_adamw is False and not speed.compile
    assert not {*keys, "compile"} & set(cli.model.hparams)
    saved = yaml.safe_load(cli.parser.dump(cli.config))
    assert not {*keys, "compile"} & set(saved["model"]) and saved["speed"]["channels_last"] is True


def test_unknown_keys_are_named_with_their_file_line_and_the_nearest_key(image_folder, tmp_path):
    with pytest.raises(ValueError) as raised:
        main(fit_args(image_folder, tmp_path / "run", "--data.image_sise", "8"))
    assert str(raised.value) == "unknown key --data.image_sise (on the command line): did you mean --data.image_size?"
    typo = tmp_path / "typo.yaml"
    typo.write_text("# my settings\nmodel:\n  learnin_rate: 0.1\n")
    with pytest.raises(ValueError) as raised:
        main([*fit_args(image_folder, tmp_path / "run"), "-c", str(typo)])
    assert str(raised.value) == f"unknown key model.learnin_rate in {typo}, line 3: did you mean model.learning_rate?"


def test_a_tab_in_a_config_file_is_named_with_the_file_and_line(image_folder, tmp_path):
    tab = tmp_path / "tab.yaml"
    tab.write_text("model:\n\tlearning_rate: 0.1\n")
    with pytest.raises(ValueError) as raised:  # two -c: the message says which one
        main([*fit_args(image_folder, tmp_path / "run"), "-c", str(tab)])
    assert str(raised.value) == f"{tab}, line 2, column 1: a tab character: YAML indents with spaces only."
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  image_size: [16\n")
    with pytest.raises(ValueError, match=f"^{re.escape(str(broken))}, line 3, column 1: "):
        main([*fit_args(image_folder, tmp_path / "run"), "-c", str(broken)])


@pytest.mark.slow
def test_config_file_errors_are_one_line_on_the_command_line(tmp_path):
    tab = tmp_path / "tab.yaml"
    tab.write_text("model:\n\tlearning_rate: 0.1\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  learnin_rate: 0.1\n")
    for extra, said in (
        (["-c", str(tab)], f"{tab}, line 2, column 1: a tab character"),
        (["-c", str(typo)], f"unknown key model.learnin_rate in {typo}, line 2: did you mean model.learning_rate?"),
    ):
        result = run_cli("fit", "-c", str(TINY_CONFIG), *extra, cwd=tmp_path)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
        assert result.stderr.startswith(f"ddpm-lightning fit: error: {said}"), result.stderr


def test_a_fresh_run_counts_a_checkpoint_and_its_last_link_once(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ddpm_lightning.run_folder import check_fresh_run

    folder = tmp_path / "checkpoints" / "run"
    folder.mkdir(parents=True)
    (folder / "epoch=0-step=3.ckpt").write_bytes(b"x")
    (folder / "last.ckpt").symlink_to("epoch=0-step=3.ckpt")
    with pytest.raises(FileExistsError, match=r"\(1 checkpoint\(s\) in "):
        check_fresh_run(str(tmp_path / "run"), ModelCheckpoint(dirpath=str(folder)), overwrite=False)
    (folder / "epoch=1-step=6.ckpt").write_bytes(b"y")
    with pytest.raises(FileExistsError, match=r"\(2 checkpoint\(s\) in "):
        check_fresh_run(str(tmp_path / "run"), ModelCheckpoint(dirpath=str(folder)), overwrite=False)


@pytest.mark.slow
def test_the_config_goes_to_the_runs_logs_folder_with_any_logger(image_folder, tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "tracker-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    out = tmp_path / "run"
    try:  # W&B with its defaults: its own folder is the working directory (tmp_path here)
        main(fit_args(image_folder, out, *max_steps(1), *NO_SAVES, "--trainer.logger", "WandbLogger"))
    finally:
        wandb.finish()
    assert not (tmp_path / "config.yaml").exists()
    saved = yaml.safe_load((out / "logs" / "config.yaml").read_text())  # where docs/configuration.md says
    assert saved["output_dir"] == str(out) and saved["trainer"]["logger"]["class_path"].endswith("WandbLogger")


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value",
    [
        ("--grid.eval_batch_size", "0"),
        ("--grid.eval_batch_size", "-4"),
        ("--data.train_batch_size", "0"),
        ("--data.val_batch_size", "0"),
        ("--model.learning_rate", "-0.0001"),
        ("--model.learning_rate_scale", "-0.2"),
    ],
)
def test_values_that_must_be_positive_are_named(image_folder, tmp_path, key, value):
    with pytest.raises(ValueError, match=f"^{key} {value}: .* must be positive"):
        main(fit_args(image_folder, tmp_path / "run", f"{key}={value}"))  # "=": argparse would read -4 as an option


def test_validate_without_validation_images_fails_with_the_fix(image_folder, tmp_path):
    fake = tmp_path / "x.ckpt"
    with zipfile.ZipFile(fake, "w") as archive:  # readable as an archive: the check must come from validate itself
        archive.writestr("data.pkl", b"")
    with pytest.raises(
        ValueError, match="validate needs held-out images: set --data.val_dataset or --data.val_fraction"
    ):
        main(
            [
                "validate",
                "-c",
                str(TINY_CONFIG),
                "--data.dataset",
                str(image_folder),
                *TINY_RUN_ARGS,
                "--ckpt_path",
                str(fake),
            ]
        )


@pytest.mark.slow
def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["fit", "-c", str(TINY_CONFIG), "--data.dataset", str(tmp_path / "missing"), "--grid.eval_batch_size", "0"]
    plain = run_cli(*args, cwd=tmp_path)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines()[-1] == (
        "ddpm-lightning fit: error: --grid.eval_batch_size 0: images in a grid must be positive. "
        "(--debug shows the traceback)"
    )
    assert "Traceback" not in plain.stderr
    for debug in (
        run_cli(*args, "--debug", cwd=tmp_path),
        run_cli(*args, cwd=tmp_path, env_extra={"DDPM_LIGHTNING_DEBUG": "1"}),
    ):
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "must be positive" in debug.stderr


@pytest.mark.slow
def test_a_plain_run_shows_no_noise_but_keeps_actionable_warnings(image_folder, tmp_path):
    args = fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--model.lr_warmup_steps", "500")
    first = run_cli(*args, cwd=tmp_path)
    resumed = run_cli(
        *fit_args(
            image_folder,
            tmp_path / "run",
            "--trainer.max_epochs",
            "2",
            "--model.lr_warmup_steps",
            "500",
            "--ckpt_path",
            "last",
        ),
        cwd=tmp_path,
    )
    for result in (first, resumed):
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        for noise in (
            "Tip:",
            "TPU available",
            "set_vital",
            "LeafSpec",
            "exists and is not empty",
            "LightningCLI's args parameter",
            "Loading `train_dataloader` to estimate",
        ):
            assert noise not in log, noise
        assert "lr_warmup_steps=500 is not shorter than the run" in log  # an actionable warning stays


@pytest.mark.slow
def test_validate_leaves_the_runs_config_and_logs_alone(image_folder, tmp_path):
    out = tmp_path / "run"
    main(fit_args(image_folder, out, *NO_SAVES, "--trainer.max_steps", "2", "--data.val_fraction", "0.25"))
    config = (out / "logs" / "config.yaml").read_bytes()
    logs = sorted((out / "logs").iterdir())
    ckpt = str(tmp_path / "checkpoints" / "run" / "last.ckpt")
    validate = ["validate", "-c", str(out / "logs" / "config.yaml"), "--ckpt_path", ckpt]
    main(validate)
    main([*validate, "--data.train_batch_size", "2"])  # other settings
    with pytest.raises(OSError):
        main([*validate, "--data.dataset", str(tmp_path / "missing")])  # and one that fails
    assert (out / "logs" / "config.yaml").read_bytes() == config
    assert sorted((out / "logs").iterdir()) == logs
    assert tb_events(out / "validate", "val/loss")  # its own record, beside the run's


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


def test_the_docs_list_the_subcommands_help_lists(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.search(r"\{([\w,]+)\}", capsys.readouterr().out).group(1).split(",")  # argparse's {fit,validate,...}
    assert listed == ["fit", "validate", "sample", "export", "prepare"]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"lists the subcommands ({', '.join(f'`{name}`' for name in listed)})" in readme
    configuration = (REPO / "docs" / "configuration.md").read_text()
    assert f"# the subcommands: {', '.join(listed)}\n" in configuration


def test_what_the_readmes_commands_and_the_notebook_write_is_git_ignored():
    """So that `ruff format --check .` (CI's) never formats an exported model card in a checkout."""
    import shlex
    import subprocess

    block = (REPO / "README.md").read_text().split("## Sample, export, push", 1)[1].split("```bash", 1)[1]
    written = []
    for line in block.split("```", 1)[0].splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["ddpm-lightning", "sample"]:
            written.append(words[words.index("--output_dir") + 1] if "--output_dir" in words else "samples")
        elif words[:2] == ["ddpm-lightning", "export"]:
            written.append(words[3])
    assert len(written) == 3, written
    written += ["examples/ddpm-notebook", "examples/checkpoints/ddpm-notebook", "data/heliconius-photos"]
    for folder in written:
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "-q", f"{folder}/README.md"])
        assert check.returncode == 0, f"{folder} is not git-ignored"
