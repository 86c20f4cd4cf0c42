"""Fine-tuning: the pretrained model a run starts from (`--model.pretrained`), resolved into its UNet (architecture
and weights), its noise schedule and the name the model card gives it.

    found = load_pretrained("google/ddpm-cifar10-32")             # a Hub model id (revision: a branch, tag or commit)
    found = load_pretrained("ddpm-butterflies-128")               # a diffusers folder: model_index.json, unet/, scheduler/
    found = load_pretrained("old-unet")                           # a bare UNet folder: config.json and weights at its top
    found = load_pretrained("checkpoints/run/last.ckpt")          # a checkpoint of ddpm-lightning: its EMA weights if any
    found.unet, found.scheduler_config, found.base_model

Folders and Hub repos load through diffusers' own `UNet2DModel.from_pretrained` and `DDPMScheduler.load_config`; a
Hub repo's layout is found with huggingface_hub's `hf_hub_download` (which also reads its local cache offline). A
source that cannot be used raises `PretrainedError`, one line naming the fix, before anything trains.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from huggingface_hub import hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .sources import is_hub_id

log = logging.getLogger(__name__)

WHAT_IT_TAKES = (
    "give a Hub model id, a folder saved by `ddpm-lightning fit` / `export` or by DDPMPipeline.save_pretrained "
    "(model_index.json, unet/, scheduler/), a UNet folder (config.json and weights), or a .ckpt of ddpm-lightning"
)


class PretrainedError(ValueError):
    """A `--model.pretrained` that cannot be used; the message names the fix."""


@dataclass
class Pretrained:
    unet: UNet2DModel
    scheduler_config: dict[str, Any]  # its noise schedule; empty when it has none (a bare UNet folder)
    base_model: dict[str, Any]  # for the card and the run summary: {"name", "source", "revision"}


def load_pretrained(source: str, revision: str | None = None) -> Pretrained:
    """The UNet, noise schedule and name of `source`: a local .ckpt or folder first, else a Hub model id."""
    path = Path(source).expanduser()
    if revision is not None and path.exists():
        raise PretrainedError(
            f"--model.pretrained_revision {revision}: only a Hub model id has revisions, not {source}."
        )
    if path.is_file():
        return from_checkpoint(path)
    if path.is_dir():
        return from_folder(path)
    if source.endswith(".ckpt") or not is_hub_id(source):
        raise PretrainedError(
            f"--model.pretrained {source} does not exist: it is no file or folder here, nor a Hub model id "
            f"'user/name'. Check the path, or {WHAT_IT_TAKES}."
        )
    return from_hub(source, revision)


def from_checkpoint(path: Path) -> Pretrained:
    """A checkpoint's UNet (`model.unet` and `image_size` of its hyperparameters) with its EMA weights when it
    has them, its raw ones otherwise, and its noise schedule: a new run's start, not a resume."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise PretrainedError(
            f"--model.pretrained {path} is not a readable checkpoint ({type(err).__name__}): {WHAT_IT_TAKES}."
        ) from err
    weights = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    unet_weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not unet_weights or not isinstance(hparams, dict) or "image_size" not in hparams:
        raise PretrainedError(
            f"--model.pretrained {path} is not a checkpoint of ddpm-lightning (no unet.* weights and "
            f"hyperparameters in it): {WHAT_IT_TAKES}."
        )
    from .module import TUTORIAL_UNET  # (module.py imports this file)

    kwargs = dict(TUTORIAL_UNET if hparams.get("unet") is None else hparams["unet"])
    try:
        unet = UNet2DModel(**{**kwargs, "sample_size": hparams["image_size"]})
        unet.load_state_dict(unet_weights)
        if checkpoint.get("ema") is not None:
            ema = EMAModel(unet.parameters())
            ema.load_state_dict(checkpoint["ema"])
            ema.copy_to(unet.parameters())
    except (TypeError, ValueError, RuntimeError) as err:
        raise PretrainedError(
            f"--model.pretrained {path}: its weights do not fit the UNet its hyperparameters describe "
            f"({type(err).__name__}: {first_line(err)}); was it written by another version of ddpm-lightning?"
        ) from err
    noise_keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    schedule = {k: hparams[k] for k in noise_keys if hparams.get(k) is not None}
    weights_kind = "EMA" if checkpoint.get("ema") is not None else "raw"
    rank_zero_only(log.info)(f"Fine-tuning from the {weights_kind} weights of {path}")
    return Pretrained(unet, schedule, {"name": f"{path.parent.name}/{path.name}", "source": "checkpoint"})


def from_folder(path: Path) -> Pretrained:
    name = path.resolve().name
    if (path / "model_index.json").is_file():
        check_pipeline_unet(json.loads((path / "model_index.json").read_text()), str(path))
        unet = read_unet(str(path), "unet", None)
        has_schedule = (path / "scheduler" / "scheduler_config.json").is_file()
        schedule = DDPMScheduler.load_config(path, subfolder="scheduler") if has_schedule else {}
    elif (path / "config.json").is_file():
        check_unet_config(json.loads((path / "config.json").read_text()), str(path))
        unet = read_unet(str(path), None, None)
        schedule = DDPMScheduler.load_config(path) if (path / "scheduler_config.json").is_file() else {}
    else:
        held = sorted(p.name for p in path.glob("*.ckpt"))[:3]
        hint = f"; it holds {', '.join(held)}: pass one of them" if held else ""
        raise PretrainedError(
            f"--model.pretrained {path} is a folder but not a diffusers model (no model_index.json, no "
            f"config.json{hint}): {WHAT_IT_TAKES}."
        )
    return Pretrained(unet, dict(schedule), {"name": name, "source": "folder"})


def from_hub(repo_id: str, revision: str | None) -> Pretrained:
    """A Hub repo in either layout: a pipeline (model_index.json, unet/, scheduler/) or a bare UNet."""
    try:
        try:
            index = hf_hub_download(repo_id, "model_index.json", revision=revision)
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:
            index = None
        if index is not None:
            check_pipeline_unet(json.loads(Path(index).read_text()), repo_id)
            subfolder: str | None = "unet"
        else:
            try:
                config = hf_hub_download(repo_id, "config.json", revision=revision)
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError as err:
                raise PretrainedError(
                    f"--model.pretrained {repo_id}: the Hub repo holds no diffusers UNet (no model_index.json, no "
                    "config.json): pick an unconditional model, e.g. google/ddpm-cifar10-32."
                ) from err
            check_unet_config(json.loads(Path(config).read_text()), repo_id)
            subfolder = None
        unet = read_unet(repo_id, subfolder, revision)
        try:
            schedule = DDPMScheduler.load_config(
                repo_id, subfolder="scheduler" if subfolder else None, revision=revision
            )
        except OSError:
            if subfolder:  # a pipeline has one; a bare UNet repo may not
                raise
            schedule = {}
    except PretrainedError:
        raise
    except Exception as err:
        raise hub_error(err, repo_id, revision) from err
    return Pretrained(unet, dict(schedule), {"name": repo_id, "source": "hub", "revision": revision})


def hub_error(err: Exception, repo_id: str, revision: str | None) -> PretrainedError:
    """One line for a Hub lookup that failed, read from the huggingface_hub error in `err`'s chain."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = lambda kind: any(isinstance(e, kind) for e in chain)  # noqa: E731
    if found(RevisionNotFoundError):
        return PretrainedError(
            f"--model.pretrained_revision {revision}: the Hub repo {repo_id} has no such branch, tag or commit."
        )
    if found(RepositoryNotFoundError):
        return PretrainedError(
            f"--model.pretrained {repo_id}: no such model repo on the Hub (a private or gated one needs "
            "`hf auth login`): check the id, or give a local folder or .ckpt."
        )
    if found(LocalEntryNotFoundError) or found(ConnectionError) or is_offline_mode():
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hub cannot be reached (HF_HUB_OFFLINE unset)"
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        return PretrainedError(
            f"--model.pretrained {repo_id} is not in the local Hugging Face cache and {why}: download it once "
            f"where the Hub is reachable (`{download}`), then run again; or give a local folder."
        )
    kind = "Hub error" if found(HfHubHTTPError) else type(err).__name__
    return PretrainedError(f"--model.pretrained {repo_id}: could not load it ({kind}: {first_line(err)}).")


def check_pipeline_unet(index: dict, where: str) -> None:
    """A pipeline's model_index.json names a UNet2DModel as its `unet` (as DDPMPipeline's does)."""
    entry = index.get("unet")
    kind = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if kind != "UNet2DModel":
        has = (
            f"its unet is a {kind}"
            if kind
            else f"it has no unet (it holds {', '.join(k for k in index if k[0] != '_')})"
        )
        raise PretrainedError(
            f"--model.pretrained {where}: {has}, not the UNet2DModel of an unconditional DDPM; pick an "
            "unconditional model (e.g. google/ddpm-cifar10-32), or a folder this project saved."
        )


def check_unet_config(config: dict, where: str) -> None:
    if config.get("_class_name") != "UNet2DModel":
        kind = config.get("_class_name") or "no diffusers _class_name"
        raise PretrainedError(
            f"--model.pretrained {where}: its config.json describes {kind}, not a UNet2DModel; {WHAT_IT_TAKES}."
        )


def read_unet(location: str, subfolder: str | None, revision: str | None) -> UNet2DModel:
    try:
        return UNet2DModel.from_pretrained(location, subfolder=subfolder, revision=revision)
    except OSError as err:
        if not Path(location).exists():
            raise  # a Hub lookup: hub_error words it
        where = f"{location}/{subfolder}" if subfolder else location
        raise PretrainedError(
            f"--model.pretrained {location}: cannot read the UNet in {where} ({first_line(err)}): it needs "
            "config.json and diffusion_pytorch_model.safetensors (or .bin)."
        ) from err


def architecture(unet: UNet2DModel) -> dict[str, Any]:
    """`unet`'s constructor arguments as plain JSON values, less sample_size (it follows data.image_size)."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "sample_size"}
    return json.loads(json.dumps(config))


def fitted_architecture(found: Pretrained, configured: dict[str, Any] | None, image_size: int) -> dict[str, Any]:
    """The pretrained UNet's architecture, which replaces `model.unet` (one line names what differs), for a run
    at `image_size` (one warning when the model was trained at another size: a UNet is convolutional, it trains)."""
    name = found.base_model["name"]
    arch = architecture(found.unet)
    configured = {k: v for k, v in (configured or {}).items() if k != "sample_size"}  # (follows image_size)
    differs = {k: arch.get(k) for k, v in configured.items() if json.loads(json.dumps(v)) != arch.get(k)}
    if differs:
        shown = ", ".join(f"{k}={v}" for k, v in differs.items())
        rank_zero_only(log.info)(f"model.pretrained {name}: its UNet replaces model.unet, which differs in {shown}")
    size = found.unet.config.sample_size
    if size not in (image_size, [image_size, image_size], (image_size, image_size)):
        rank_zero_warn(
            f"model.pretrained {name} was trained at sample_size {size} and this run trains at "
            f"data.image_size {image_size}: a UNet is convolutional, so it trains at the new size, and the saved "
            f"model records sample_size {image_size}."
        )
    return arch


def check_channels(unet: UNet2DModel, channels: int | None, base_model: dict[str, Any] | None) -> None:
    """The UNet takes and predicts images of the data's channel count (noise of the image's shape), when the data
    module says it (ImageDataModule's `channels`: RGB)."""
    if channels is None:
        return
    what = f"model.pretrained {base_model['name']}" if base_model else "model.unet"
    in_channels, out_channels = unet.config.in_channels, unet.config.out_channels
    if in_channels != channels or out_channels != channels:
        raise ValueError(
            f"{what} takes {in_channels}-channel images and predicts {out_channels} channels, but the data is "
            f"{channels}-channel ({'RGB' if channels == 3 else 'images'}): pick a model with in_channels and "
            f"out_channels {channels}."
        )


def check_resumed(then: str | None, now: str | None) -> None:
    """A resumed run goes on from its checkpoint's weights: a `--model.pretrained` its run did not start from would
    be loaded and then silently replaced."""
    if now is not None and now != then:
        was = f"was fine-tuned from {then}" if then is not None else "was not fine-tuned"
        raise PretrainedError(
            f"--model.pretrained {now} with --ckpt_path: the checkpoint's run {was}, and a resumed run goes on from "
            f"its checkpoint's weights. To fine-tune from {now}, start a new run (another --output_dir, no "
            "--ckpt_path); to resume, leave --model.pretrained as the run had it."
        )


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
