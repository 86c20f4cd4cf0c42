"""One resolver of model sources (model_source.py): every wrong `--model.pretrained` fails with one line (at
construction, on the command line, offline, through the Hub stand-in), a resume keeps its run's pretrained model,
and the pretrained UNet replaces `model.unet` with one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from huggingface_hub import constants

from ddpm_lightning.cli import main
from ddpm_lightning.model_source import ModelSourceError, load_model

from conftest import (
    MICRO_UNET,
    NO_SAVES,
    assert_same_weights,
    child_env,
    fine_tune,
    fit_args,
    google_layout,
    unet_weights,
    write_image,
)
from hub_standin import HubStandIn


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


def test_an_uncached_hub_id_offline_names_hf_hub_offline_and_the_download_command(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (read at import: whatever the environment was then)
    with pytest.raises(ModelSourceError) as raised:
        load_model("someone/ddpm-not-cached", revision="v2")
    message = str(raised.value)
    assert "\n" not in message and "HF_HUB_OFFLINE is set" in message
    assert "`hf download someone/ddpm-not-cached --revision v2`" in message
    assert shutil.which("hf", path=os.path.dirname(sys.executable)) is not None  # the command it names is installed


def test_an_unreachable_hub_names_it_and_the_download_command(monkeypatch):
    """Online, with no network (every DNS lookup fails; the client's 1+2+4+8+8 s of backoff between its retries
    skipped): one line that says the Hub cannot be reached, not that HF_HUB_OFFLINE is set."""
    import huggingface_hub.utils._http as http

    lookups = []

    def no_dns(*args, **kwargs):
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    class NoBackoff:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            pass

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(http, "time", NoBackoff())
    with pytest.raises(ModelSourceError) as raised:
        load_model("someone/ddpm-not-cached")
    message = str(raised.value)
    assert "\n" not in message and "the Hub cannot be reached (HF_HUB_OFFLINE unset)" in message
    assert "`hf download someone/ddpm-not-cached`" in message
    assert lookups  # it did try the network


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
def test_the_pretrained_unet_replaces_model_unet_with_one_line(images, tmp_path, caplog):
    unet = google_layout(tmp_path / "ddpm-tiny", sample_size=16)
    with caplog.at_level("INFO", logger="ddpm_lightning"):
        first = fine_tune(images, tmp_path / "ddpm-tiny", tmp_path / "tuned", "--model.unet", json.dumps(MICRO_UNET))
    assert_same_weights(unet_weights(unet), first["unet"])
    lines = [r.getMessage() for r in caplog.records if "replaces model.unet" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "block_out_channels=[32, 64]" in lines[0] and "add_attention=True" in lines[0]


# Every command takes every kind of model source, through the one resolver: the script runs in a child process
# (huggingface_hub reads HF_ENDPOINT at import) with the Hub stand-in serving the Hub id.
EVERY_COMMAND = """
import json, sys
from ddpm_lightning.cli import main
sources, data, root, fit_args = json.loads(sys.argv[1])
for kind, source in sources.items():  # each run its own output_dir's name, so its own checkpoint folder
    main([*fit_args, "--model.pretrained", source, "--output_dir", f"{root}/fit-{kind}", "--trainer.max_steps", "1",
          "--trainer.callbacks+=conftest.FirstStepWeights", "--trainer.callbacks.path", f"{root}/first-step-{kind}.pt"])
    main([a if a != "fit" else "validate" for a in fit_args] + ["--model.pretrained", source, "--data.val_dataset",
          data, "--output_dir", f"{root}/validate-{kind}"])
    main(["sample", source, "--num_images", "1", "--sampler", "ddim", "--num_inference_steps", "2",
          "--output_dir", f"{root}/sample-{kind}"])
    main(["export", source, f"{root}/export-{kind}"])
"""


@pytest.mark.slow
def test_every_command_takes_every_kind_of_model_source(trained, images, tmp_path):
    """fit --model.pretrained, validate --model.pretrained, sample and export, each from a checkpoint (its EMA
    weights), a diffusers folder, a bare UNet folder and a Hub id: each starts from, draws with or writes the weights
    the resolver reads."""
    from diffusers import DDPMPipeline

    torch.manual_seed(3)
    UNet2DModel(**MICRO_UNET, sample_size=16).save_pretrained(tmp_path / "bare")
    google_layout(tmp_path / "hub-repo", sample_size=16)
    sources = {
        "checkpoint": str(trained / "checkpoints" / "run" / "last.ckpt"),
        "folder": str(trained / "run"),
        "bare": str(tmp_path / "bare"),
        "hub": "google/ddpm-tiny",
    }
    with HubStandIn() as hub:
        repo = hub.add_repo("google/ddpm-tiny")
        for path in (tmp_path / "hub-repo").rglob("*"):
            if path.is_file():
                repo.files[path.relative_to(tmp_path / "hub-repo").as_posix()] = path.read_bytes()
        env = {**child_env(), "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost"}
        arguments = json.dumps([sources, str(images), str(tmp_path / "runs"), fit_args(images, tmp_path / "unused")])
        done = subprocess.run(
            [sys.executable, "-c", EVERY_COMMAND, arguments], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-4000:]
        assert hub.unhandled == []
        expected = {kind: unet_weights(load_model(source).unet) for kind, source in sources.items() if kind != "hub"}
    expected["hub"] = unet_weights(UNet2DModel.from_pretrained(tmp_path / "hub-repo", subfolder="unet"))
    runs = tmp_path / "runs"
    for kind, weights in expected.items():
        assert_same_weights(weights, torch.load(runs / f"first-step-{kind}.pt")["unet"])  # fine-tuning's start
        assert (runs / f"validate-{kind}" / "validate").is_dir()  # its logs: the validation ran
        assert {p.name for p in (runs / f"sample-{kind}").iterdir()} == {"000000.png", "grid.png"}
        assert_same_weights(weights, unet_weights(DDPMPipeline.from_pretrained(runs / f"export-{kind}").unet))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["missing/deeper/model", "photos"])
def test_a_wrong_source_gives_every_command_the_same_line(images, tmp_path, monkeypatch, capsys, source):
    """The resolver's message, word for word, whichever command is given the source (only the option's name
    before it differs: `--model.pretrained X` for fit and validate, the argument itself for sample and export)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(images, tmp_path / "photos")
    lines = {}
    validate = ["validate", *fit_args(images, tmp_path / "b")[1:], "--data.val_dataset", str(images)]
    for command in (
        [*fit_args(images, tmp_path / "a"), "--model.pretrained", source],
        [*validate, "--model.pretrained", source],
        ["sample", source],
        ["export", source, str(tmp_path / "out")],
    ):
        monkeypatch.setattr(sys, "argv", ["ddpm-lightning", *command])
        with pytest.raises(SystemExit) as exit_info:
            main()
        message = capsys.readouterr().err.strip() if exit_info.value.code == 1 else str(exit_info.value.code)
        assert "\n" not in message, message
        lines[command[0]] = message.split(f"{source}", 1)[1].removesuffix(" (--debug shows the traceback)")
    assert len(set(lines.values())) == 1, lines
