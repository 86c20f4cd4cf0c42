"""Fine-tuning runs (`--model.pretrained`): from a folder this project saved, the google/ddpm-* layout, a bare UNet
folder, a .ckpt and a Hub id (the local stand-in); the first step starts from the pretrained weights bitwise, the
saved folder loads with DDPMPipeline, a resume is exact, and configs/fine-tune.yaml trains at a fifth of its base
config's LR. The wrong sources' one-line errors are test_model_source.py's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMPipeline, UNet2DModel

from ddpm_lightning.cli import main
from ddpm_lightning.commands import export, sample

from conftest import (
    NO_SAVES,
    REPO,
    TINY_CONFIG,
    TINY_DATA_AND_GRID,
    TINY_UNET,
    assert_same_weights,
    child_env,
    crash_args,
    fine_tune,
    fit_args,
    google_layout,
    unet_weights,
)
from hub_standin import HubStandIn


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.mark.slow
def test_fine_tunes_from_a_folder_this_project_saved(trained, images, tmp_path, caplog):
    source = shutil.copytree(trained / "run", tmp_path / "base")
    expected = unet_weights(UNet2DModel.from_pretrained(source, subfolder="unet"))
    with caplog.at_level("INFO", logger="ddpm_lightning"):
        first = fine_tune(images, source, tmp_path / "tuned")
    assert_same_weights(expected, first["unet"])
    # fit_args sets model.unet (configs/tiny.yaml's and TINY_RUN_ARGS'): the same architecture here, so no line
    assert not [r for r in caplog.records if "replaces model.unet" in r.getMessage()]
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "tuned")
    assert list(pipeline.unet.config.block_out_channels) == TINY_UNET["block_out_channels"]
    assert not torch.equal(pipeline.unet.conv_in.weight, expected["conv_in.weight"])  # it trained
    front, text = card_of(tmp_path / "tuned")
    assert "base_model" not in front  # a local folder is no Hub id
    assert "- Fine-tuned from: `base` (a local folder)" in text and "pretrained: base\n" in text
    assert str(source) not in text  # no absolute local path
    summary = json.loads((tmp_path / "tuned" / "run_summary.json").read_text())
    assert summary["base_model"] == {"name": "base", "source": "folder"}
    # The run's checkpoint samples without the source folder (its hparams hold the UNet's architecture).
    shutil.rmtree(source)
    assert len(sample(str(tmp_path / "checkpoints" / "tuned" / "last.ckpt"), 1, "ddim", 2)) == 1


@pytest.mark.slow
def test_fine_tunes_from_the_google_ddpm_layout_with_its_schedule_unless_set(images, tmp_path, caplog):
    """The pretrained scheduler's keys (100 steps, variance_type, clip_sample) reach the run; the key the user sets
    (beta_schedule) wins. Trained at 32 px, the model fine-tunes at 16 px with one warning; the saved model says 16."""
    unet = google_layout(
        tmp_path / "ddpm-tiny", num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large"
    )
    with pytest.warns(UserWarning, match=r"sample_size 32 .* data.image_size 16") as warned:
        first = fine_tune(images, tmp_path / "ddpm-tiny", tmp_path / "tuned", "--model.beta_schedule", "linear")
    assert len([w for w in warned if "sample_size" in str(w.message)]) == 1
    assert_same_weights(unet_weights(unet), first["unet"])
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "tuned")
    assert pipeline.unet.config.sample_size == 16
    config = pipeline.scheduler.config
    assert (config.num_train_timesteps, config.variance_type, config.beta_schedule) == (100, "fixed_large", "linear")


@pytest.mark.slow
def test_fine_tunes_from_a_bare_unet_folder_with_the_default_schedule(images, tmp_path):
    torch.manual_seed(3)
    unet = UNet2DModel(**TINY_UNET, sample_size=16)
    unet.save_pretrained(tmp_path / "old-unet")  # config.json and weights at its top, no scheduler
    first = fine_tune(images, tmp_path / "old-unet", tmp_path / "tuned")
    assert_same_weights(unet_weights(unet), first["unet"])
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "tuned")
    assert (pipeline.scheduler.config.num_train_timesteps, pipeline.scheduler.config.beta_schedule) == (1000, "linear")


@pytest.mark.slow
def test_fine_tunes_from_a_checkpoint_s_ema_weights_as_a_new_run_with_ema_from_them(trained, images, tmp_path):
    ckpt = trained / "checkpoints" / "run" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    raw = {k.removeprefix("unet."): v for k, v in checkpoint["state_dict"].items()}
    names = list(raw)  # UNet2DModel has no buffers: parameters and state_dict share the order
    ema = dict(zip(names, checkpoint["ema"]["shadow_params"]))
    assert not torch.equal(ema["conv_in.weight"], raw["conv_in.weight"])  # the two differ: the test can fail
    first = fine_tune(images, ckpt, tmp_path / "tuned", "--model.use_ema", "true")
    assert_same_weights(ema, first["unet"])
    assert_same_weights(ema, dict(zip(names, first["ema"])))  # EMA starts from the pretrained weights
    tuned = torch.load(tmp_path / "checkpoints" / "tuned" / "last.ckpt", weights_only=False)
    assert tuned["global_step"] == 2  # a new run: its own steps, not the source's 3 + 2
    assert tuned["base_model"] == {"name": "run/last.ckpt", "source": "checkpoint"}
    DDPMPipeline.from_pretrained(tmp_path / "tuned")
    export(str(tmp_path / "checkpoints" / "tuned" / "last.ckpt"), str(tmp_path / "exported"))  # its card says so too
    front, text = card_of(tmp_path / "exported")
    assert "base_model" not in front and "- Fine-tuned from: `run/last.ckpt` (a local checkpoint)" in text
    assert str(trained) not in text


@pytest.mark.slow
def test_fine_tunes_from_a_hub_id_at_a_revision_through_the_stand_in(images, tmp_path):
    """A child process (huggingface_hub reads HF_ENDPOINT at import) downloads the repo from the stand-in."""
    unet = google_layout(tmp_path / "ddpm-tiny", sample_size=16, num_train_timesteps=50)
    with HubStandIn() as hub:
        repo = hub.add_repo("google/ddpm-tiny")
        repo.sha = "1" * 40
        for path in (tmp_path / "ddpm-tiny").rglob("*"):
            if path.is_file():
                repo.files[path.relative_to(tmp_path / "ddpm-tiny").as_posix()] = path.read_bytes()
        env = {**child_env(), "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost"}
        record = tmp_path / "first.pt"
        args = fit_args(images, tmp_path / "tuned", "--model.pretrained", "google/ddpm-tiny")
        args += ["--model.pretrained_revision", repo.sha, "--trainer.max_steps", "2"]
        args += ["--trainer.callbacks+=conftest.FirstStepWeights", "--trainer.callbacks.path", str(record)]
        done = subprocess.run([sys.executable, "-m", "ddpm_lightning", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert hub.unhandled == []
    assert_same_weights(unet_weights(unet), torch.load(record)["unet"])
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "tuned")
    assert pipeline.scheduler.config.num_train_timesteps == 50
    front, text = card_of(tmp_path / "tuned")
    assert front["base_model"] == "google/ddpm-tiny"
    assert f"at revision `{'1' * 40}`" in text


@pytest.mark.slow
def test_resumed_fine_tuning_equals_the_straight_run(trained, images, tmp_path):
    """`--ckpt_path last` restores the checkpoint's weights over the pretrained ones loaded at construction."""
    common = [*NO_SAVES, "--model.pretrained", str(trained / "run"), "--model.use_ema", "true"]
    common += ["--trainer.max_epochs", "2", "--checkpoint.every_n_epochs", "1"]  # 8 images: 2 steps an epoch
    main(fit_args(images, tmp_path / "straight", *common))
    crashing = fit_args(images, tmp_path / "crashed", *common)
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(3)])
    main([*crashing, "--ckpt_path", "last"])
    a = torch.load(tmp_path / "checkpoints" / "straight" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "checkpoints" / "crashed" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    assert_same_weights(a["state_dict"], b["state_dict"])
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.slow
def test_the_fine_tune_overlay_trains_from_the_pretrained_model_at_a_fifth_of_its_base_configs_lr(
    trained, images, tmp_path
):
    """configs/fine-tune.yaml over configs/tiny.yaml, as shipped but for the sizes, the length and no held-out
    images: a fifth of tiny.yaml's 2e-3 (over butterflies.yaml, 2e-5: test_configs.py)."""
    overlay = yaml.safe_load((REPO / "configs" / "fine-tune.yaml").read_text())["model"]
    source = trained / "run"
    record = tmp_path / "first.pt"
    main(
        [
            "fit",
            "-c",
            str(TINY_CONFIG),
            "-c",
            str(REPO / "configs" / "fine-tune.yaml"),
            "--model.pretrained",
            str(source),
            "--data.dataset",
            str(images),
            *TINY_DATA_AND_GRID,
            "--data.val_dataset",
            "null",
            "--quality.num_samples",
            "0",
            "--trainer.max_steps",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--output_dir",
            str(tmp_path / "tuned"),
            "--trainer.callbacks+=conftest.FirstStepWeights",
            "--trainer.callbacks.path",
            str(record),
        ]
    )
    first = torch.load(record)
    assert_same_weights(unet_weights(UNet2DModel.from_pretrained(source, subfolder="unet")), first["unet"])
    assert first["base_lr"] == pytest.approx(4e-4, rel=1e-9)  # 2e-3 x 0.2
    assert first["lr_at_step_1"] == pytest.approx(4e-4 / overlay["lr_warmup_steps"], rel=1e-6)
    DDPMPipeline.from_pretrained(tmp_path / "tuned")
