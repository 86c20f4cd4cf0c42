"""The run folder's life cycle (run_folder.py): a folder that cannot be written or already holds a run is refused
before training, a run that failed before its first step leaves nothing in the way, and one process at a time."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_lightning.cli import main
from ddpm_lightning.run_folder import RunInUseError

from conftest import NO_SAVES, child_env, crash_args, fit_args, tb_events


@pytest.mark.slow
def test_unwritable_output_dir_fails_before_training(image_folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeError, match="Cannot start training: .*a_file"):
        main(fit_args(image_folder, blocker / "run"))
    assert not (tmp_path / "checkpoints" / "run" / "last.ckpt").exists()


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


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake",
    [["--data.dataset", "nope"], crash_args(step=0)],  # a typo in the data set's path; a crash ahead of the first step
    ids=["typo", "crash_before_step_1"],
)
def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_one(twelve, tmp_path, mistake):
    out = tmp_path / "out"
    with pytest.raises((ValueError, OSError, RuntimeError)):  # the errors the command line shows as one line
        main([*fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "2"), *mistake])
    main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "2"))  # no --overwrite needed
    assert [e.step for e in tb_events(out / "logs", "train/loss")] == [0, 1]


def slow_fit_child(args: list[str], cwd: Path) -> subprocess.Popen:
    """`ddpm-lightning ARGS` in a child process whose steps take a second each (conftest.SlowSteps)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ddpm_lightning", *args, "--trainer.callbacks+=conftest.SlowSteps"],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_while_running(child: subprocess.Popen, until, seconds: float = 120) -> None:
    """Wait for `until()`, failing if the child ends first or it takes more than `seconds`."""
    deadline = time.time() + seconds
    while not until():
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_process_on_a_run_in_progress_fails_at_once_naming_the_first_and_a_killed_one_frees_it(
    twelve, tmp_path
):
    out, ckpts = tmp_path / "run", tmp_path / "checkpoints" / "run"
    run = fit_args(twelve, out, *NO_SAVES, "--trainer.max_epochs", "-1")
    args = [*run, "--trainer.max_steps", "300"]
    first = slow_fit_child([*args, "--checkpoint.every_n_train_steps", "1"], tmp_path)
    try:
        wait_while_running(first, lambda: (ckpts / "last.ckpt").exists())  # training is under way
        for second in ([*args, "--ckpt_path", "last"], args):  # a resume, and a fresh run, at the same moment
            start = time.time()
            with pytest.raises(RunInUseError, match=f"in use by ddpm-lightning PID {first.pid} on "):
                main(second)
            assert time.time() - start < 30  # at once: before any data or model is built... or trained
        # another output_dir of the same name: its own folder, but the default checkpoint folder is the same
        namesake = fit_args(twelve, tmp_path / "other" / "run", *NO_SAVES, "--trainer.max_steps", "300")
        for second in ([*namesake, "--ckpt_path", "last"], namesake):
            with pytest.raises(RunInUseError, match=r"--checkpoint.dirpath \S*checkpoints/run is in use by another"):
                main(second)
            assert not (tmp_path / "other" / "run" / "logs").exists()
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    main([*run, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last"])  # the killed run left no lock
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == step + 1


@pytest.mark.parametrize("inside", [".", "runs/run"])
def test_an_output_dir_inside_the_data_folder_is_refused(twelve, inside):
    from ddpm_lightning.cli import raised_by_this_package

    images = sorted(twelve.iterdir())
    with pytest.raises(
        ValueError, match=rf"--output_dir \S+ is inside --data.dataset {twelve}: the run's grids"
    ) as failed:
        main(fit_args(twelve, twelve / inside, "--trainer.max_steps", "1"))
    assert raised_by_this_package(failed.value)
    assert sorted(twelve.iterdir()) == images  # refused before anything was written there


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_plain_command(twelve, tmp_path, caplog):
    """kill -9 during the first steps (the default cadence saves after 10 minutes): the folder holds the run's logs
    and no checkpoint. `--ckpt_path last` says to leave it out, and the plain command trains, from step 0."""
    out = tmp_path / "run"
    args = fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "2")
    killed = slow_fit_child(args, tmp_path)
    try:
        logs = out / "logs"
        wait_while_running(killed, lambda: any(logs.glob("events.out.tfevents.*")) and (logs / "config.yaml").exists())
        time.sleep(1.5)  # in its first step (SlowSteps: a second each)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert (out / "logs" / "config.yaml").is_file() and not list(tmp_path.glob("checkpoints/run/*.ckpt"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in \S+run to resume from.*Leave --ckpt_path out"):
        main([*args, "--ckpt_path", "last"])
    main(args)  # no --overwrite needed
    assert f"output_dir {out} holds a run that saved no checkpoint and no model" in caplog.text  # said, not silent
    assert [e.step for e in tb_events(out / "logs", "train/loss")] == [0, 1]  # one run's curve, not two merged
    assert (tmp_path / "checkpoints" / "run" / "last.ckpt").is_file()


def test_a_run_whose_checkpoints_are_elsewhere_is_not_started_again_without_overwrite(tmp_path):
    """The saved config names the run's checkpoint folder: a rerun without that --checkpoint.dirpath finds the
    checkpoints there and refuses, rather than replacing the run's logs."""
    from ddpm_lightning.run_folder import check_fresh_run

    out, elsewhere = tmp_path / "run", tmp_path / "big_disk" / "run"
    (out / "logs").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    (elsewhere / "epoch=0-step=3.ckpt").write_bytes(b"")
    (out / "logs" / "config.yaml").write_text(f"checkpoint:\n  dirpath: {elsewhere}\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        check_fresh_run(str(out), None, overwrite=False)
    assert (out / "logs" / "config.yaml").is_file()
    (elsewhere / "epoch=0-step=3.ckpt").unlink()  # no checkpoint anywhere: started again
    check_fresh_run(str(out), None, overwrite=False)
    assert not (out / "logs").exists()
