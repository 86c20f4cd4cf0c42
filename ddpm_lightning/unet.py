"""The model layer's description of the network: the UNet, its noise schedule, its call and its checks.

The tutorial's UNet (`TUTORIAL_UNET`), building one for an image size (`build_unet`), the noise schedule it is
trained with (`noise_schedule`), its call (`predict`), the range of its images (`to_model_range`) and the checks on
a UNet that would otherwise fail deep inside diffusers (`check_norm_groups`, `check_channels`).

    >>> unet = build_unet({**TUTORIAL_UNET, "block_out_channels": [32, 32, 64, 64, 64, 64]}, 64)
    >>> noise_schedule({"beta_schedule": "squaredcos_cap_v2"}, {}).config.num_train_timesteps
    1000

Where a model comes from (a checkpoint, a saved folder, a Hub id) is model_source.py's.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel

# The tutorial's UNet ("Train a diffusion model"): 6 levels, attention in the 5th down and 2nd up block.
TUTORIAL_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# DDPMScheduler's arguments that make the noise schedule (and so the maths): set, pretrained or default.
NOISE_SCHEDULE = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")

PredictionType = Literal["epsilon", "v_prediction", "sample"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def build_unet(unet: dict[str, Any], image_size: int) -> UNet2DModel:
    """UNet2DModel(**unet) for square images of `image_size`.

    It refuses, in one line, a key UNet2DModel does not take (naming the nearest) and a size its down blocks cannot
    halve.
    """
    unet_kwargs = dict(unet)
    if "sample_size" in unet_kwargs and unet_kwargs["sample_size"] != image_size:
        raise ValueError(
            f"unet.sample_size={unet_kwargs['sample_size']} differs from image_size={image_size}: "
            "leave unet.sample_size out, it follows data.image_size."
        )
    unet_kwargs["sample_size"] = image_size
    known = inspect.signature(UNet2DModel.__init__).parameters
    unknown = sorted(k for k in unet_kwargs if k not in known and not k.startswith("_"))  # (_: a saved config's)
    if unknown:
        nearest = difflib.get_close_matches(unknown[0], [k for k in known if k != "self"], n=1)
        hint = f"did you mean model.unet.{nearest[0]}?" if nearest else "see diffusers' UNet2DModel."
        raise ValueError(f"model.unet.{unknown[0]}: UNet2DModel has no such argument; {hint}")
    default_blocks = known["down_block_types"].default
    levels = len(unet_kwargs.get("down_block_types", default_blocks))
    if image_size % 2 ** (levels - 1):
        factor = 2 ** (levels - 1)
        raise ValueError(
            f"image_size={image_size} cannot be halved {levels - 1} times by the UNet's {levels} down blocks: "
            f"use a multiple of {factor} (e.g. {max(factor, image_size // factor * factor)}), or fewer blocks."
        )
    return UNet2DModel(**unet_kwargs)


def noise_schedule(chosen: dict[str, Any], pretrained: dict[str, Any]) -> DDPMScheduler:
    """DDPMScheduler with each key of `chosen` set to its value, else to the `pretrained` config's, else the default.

    A value of None in `chosen` falls back to the `pretrained` scheduler config's, else to DDPMScheduler's default.
    All are passed by name, so that samplers built from this config (sampling.make_sampler) take them, not their
    own defaults.
    """
    known = inspect.signature(DDPMScheduler.__init__).parameters
    base = {k: v for k, v in pretrained.items() if k in known}
    chosen = {k: v if v is not None else base.get(k, known[k].default) for k, v in chosen.items()}
    return DDPMScheduler(**{**base, **chosen})


def schedule_changes(chosen: dict[str, Any], pretrained: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys `chosen` sets to another value than the `pretrained` scheduler's: {key: (pretrained's, chosen)}.

    A key the pretrained config leaves out has DDPMScheduler's default; None in `chosen` keeps the pretrained one.
    """
    known = inspect.signature(DDPMScheduler.__init__).parameters
    theirs = {k: pretrained.get(k, known[k].default) for k in chosen}
    return {k: (theirs[k], v) for k, v in chosen.items() if v is not None and v != theirs[k]}


def predict(unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's output tensor for noisy images at their timesteps (diffusers' call, without its output class)."""
    return unet(sample, timesteps, return_dict=False)[0]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as the UNet takes them: floats in [-1, 1] (the tutorial's ToTensor + Normalize([0.5], [0.5]))."""
    return images.to(torch.float32, copy=True).div_(127.5).sub_(1.0)  # (a copy: the batch itself stays uint8)


def architecture(unet: UNet2DModel) -> dict[str, Any]:
    """`unet`'s constructor arguments as plain JSON values, less sample_size (it follows data.image_size)."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "sample_size"}
    return json.loads(json.dumps(config))


def check_norm_groups(unet: dict | None) -> None:
    """GroupNorm splits each block's channels into norm_num_groups groups: say so before diffusers fails on it."""
    if not isinstance(unet, dict):
        return
    defaults = inspect.signature(UNet2DModel.__init__).parameters
    channels = list(unet.get("block_out_channels", defaults["block_out_channels"].default))
    groups = unet.get("norm_num_groups", defaults["norm_num_groups"].default)
    if groups and any(c % groups for c in channels):
        raise ValueError(
            f"--model.unet: block_out_channels {channels} are not all multiples of norm_num_groups {groups} (each "
            f"block's channels are split into that many groups): use multiples of {groups}, or set "
            f"unet.norm_num_groups to a divisor of all of them (e.g. {math.gcd(*channels)})."
        )


def check_channels(unet: UNet2DModel, channels: int | None, base_model: dict[str, Any] | None) -> None:
    """The UNet takes and predicts images of the data's channel count (noise of the image's shape).

    Checked when the data module says it (ImageDataModule's `channels`: RGB).
    """
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
