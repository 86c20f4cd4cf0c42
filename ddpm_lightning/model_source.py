"""Where a trained model comes from, resolved once for every command.

`fit --model.pretrained` (and `validate` with it), `sample` and `export` take the same sources through
`load_model`, with the same one-line errors.

    found = load_model("google/ddpm-cifar10-32")             # a Hub model id (revision: a branch, tag or commit)
    found = load_model("ddpm-butterflies-128")               # a diffusers folder: model_index.json, unet/, scheduler/
    found = load_model("old-unet")                           # a bare UNet folder: config.json and weights at its top
    found = load_model("checkpoints/run/last.ckpt")          # a checkpoint of ddpm-lightning: its EMA weights if any
    found.unet, found.scheduler_config, found.base_model, found.checkpoint

Folders and Hub repos load through diffusers' own `UNet2DModel.from_pretrained` and `DDPMScheduler.load_config`; a
Hub repo's layout is found with huggingface_hub's `hf_hub_download` (which also reads its local cache offline). A
source that cannot be used raises `ModelSourceError`, one line naming the fix, before anything trains or samples.
What fine-tuning from a source checks (`fitted_architecture`, `check_resumed`) is here too.
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

from .files import first_line
from .sources import is_hub_id
from .unet import NOISE_SCHEDULE, TUTORIAL_UNET, architecture, noise_schedule

log = logging.getLogger(__name__)

WHAT_IT_TAKES = (
    "give a Hub model id, a folder saved by `ddpm-lightning fit` / `export` or by DDPMPipeline.save_pretrained "
    "(model_index.json, unet/, scheduler/), a UNet folder (config.json and weights), or a .ckpt of ddpm-lightning"
)
# How each command names the source and its revision in an error: `fit --model.pretrained X`, `sample X`.
PRETRAINED = ("--model.pretrained", "--model.pretrained_revision")
POSITIONAL = ("", "--revision")


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message names the fix."""


@dataclass
class ModelSource:
    """A model source resolved: its UNet, noise schedule and name, and a checkpoint's contents."""

    unet: UNet2DModel  # a checkpoint's EMA weights when it has them
    scheduler_config: dict[str, Any]  # its noise schedule; empty when it has none (a bare UNet folder)
    base_model: dict[str, Any]  # for the card and the run summary: {"name", "source", "revision"}
    checkpoint: dict[str, Any] | None = None  # a checkpoint's contents (memory-mapped): its config, steps, ...

    def noise_scheduler(self) -> DDPMScheduler:
        """The noise schedule the model was trained with (DDPMScheduler's defaults where it names none)."""
        return noise_schedule({}, self.scheduler_config)


def load_model(source: str, revision: str | None = None, names: tuple[str, str] = PRETRAINED) -> ModelSource:
    """The UNet, noise schedule and name of `source`: a local .ckpt or folder first, else a Hub model id.

    `names` are the option names the errors give the source and the revision (`PRETRAINED`, or `POSITIONAL` for a
    command's argument).
    """
    path = Path(source).expanduser()
    option = named(names[0], source)
    if revision is not None and path.exists():
        raise ModelSourceError(f"{names[1]} {revision}: only a Hub model id has revisions, not {source}.")
    if path.is_file():
        return from_checkpoint(path, option)
    if path.is_dir():
        return from_folder(path, option)
    if source.endswith(".ckpt") or not is_hub_id(source):
        raise ModelSourceError(
            f"{option} does not exist: it is no file or folder here, nor a Hub model id 'user/name'. Check the "
            f"path, or {WHAT_IT_TAKES}."
        )
    return from_hub(source, revision, option, names[1])


def named(option: str, source: str | Path) -> str:
    """The source as an error names it: after its option, if it has one."""
    return f"{option} {source}" if option else str(source)


def from_checkpoint(path: Path, option: str) -> ModelSource:
    """A checkpoint's UNet (`model.unet` and `image_size` of its hyperparameters) and its noise schedule.

    The UNet has the EMA weights when the checkpoint has them, its raw ones otherwise; the noise schedule holds the
    values its run used.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ModelSourceError(
            f"{option} is not a readable checkpoint ({type(err).__name__}): {WHAT_IT_TAKES}."
        ) from err
    weights = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    unet_weights = {k.removeprefix("unet."): v for k, v in weights.items() if k.startswith("unet.")}
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not unet_weights or not isinstance(hparams, dict) or "image_size" not in hparams:
        raise ModelSourceError(
            f"{option} is not a checkpoint of ddpm-lightning (no unet.* weights and hyperparameters in it): "
            f"{WHAT_IT_TAKES}."
        )
    kwargs = dict(TUTORIAL_UNET if hparams.get("unet") is None else hparams["unet"])
    try:
        unet = UNet2DModel(**{**kwargs, "sample_size": hparams["image_size"]})
        unet.load_state_dict(unet_weights)
        if checkpoint.get("ema") is not None:
            ema = EMAModel(unet.parameters())
            ema.load_state_dict(checkpoint["ema"])
            ema.copy_to(unet.parameters())
    except (TypeError, ValueError, RuntimeError) as err:
        raise ModelSourceError(
            f"{option}: its weights do not fit the UNet its hyperparameters describe ({type(err).__name__}: "
            f"{first_line(err)}); was it written by another version of ddpm-lightning?"
        ) from err
    schedule = {k: hparams[k] for k in NOISE_SCHEDULE if hparams.get(k) is not None}
    rank_zero_only(log.info)(f"Using the {'EMA' if checkpoint.get('ema') is not None else 'raw'} weights of {path}")
    base_model = {"name": f"{path.parent.name}/{path.name}", "source": "checkpoint"}
    return ModelSource(unet.eval(), schedule, base_model, checkpoint)


def from_folder(path: Path, option: str) -> ModelSource:
    """A local folder in either layout: a pipeline (model_index.json, unet/, scheduler/) or a bare UNet."""
    name = path.resolve().name
    if (path / "model_index.json").is_file():
        check_pipeline_unet(json.loads((path / "model_index.json").read_text()), option)
        unet = read_unet(str(path), "unet", None, option)
        has_schedule = (path / "scheduler" / "scheduler_config.json").is_file()
        schedule = DDPMScheduler.load_config(path, subfolder="scheduler") if has_schedule else {}
    elif (path / "config.json").is_file():
        check_unet_config(json.loads((path / "config.json").read_text()), option)
        unet = read_unet(str(path), None, None, option)
        schedule = DDPMScheduler.load_config(path) if (path / "scheduler_config.json").is_file() else {}
    else:
        held = sorted(p.name for p in path.glob("*.ckpt"))[:3]
        hint = f"; it holds {', '.join(held)}: pass one of them" if held else ""
        raise ModelSourceError(
            f"{option} is a folder but not a diffusers model (no model_index.json, no config.json{hint}): "
            f"{WHAT_IT_TAKES}."
        )
    return ModelSource(aligned(unet), dict(schedule), {"name": name, "source": "folder"})


def from_hub(repo_id: str, revision: str | None, option: str, revision_option: str) -> ModelSource:
    """A Hub repo in either layout: a pipeline (model_index.json, unet/, scheduler/) or a bare UNet."""
    try:
        try:
            index = hf_hub_download(repo_id, "model_index.json", revision=revision)
        except LocalEntryNotFoundError:
            raise
        except EntryNotFoundError:
            index = None
        if index is not None:
            check_pipeline_unet(json.loads(Path(index).read_text()), option)
            subfolder: str | None = "unet"
        else:
            try:
                config = hf_hub_download(repo_id, "config.json", revision=revision)
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError as err:
                raise ModelSourceError(
                    f"{option}: the Hub repo holds no diffusers UNet (no model_index.json, no config.json): pick "
                    "an unconditional model, e.g. google/ddpm-cifar10-32."
                ) from err
            check_unet_config(json.loads(Path(config).read_text()), option)
            subfolder = None
        unet = read_unet(repo_id, subfolder, revision, option)
        try:
            schedule = DDPMScheduler.load_config(
                repo_id, subfolder="scheduler" if subfolder else None, revision=revision
            )
        except OSError:
            if subfolder:  # a pipeline has one; a bare UNet repo may not
                raise
            schedule = {}
    except ModelSourceError:
        raise
    except Exception as err:
        raise hub_error(err, repo_id, revision, option, revision_option) from err
    return ModelSource(aligned(unet), dict(schedule), {"name": repo_id, "source": "hub", "revision": revision})


def hub_error(
    err: Exception, repo_id: str, revision: str | None, option: str, revision_option: str
) -> ModelSourceError:
    """One line for a Hub lookup that failed, read from the huggingface_hub error in `err`'s chain."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    found = lambda kind: any(isinstance(e, kind) for e in chain)  # noqa: E731
    if found(RevisionNotFoundError):
        return ModelSourceError(
            f"{revision_option} {revision}: the Hub repo {repo_id} has no such branch, tag or commit."
        )
    if found(RepositoryNotFoundError):
        return ModelSourceError(
            f"{option}: no such model repo on the Hub (a private or gated one needs `hf auth login`): check the "
            "id, or give a local folder or .ckpt."
        )
    if found(LocalEntryNotFoundError) or found(ConnectionError) or is_offline_mode():
        why = "HF_HUB_OFFLINE is set" if is_offline_mode() else "the Hub cannot be reached (HF_HUB_OFFLINE unset)"
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        return ModelSourceError(
            f"{option} is not in the local Hugging Face cache and {why}: download it once where the Hub is "
            f"reachable (`{download}`), then run again; or give a local folder."
        )
    kind = "Hub error" if found(HfHubHTTPError) else type(err).__name__
    return ModelSourceError(f"{option}: could not load it ({kind}: {first_line(err)}).")


def check_pipeline_unet(index: dict, option: str) -> None:
    """A pipeline's model_index.json names a UNet2DModel as its `unet` (as DDPMPipeline's does)."""
    entry = index.get("unet")
    kind = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if kind != "UNet2DModel":
        has = (
            f"its unet is a {kind}"
            if kind
            else f"it has no unet (it holds {', '.join(k for k in index if k[0] != '_')})"
        )
        raise ModelSourceError(
            f"{option}: {has}, not the UNet2DModel of an unconditional DDPM; pick an unconditional model (e.g. "
            "google/ddpm-cifar10-32), or a folder this project saved."
        )


def check_unet_config(config: dict, option: str) -> None:
    """A bare UNet folder's config.json describes a UNet2DModel."""
    if config.get("_class_name") != "UNet2DModel":
        kind = config.get("_class_name") or "no diffusers _class_name"
        raise ModelSourceError(f"{option}: its config.json describes {kind}, not a UNet2DModel; {WHAT_IT_TAKES}.")


def read_unet(location: str, subfolder: str | None, revision: str | None, option: str) -> UNet2DModel:
    """The UNet at `location` (a folder or a Hub id); a local one that cannot be read names the missing file."""
    try:
        return UNet2DModel.from_pretrained(location, subfolder=subfolder, revision=revision)
    except OSError as err:
        if not Path(location).exists():
            raise  # a Hub lookup: hub_error words it
        where = Path(location, subfolder or "")
        weights = [where / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
        missing = [] if (where / "config.json").is_file() else ["config.json"]
        missing += [] if any(p.is_file() for p in weights) else ["diffusion_pytorch_model.safetensors (or .bin)"]
        fix = (
            f"it needs {' and '.join(missing)}"
            if missing
            else "its files are there, so one is truncated or corrupt: save or export the model again"
        )
        raise ModelSourceError(f"{option}: cannot read the UNet in {where} ({first_line(err)}): {fix}.") from err


def aligned(unet: UNet2DModel) -> UNet2DModel:
    """The UNet with its weights copied out of safetensors' memory map.

    The map's tensors may sit at unaligned addresses: CPU kernels then take other code paths and round
    differently, and a saved folder would not sample exactly as the checkpoint it was saved from.
    """
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.data = parameter.data.clone()
    return unet.eval()


def fitted_architecture(found: ModelSource, configured: dict[str, Any] | None, image_size: int) -> dict[str, Any]:
    """The pretrained UNet's architecture, which replaces `model.unet`, for a run at `image_size`.

    One line names what differs from `model.unet`; one warning says when the model was trained at another size (a
    UNet is convolutional, it trains).
    """
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


def check_resumed(then: str | None, now: str | None) -> None:
    """Refuse a `--model.pretrained` that the resumed checkpoint's run did not start from.

    A resumed run goes on from its checkpoint's weights: such a model would be loaded and then silently replaced.
    """
    if now is not None and now != then:
        was = f"was fine-tuned from {then}" if then is not None else "was not fine-tuned"
        raise ModelSourceError(
            f"--model.pretrained {now} with --ckpt_path: the checkpoint's run {was}, and a resumed run goes on from "
            f"its checkpoint's weights. To fine-tune from {now}, start a new run (another --output_dir, no "
            "--ckpt_path); to resume, leave --model.pretrained as the run had it."
        )
