"""The model folder a run saves and `export` writes: `DDPMPipeline.save_pretrained`'s files, swapped in atomically.

`save_pipeline` writes it; `DDPMPipeline.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from safetensors import SafetensorError

from ..files import PARTIAL, why_not_written


class ModelWriteError(OSError):
    """The model folder could not be written (a full disk, ...); each file in it is whole, old or new."""


def save_pipeline(unet: UNet2DModel, scheduler: SchedulerMixin, folder: str | Path) -> None:
    """`DDPMPipeline(unet, scheduler).save_pretrained(folder)`, written beside and swapped in.

    The new files go to a hidden folder inside `folder`, then each replaces its old self in one rename (the weights
    first, model_index.json last). A kill at any moment leaves each file whole, old or new, and the folder a
    loadable model.
    """
    folder = Path(folder)
    staging = folder / f".model{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", p.name))
        for new in files:
            with open(new, "rb") as f:
                os.fsync(f.fileno())  # on disk before any rename
        for new in sorted(files, key=lambda p: p.name == "model_index.json"):
            destination = folder / new.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(new, destination)
    except (OSError, SafetensorError) as err:  # (safetensors reports a full disk as its own error)
        raise ModelWriteError(f"Cannot write the model to {folder} ({why_not_written(folder, err)})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
