"""A run's folder: one process at a time, validate leaves the training record alone, a typo leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_hub import hf_env, hub  # noqa: F401 (fixtures: the local Hub stand-in)

from ddpm_lightning.cli import main
from ddpm_lightning.run_folder import RunInUseError

from conftest import NO_SAVES, child_env, crash_args, fit_args, tb_events


@pytest.mark.slow
@pytest.mark.parametrize(
    "mistake",
    [["--data.dataset", "nope"], crash_args(step=0)],  # the typo; a crash ahead of the first step
    ids=["typo", "crash_before_step_1"],
)
def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_one(twelve, tmp_path, mistake):
    out = tmp_path / "out"
    with pytest.raises((ValueError, OSError, RuntimeError)):  # the errors the command line shows as one line
        main([*fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "2"), *mistake])
    main(fit_args(twelve, out, *NO_SAVES, "--trainer.max_steps", "2"))  # no --overwrite needed
    assert [e.step for e in tb_events(out / "logs", "train/loss")] == [0, 1]


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
def test_a_second_process_on_a_run_in_progress_fails_at_once_naming_the_first_and_a_killed_one_frees_it(
    twelve, tmp_path
):
    out, ckpts = tmp_path / "run", tmp_path / "checkpoints" / "run"
    run = fit_args(twelve, out, *NO_SAVES, "--trainer.max_epochs", "-1")
    args = [*run, "--trainer.max_steps", "300"]
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ddpm_lightning",
            *args,
            "--checkpoint.every_n_train_steps",
            "1",
            "--trainer.callbacks+=test_reliability.SlowSteps",
        ],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (ckpts / "last.ckpt").exists():  # training is under way
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
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


KILLED_SAVE = """
import sys, time, safetensors.torch, torch
from conftest import tiny_module
from ddpm_lightning.publish import save_pipeline

torch.manual_seed(0)
module = tiny_module()
save_pipeline(module.unet, module.noise_scheduler, sys.argv[1])  # the old model, whole
real = safetensors.torch.save_file

def stalls(tensors, path, metadata=None):  # half of the new weights out, then hangs until killed
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2]); f.flush()
    print("writing", flush=True); time.sleep(600)

safetensors.torch.save_file = stalls
with torch.no_grad():
    for p in module.unet.parameters():
        p.add_(1.0)
save_pipeline(module.unet, module.noise_scheduler, sys.argv[1])
"""


@pytest.mark.slow
def test_a_model_save_killed_mid_write_leaves_the_previous_model_loadable(tmp_path):
    from diffusers import DDPMPipeline

    from conftest import tiny_module

    folder = tmp_path / "model"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(folder)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    loaded = DDPMPipeline.from_pretrained(folder).unet  # loads: no half-written weights beside the old config
    torch.manual_seed(0)
    old = tiny_module().unet.state_dict()
    assert all(torch.equal(value, old[name]) for name, value in loaded.state_dict().items())  # the old model
    assert [p.name for p in folder.glob(".*")] == [f".model.partial-{writer.pid}"]  # removed by the next fit


@pytest.mark.slow
def test_an_upload_names_no_local_path_user_or_host(hub, image_folder, tmp_path, monkeypatch):  # noqa: F811
    import socket

    monkeypatch.setenv("HF_TOKEN", hub.token)
    out = tmp_path / "ddpm-pushed"
    main(fit_args(image_folder, out, "--trainer.max_epochs", "1", "--save.push_to_hub", "true"))
    files = hub.repos["fake-user/ddpm-pushed"].files
    assert "unet/diffusion_pytorch_model.safetensors" in files and "README.md" in files
    assert (out / "logs" / "config.yaml").is_file() and (out / "run_summary.json").is_file()  # kept locally
    texts = {name: data for name, data in files.items() if not name.endswith((".safetensors", ".png"))}
    assert texts.keys() == {"README.md", "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"}
    for private in (str(tmp_path), socket.gethostname(), str(Path.home())):
        assert not [name for name, data in texts.items() if private in name or private.encode() in data], private
    assert f"a local data set (`{image_folder.name}`)" in files["README.md"].decode()


@pytest.mark.slow
def test_an_upload_carries_the_model_the_card_and_the_grids_and_nothing_else_unless_asked(
    hub,  # noqa: F811
    image_folder,
    tmp_path,
    monkeypatch,
):
    """A pushed run, then a validate of it and a file of the user's in output_dir: the next upload (as the next
    save starts it) adds nothing; the training images and the logs go up only when asked for."""
    from ddpm_lightning.callbacks import SaveModel
    from ddpm_lightning.publish import HubUploader
    from ddpm_lightning.publish import hub as hub_module

    monkeypatch.setenv("HF_TOKEN", hub.token)
    out = tmp_path / "ddpm-pushed"
    main(
        fit_args(
            image_folder,
            out,
            "--trainer.max_epochs",
            "2",
            "--grid.save_image_epochs",
            "1",
            "--save.push_to_hub",
            "true",
        )
    )
    model = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    published = {*model, "scheduler/scheduler_config.json", "README.md", "samples.png"}
    published |= {"samples/0000.png", "samples/0001.png"}
    assert [set(commit.files) for commit in hub.commits] == [published]  # not samples/data.png, logs/, the lock
    ckpt = str(tmp_path / "checkpoints" / "ddpm-pushed" / "last.ckpt")
    main(
        [
            "validate",
            "-c",
            str(out / "logs" / "config.yaml"),
            "--ckpt_path",
            ckpt,
            "--data.val_dataset",
            str(image_folder),
        ]
    )
    (out / "notes.txt").write_text("hf_my_secret_token")
    assert {"validate", "notes.txt", "run_summary.json", ".ddpm-lightning.lock"} <= {p.name for p in out.iterdir()}

    def upload(**asked) -> set[str]:
        uploader = HubUploader("ddpm-pushed", token=hub.token, api=hub.api(), **asked)
        uploader.create_repo()
        uploader.upload(str(out), "Epoch 1")
        uploader.wait()
        uploader.api._thread_pool.shutdown(wait=True)
        assert (uploader.uploads, uploader.failures) == (1, 0)
        return set(hub.repos["fake-user/ddpm-pushed"].files)

    assert upload() == published
    logs = {f"logs/{p.name}" for p in (out / "logs").iterdir()} | {"run_summary.json"}
    assert upload(upload_logs=True) == published | logs
    assert upload(upload_data_preview=True) == published | logs | {"samples/data.png"}
    asked = SaveModel(push_to_hub=True, hub_upload_logs=True, hub_upload_data_preview=True).uploader
    assert asked.allow_patterns == hub_module.PUBLISHED + hub_module.LOGS + hub_module.DATA_PREVIEW  # the keys' way


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
