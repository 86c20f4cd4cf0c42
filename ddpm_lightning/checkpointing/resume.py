"""What a resume needs beyond Lightning's own state, and what it checks.

The RNG states (`RNGStates`), the data a run trained on (`SameData`), and a `--ckpt_path` that can be resumed from
(`check_ckpt_path`).
"""

from __future__ import annotations

import math
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class RNGStates(Callback):
    """The torch, CUDA, numpy and Python RNG states in every checkpoint, restored on resume.

    They are saved in types `torch.load(weights_only=True)` accepts. Lightning keeps none, and with them the noise,
    timestep and flip draws continue.
    """

    def state_dict(self) -> dict[str, Any]:
        """The RNG states now."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, states: dict[str, Any]) -> None:
        """Set the RNG states saved."""
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(states["python"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states of a 0.1.0 checkpoint, saved at its top level."""
        if "rng_states" in checkpoint:  # a 0.1.0 checkpoint: the module saved them at the top level
            self.load_state_dict(checkpoint["rng_states"])


FRESH_START = "To start the run again from step 0 instead: leave --ckpt_path out and pass --overwrite true."


class SameData(Callback):
    """A resume that changes the run's data says so.

    A checkpoint records its run's data settings (Lightning keeps the data module's hyperparameters) and the number
    of training images. Another image size is refused: the UNet was trained at one size, and its saved folder says
    which. Any other change (the data set, the batch size, images added or removed, ...) goes on with one warning
    naming it: from there on, the images come in another order than in the uninterrupted run, so it no longer
    equals that run. So does a resume on another number of processes (devices x nodes), whose warning names what
    that changes: the global batch, the steps of an epoch, the order. `validate` trains nothing: it warns only when
    its held-out images are not those of the run (which had some). On load, it also drops Lightning's loader position
    where the data module's own state replaces it (`drop_loader_end`).
    """

    def __init__(self) -> None:
        self.saved_layout: dict | None = None  # the checkpoint's data_layout, compared once training starts

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Record the number of training images and the data's layout over the processes."""
        images = train_images(trainer)
        if images is not None:
            checkpoint["train_images"] = images
        checkpoint["data_layout"] = data_layout(trainer)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Refuse another image size; warn of other data settings or training images."""
        self.saved_layout = checkpoint.get("data_layout")
        drop_loader_end(trainer, checkpoint)
        then = checkpoint.get("datamodule_hyper_parameters") or {}
        now = dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {}
        if "image_size" in then and then["image_size"] != now.get("image_size", then["image_size"]):
            raise ValueError(
                f"The checkpoint was trained at data.image_size {then['image_size']}, not {now['image_size']}: a "
                f"resumed run keeps its image size (resume with --data.image_size {then['image_size']}). To train "
                "at another size, start a new run (another --output_dir)."
            )
        if trainer.state.fn != "fit":  # validate trains nothing: only other held-out images change its result
            keys = HELD_OUT + (("dataset",) if now.get("val_fraction") else ())  # (a share of the data set)
            held_out = [f"{key} {then.get(key)!r} -> {now.get(key)!r}" for key in keys if then.get(key) != now.get(key)]
            if held_out and any(then.get(key) for key in HELD_OUT):  # (a run without any: nothing to compare)
                rank_zero_warn(
                    f"Validating on other held-out images than the checkpoint's run ({'; '.join(held_out)}): its "
                    "val/ metrics are not comparable to the run's."
                )
            return
        changed = [
            f"{key} {then[key]!r} -> {now[key]!r}"
            for key in sorted(then)
            if key in now and key not in WHERE_DECODED and then[key] != now[key]
        ]
        images = train_images(trainer)
        if "train_images" in checkpoint and images is not None and checkpoint["train_images"] != images:
            changed.append(f"{checkpoint['train_images']} -> {images} training images")
        if changed:
            rank_zero_warn(
                f"Resuming with other data than the checkpoint's run ({'; '.join(changed)}): training goes on with "
                "it, but the images now come in another order than in the uninterrupted run, so the result will not "
                "equal that run's."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn of a resume on another number of processes, naming what that changes."""
        # (here, not on load: the steps of an epoch are known once the loader is built)
        then, self.saved_layout = self.saved_layout, None
        if not then or then["world_size"] == trainer.world_size:
            return
        now = data_layout(trainer)
        changes = [
            f"the global batch is {now[key]} images instead of {then[key]}" if key == "global_batch" else
            f"an epoch is {now[key]} optimizer steps instead of {then[key]}"
            for key in ("global_batch", "steps_per_epoch") if key in then and key in now and then[key] != now[key]
        ]  # fmt: skip
        rank_zero_warn(
            f"Resuming on {now['world_size']} processes (devices x nodes) a run saved on {then['world_size']}: "
            + "".join(f"{change}, " for change in changes)
            + "and the images now come in another order than in the uninterrupted run (prepared shards: the epoch "
            "underway goes on with its remaining images, each once; other data: that epoch is drawn again from "
            "the new split, so some images may come twice in it and others not at all), so the result will not equal "
            "that run's. To continue exactly, resume on the checkpoint's number of processes."
        )


def drop_loader_end(trainer: Trainer, checkpoint: dict) -> None:
    """Drop Lightning's loader position from a checkpoint saved after its epoch's last batch was drawn.

    The data module's state then starts the next epoch afresh (ImageDataModule.state_dict). Lightning's position is
    the loader's end, which it applies after that wherever it builds the loader once its loops are restored (runs
    with max_epochs -1): resumed from it, the next epoch would have no batches, and the run would skip to the one
    after, in another order than the uninterrupted run.
    """
    saved = checkpoint.get(type(trainer.datamodule).__qualname__) if trainer.datamodule is not None else None
    if isinstance(saved, dict) and "epoch" in saved and "train_loader" not in saved:
        checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).pop("combined_loader", None)


def data_layout(trainer: Trainer) -> dict[str, int]:
    """How the run's batches are laid out over its processes: the world size, and what follows from it."""
    layout = {"world_size": trainer.world_size}
    hparams = getattr(trainer.datamodule, "hparams", None) or {}
    if "train_batch_size" in hparams:
        layout["global_batch"] = hparams["train_batch_size"] * trainer.world_size * trainer.accumulate_grad_batches
    batches = trainer.num_training_batches
    if math.isfinite(batches):
        layout["steps_per_epoch"] = math.ceil(batches / trainer.accumulate_grad_batches)
    return layout


HELD_OUT = ("val_dataset", "val_split", "val_fraction")  # the data settings that choose the held-out images
WHERE_DECODED = ("cache_dir", "cache_disk_gb")  # where decoded pixels are kept, not which: the same images


def train_images(trainer: Trainer) -> int | None:
    """The number of training images, where the data module knows it."""
    prepared = getattr(trainer.datamodule, "prepared", None)  # streamed shards: their count (len is per rank)
    if prepared:
        return prepared["images"]
    images = getattr(trainer.datamodule, "train_set", None)
    return len(images) if images is not None else None


def check_ckpt_path(
    ckpt_path: str | None,
    checkpoint: ModelCheckpoint | None,
    max_epochs: int | None = None,
    restarts_without_ckpt_path: bool = False,
) -> None:
    """Fail before training, with the fix, where Lightning would start from scratch or fail deep inside torch.load.

    Lightning starts from scratch on a `last` that is missing or points at nothing; it fails inside torch.load on a
    truncated file or a checkpoint past `max_epochs`. Where the run saved nothing to resume and the plain command
    (no --ckpt_path) starts it again (`restarts_without_ckpt_path`: run_folder.saved_nothing), that is the fix named.
    """
    if ckpt_path is None or "://" in ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        if checkpoint is None:  # not known yet: checked again once the Trainer exists
            return
        folder = Path(checkpoint.dirpath) if checkpoint.dirpath else None
        found = [p for p in folder.glob("last*.ckpt") if LAST.match(p.name)] if folder and folder.is_dir() else []
        if not found and not (folder and folder.is_dir() and any(folder.glob("*.ckpt"))):
            plain = restarts_without_ckpt_path
            raise FileNotFoundError(
                f"--ckpt_path last: there is no checkpoint in {folder or 'the checkpoint folder'} to resume from: the "
                "run saved none (one stopped before its first checkpoint, after --checkpoint.train_time_interval of "
                "training, has none), or they were deleted. Give --checkpoint.dirpath if the run kept its checkpoints "
                "elsewhere. "
                + ("Leave --ckpt_path out to start it again from step 0 (nothing trained is lost)." if plain else "")
                + ("" if plain else FRESH_START)
            )
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last.ckpt in {folder or 'the checkpoint folder'} to resume from. "
                "Give the checkpoint's path (or --checkpoint.dirpath, if the run kept its checkpoints elsewhere). "
                + FRESH_START
            )
        existing = [p for p in found if p.exists()]
        if not existing:  # a link whose file was deleted or never written
            link = found[0]
            raise FileNotFoundError(
                f"--ckpt_path last: {link} points at {os.readlink(link) if link.is_symlink() else '?'}, which "
                f"does not exist. Resume from another checkpoint in {folder} by its path, if there is one. "
                + FRESH_START
            )
        latest = max(existing, key=lambda p: p.stat().st_mtime)  # the one Lightning picks
        ckpt_path = f"last ({latest} -> {latest.resolve()})" if latest.is_symlink() else f"last ({latest})"
        path = latest.resolve()
    else:
        path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file.")
    try:  # a checkpoint is a zip archive; a truncated one has lost its central directory at the end
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is not a readable checkpoint ({err}): it is truncated or corrupt. "
            "Resume from another checkpoint by its path (an epoch=*.ckpt beside it, if there is one). " + FRESH_START
        ) from err
    try:  # (memory-mapped: no tensor is read) a plain torch.save of weights is no checkpoint to resume
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # objects weights_only refuses: left to Lightning's own loading
        return
    if not isinstance(content, dict) or "pytorch-lightning_version" not in content:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no pytorch-lightning_version: a plain "
            "torch.save?). Give a .ckpt written by `ddpm-lightning fit` (its checkpoint folder's last.ckpt)."
        )
    epoch = epochs_done(content)
    if max_epochs is not None and max_epochs >= 0 and epoch is not None and epoch > max_epochs:  # (as Lightning)
        raise ValueError(
            f"--trainer.max_epochs {max_epochs}: the checkpoint {ckpt_path} is at epoch {epoch} (step "
            f"{content.get('global_step')}; epochs count from 0), past that end. To train on, resume with a larger "
            "--trainer.max_epochs (or -1, with --trainer.max_steps)."
        )


def epochs_done(content: dict) -> int | None:
    """The epoch a checkpoint is at: the trainer's current_epoch once it is restored."""
    try:
        return int(content["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"])
    except (KeyError, TypeError, ValueError):
        return None


LAST = re.compile(r"^last(-\d+)?\.ckpt$")  # the names Lightning's `--ckpt_path last` looks for
