"""Fine-tuning (`--model.pretrained`): from a folder this project saved, the google/ddpm-* layout, a bare UNet
folder, a .ckpt and a Hub id (the local stand-in); the first step starts from the pretrained weights bitwise, the
saved folder loads with DDPMPipeline, a resume is exact, and every wrong input fails with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import constants
from lightning.pytorch import Callback

from ddpm_lightning.cli import main
from ddpm_lightning.commands import export, sample
from ddpm_lightning.model_source import ModelSourceError, load_model

from conftest import (
    MICRO_UNET,
    NO_SAVES,
    REPO,
    TINY_DATA_AND_GRID,
    TINY_UNET,
    child_env,
    crash_args,
    fit_args,
    write_image,
)
from hub_standin import HubStandIn


class FirstStepWeights(Callback):
    """Saves the UNet's weights (and EMA's) as the first optimizer step gets them, and the LR at step 1, to `path`
    (`--trainer.callbacks+=test_pretrained.FirstStepWeights --trainer.callbacks.path X`)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            ema = pl_module.ema
            record = {
                "unet": {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()},
                "ema": [p.clone() for p in ema.shadow_params] if ema is not None else None,
                "base_lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            }
            torch.save(record, self.path)
        if trainer.global_step == 1 and batch_idx == 1:
            record = torch.load(self.path)
            record["lr_at_step_1"] = trainer.optimizers[0].param_groups[0]["lr"]
            torch.save(record, self.path)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def weights(unet: UNet2DModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(8):
        write_image(root / f"{i}.png", seed=100 + i)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny EMA run of this project: root/run (the saved folder) and root/checkpoints/run/last.ckpt."""
    root = tmp_path_factory.mktemp("trained")
    for i in range(8):
        write_image(root / "images" / f"{i}.png", seed=i)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(root)
        main(fit_args(root / "images", root / "run", "--trainer.max_steps", "3", "--model.use_ema", "true"))
    return root


def google_layout(folder: Path, sample_size: int = 32, in_channels: int = 3, **schedule) -> UNet2DModel:
    """A folder as google/ddpm-* ships, written by diffusers itself: model_index.json, unet/, scheduler/."""
    torch.manual_seed(7)
    unet = UNet2DModel(**TINY_UNET, sample_size=sample_size, in_channels=in_channels, out_channels=in_channels)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**schedule)).save_pretrained(folder)
    return unet


def fine_tune(images: Path, source, out: Path, *extra: str) -> dict:
    """`fit` for 2 steps from `source`; what the first step started from."""
    record = out.parent / f"{out.name}-first-step.pt"
    main(
        fit_args(
            images,
            out,
            "--model.pretrained",
            str(source),
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks+=test_pretrained.FirstStepWeights",
            "--trainer.callbacks.path",
            str(record),
            *extra,
        )
    )
    return torch.load(record)


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1]), text


@pytest.mark.slow
def test_fine_tunes_from_a_folder_this_project_saved(trained, images, tmp_path, caplog):
    source = shutil.copytree(trained / "run", tmp_path / "base")
    expected = weights(UNet2DModel.from_pretrained(source, subfolder="unet"))
    with caplog.at_level("INFO", logger="ddpm_lightning"):
        first = fine_tune(images, source, tmp_path / "tuned")
    assert_same(expected, first["unet"])
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
    assert_same(weights(unet), first["unet"])
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "tuned")
    assert pipeline.unet.config.sample_size == 16
    config = pipeline.scheduler.config
    assert (config.num_train_timesteps, config.variance_type, config.beta_schedule) == (100, "fixed_large", "linear")


@pytest.mark.slow
def test_the_pretrained_unet_replaces_model_unet_with_one_line(images, tmp_path, caplog):
    unet = google_layout(tmp_path / "ddpm-tiny", sample_size=16)
    with caplog.at_level("INFO", logger="ddpm_lightning"):
        first = fine_tune(images, tmp_path / "ddpm-tiny", tmp_path / "tuned", "--model.unet", json.dumps(MICRO_UNET))
    assert_same(weights(unet), first["unet"])
    lines = [r.getMessage() for r in caplog.records if "replaces model.unet" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "block_out_channels=[32, 64]" in lines[0] and "add_attention=True" in lines[0]


@pytest.mark.slow
def test_fine_tunes_from_a_bare_unet_folder_with_the_default_schedule(images, tmp_path):
    torch.manual_seed(3)
    unet = UNet2DModel(**TINY_UNET, sample_size=16)
    unet.save_pretrained(tmp_path / "old-unet")  # config.json and weights at its top, no scheduler
    first = fine_tune(images, tmp_path / "old-unet", tmp_path / "tuned")
    assert_same(weights(unet), first["unet"])
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
    assert_same(ema, first["unet"])
    assert_same(ema, dict(zip(names, first["ema"])))  # EMA starts from the pretrained weights
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
        args += ["--trainer.callbacks+=test_pretrained.FirstStepWeights", "--trainer.callbacks.path", str(record)]
        done = subprocess.run([sys.executable, "-m", "ddpm_lightning", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert hub.unhandled == []
    assert_same(weights(unet), torch.load(record)["unet"])
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
    assert_same(a["state_dict"], b["state_dict"])
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.slow
def test_a_resume_with_a_pretrained_model_its_run_did_not_start_from_is_one_line(trained, images, tmp_path):
    """The checkpoint's weights would silently replace it: refused before training, naming both ways on, for a run
    that had none and for one fine-tuned from another model."""
    run = fit_args(images, tmp_path / "run", *NO_SAVES, "--trainer.max_steps", "1")
    main(run)
    resume = [*run, "--trainer.max_steps", "2", "--ckpt_path", "last", "--model.pretrained", str(trained / "run")]
    with pytest.raises(ModelSourceError, match=r"the checkpoint's run was not fine-tuned.*start a new run"):
        main(resume)
    assert torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=False)["global_step"] == 1
    tuned = fit_args(images, tmp_path / "tuned", *NO_SAVES, "--trainer.max_steps", "1", "--model.pretrained")
    main([*tuned, str(trained / "run")])
    other = str(trained / "checkpoints" / "run" / "last.ckpt")
    with pytest.raises(ModelSourceError, match=r"the checkpoint's run was fine-tuned from .*run, and a resumed run"):
        main([*tuned, other, "--trainer.max_steps", "2", "--ckpt_path", "last"])


@pytest.mark.slow
def test_the_fine_tune_overlay_trains_from_the_pretrained_model_at_its_lr(trained, images, tmp_path):
    """configs/fine-tune.yaml over configs/butterflies.yaml, as shipped but for the sizes and the length."""
    overlay = yaml.safe_load((REPO / "configs" / "fine-tune.yaml").read_text())["model"]
    source = trained / "run"
    record = tmp_path / "first.pt"
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "butterflies.yaml"),
            "-c",
            str(REPO / "configs" / "fine-tune.yaml"),
            "--model.pretrained",
            str(source),
            "--data.dataset",
            str(images),
            *TINY_DATA_AND_GRID,
            "--trainer.max_steps",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--output_dir",
            str(tmp_path / "tuned"),
            "--trainer.callbacks+=test_pretrained.FirstStepWeights",
            "--trainer.callbacks.path",
            str(record),
        ]
    )
    first = torch.load(record)
    assert_same(weights(UNet2DModel.from_pretrained(source, subfolder="unet")), first["unet"])
    assert first["base_lr"] == overlay["learning_rate"]
    assert first["lr_at_step_1"] == pytest.approx(overlay["learning_rate"] / overlay["lr_warmup_steps"], rel=1e-6)
    DDPMPipeline.from_pretrained(tmp_path / "tuned")


# ------------------------------------------------------------------------------------------------------ errors


def other_project_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 1.0}}, path)
    return path


def make_error_source(kind: str, root: Path) -> tuple[str, dict]:
    """A wrong `--model.pretrained` of each kind, and the extra DDPMModule arguments."""
    if kind == "missing path":
        return str(root / "no" / "such" / "model"), {}
    if kind == "image folder":
        write_image(root / "photos" / "a.png")
        return str(root / "photos"), {}
    if kind == "pipeline without a unet":
        (root / "p").mkdir()
        (root / "p" / "model_index.json").write_text(json.dumps({"_class_name": "X", "scheduler": ["diffusers", "A"]}))
        return str(root / "p"), {}
    if kind == "conditional unet":
        (root / "sd").mkdir()
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        (root / "sd" / "model_index.json").write_text(json.dumps(index))
        return str(root / "sd"), {}
    if kind == "config of another model":
        (root / "bert").mkdir()
        (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
        return str(root / "bert"), {}
    if kind == "unet folder without weights":
        UNet2DModel(**MICRO_UNET).save_config(root / "empty")
        return str(root / "empty"), {}
    if kind == "checkpoint from another project":
        return str(other_project_checkpoint(root / "other.ckpt")), {}
    if kind == "unreadable file":
        (root / "notes.ckpt").write_text("not a checkpoint")
        return str(root / "notes.ckpt"), {}
    if kind == "revision of a local folder":
        google_layout(root / "local")
        return str(root / "local"), {"pretrained_revision": "v1"}
    raise AssertionError(kind)


ERRORS = {
    "missing path": r"does not exist: it is no file or folder here, nor a Hub model id",
    "image folder": r"is a folder but not a diffusers model \(no model_index.json, no config.json\)",
    "pipeline without a unet": r"it has no unet \(it holds scheduler\), not the UNet2DModel",
    "conditional unet": r"its unet is a UNet2DConditionModel, not the UNet2DModel of an unconditional DDPM",
    "config of another model": r"its config.json describes no diffusers _class_name, not a UNet2DModel",
    "unet folder without weights": r"cannot read the UNet in .*diffusion_pytorch_model.safetensors",
    "checkpoint from another project": r"is not a checkpoint of ddpm-lightning \(no unet.\* weights",
    "unreadable file": r"is not a readable checkpoint",
    "revision of a local folder": r"only a Hub model id has revisions",
}


@pytest.mark.parametrize("kind", list(ERRORS))
def test_each_wrong_source_fails_at_construction_with_one_line(kind, tmp_path):
    from ddpm_lightning.module import DDPMModule

    source, extra = make_error_source(kind, tmp_path)
    with pytest.raises(ModelSourceError, match=ERRORS[kind]) as raised:
        DDPMModule(pretrained=source, image_size=16, **extra)
    assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_wrong_source_stops_fit_before_training_on_the_command_line(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["ddpm-lightning", *fit_args(images, tmp_path / "x", "--model.pretrained", "a/b/c")]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "--model.pretrained a/b/c does not exist" in err[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_one_channel_model_on_rgb_photos_is_one_line_naming_both(images, tmp_path):
    google_layout(tmp_path / "grey", sample_size=16, in_channels=1)
    with pytest.raises(ValueError, match=r"model.pretrained grey takes 1-channel images .* data is 3-channel \(RGB\)"):
        fine_tune(images, tmp_path / "grey", tmp_path / "tuned")
    assert not list(tmp_path.rglob("*.ckpt"))  # before any training


def test_an_uncached_hub_id_offline_names_hf_hub_offline_and_the_download_command(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (read at import; the conftest sets the variable later)
    with pytest.raises(ModelSourceError) as raised:
        load_model("someone/ddpm-not-cached", revision="v2")
    message = str(raised.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "`hf download someone/ddpm-not-cached --revision v2`" in message
    assert shutil.which("hf", path=os.path.dirname(sys.executable)) is not None  # the command it names is installed


@pytest.mark.slow
def test_hub_repo_revision_and_unet_errors_through_the_stand_in(tmp_path):
    """A missing repo, a missing revision and a repo without a UNet, each one line (one child process)."""
    script = (
        "import json, sys\nfrom ddpm_lightning.model_source import load_model, ModelSourceError\nout = []\n"
        "for repo, revision in json.loads(sys.argv[1]):\n"
        "    try:\n        load_model(repo, revision)\n        out.append(None)\n"
        "    except ModelSourceError as err:\n        out.append(str(err))\nprint(json.dumps(out))\n"
    )
    cases = [["someone/missing", None], ["someone/model", "nope"], ["someone/no-unet", None]]
    with HubStandIn() as hub:
        hub.add_repo("someone/model").files["model_index.json"] = b"{}"
        hub.add_repo("someone/no-unet").files["README.md"] = b"# a dataset card"
        env = {**child_env(), "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost"}
        env["HF_HOME"] = str(tmp_path / "hf_home")
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True
        )
    assert done.returncode == 0, done.stderr[-3000:]
    missing, revision, no_unet = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no such model repo on the Hub" in missing and "hf auth login" in missing
    assert "--model.pretrained_revision nope: the Hub repo someone/model has no such branch, tag or commit" in revision
    assert "holds no diffusers UNet (no model_index.json, no config.json)" in no_unet
    assert all("\n" not in m for m in (missing, revision, no_unet))
