"""The training data: `ImageDataModule`, its resumable order (`EpochOrder`) and its per-batch flip and scaling.

A source resolved by sources.py, decoded and resized once (images.py) into memory or the machine's shared cache
(shared_cache.py), or by loader workers every epoch, or streamed from prepared shards (shards.py); flipped and scaled
per batch on the device, in a resumable loader.

    ddpm-lightning fit -c configs/butterflies.yaml --data.dataset path/to/my/photos
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..sources import Split, image_column_of, load_source, training_and_validation
from ..unet import to_model_range
from . import shards, shared_cache
from .images import (
    MAX_ASPECT,
    CachedImages,
    Crop,
    ResizedImages,
    Strips,
    decode_all,
    decoded_bytes,
    random_crop,
    should_cache,
)


def default_num_workers() -> int:
    """One loader worker per CPU core this process may use, at most 8 (decoding a JPEG is the loader's work)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


FALLBACK_FRACTION = 0.1  # held out of a data set trained in place of the one val_dataset belongs to


def same_source(a: str | None, b: str | None) -> bool:
    """Whether two `dataset` values name the same source (a local path however written, else the same string)."""
    if a is None or b is None:
        return a is b
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() or path_b.exists():
        return path_a.resolve() == path_b.resolve()
    return a.rstrip("/") == b.rstrip("/")


class EpochOrder(DistributedSampler):
    """The training loader's torch Sampler: DistributedSampler (order = f(seed, epoch), one slice per rank).

    Lightning sets the epoch before each epoch's iteration starts; a resumed run sets it from the checkpoint
    (ImageDataModule.load_state_dict), because Lightning first iterates the loader before it restores its own epoch
    count.
    """

    def __init__(self, dataset: Dataset, trainer: Trainer | None, seed: int) -> None:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class Indexed(Dataset):
    """(index, item) pairs: validation noise is seeded by the image's index, so it is the same every epoch."""

    def __init__(self, images: ResizedImages | CachedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        """The number of images."""
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | Strips]:
        """Image i, with its index."""
        return i, self.images[i]


def as_batch(batch: torch.Tensor | Strips) -> torch.Tensor | Strips:
    """collate_fn for CachedImages: its __getitems__ already returns the whole batch."""
    return batch


def augment(batch: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """The tutorial's RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5]) on a uint8 batch, on its device."""
    images = to_model_range(batch)
    if not flip:
        return images
    flipped = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


class ImageDataModule(LightningDataModule):
    """Training images for a DDPM.

    Args:
        dataset: a Hub data set id, a local image folder, a local Hub-format data set or a `save_to_disk` folder;
            or shards made by `ddpm-lightning prepare` (a folder or an s3:// / gs:// URL), streamed (shards.py).
        split: the split to train on, for data sets that have splits.
        image_column: the column holding the images; found from the features when left out.
        image_size: side of the square training images; also the UNet's sample_size (linked by the CLI).
        crop: how a photo becomes a square. squash: resize to image_size x image_size, distorting wide photos
            (the tutorial's Resize). center: resize the short side to image_size and keep the middle square
            (train_unconditional.py's --center_crop). random: resize the short side to image_size and take a
            new random square each epoch (RandomCrop), cut on the device per batch; sides longer than
            2 x image_size are first trimmed to their middle. Validation images are center-cropped then.
        random_flip: flip half of each batch left-right (the tutorial's RandomHorizontalFlip).
        train_batch_size: images per batch on each device.
        val_batch_size: held-out images per validation batch on each device (`train_batch_size` when left out).
            Validation keeps no activations for a backward pass, so larger batches fit; on a CPU they also cost
            less per image (2.5 times less at 200 than at 16 for configs/tiny.yaml's UNet, which takes its 200
            held-out photos at once).
        num_workers: loader processes per device; one per available core, at most 8, by default.
        cache: decode and resize every image once and keep the uint8 pixels in memory ("auto": when they
            take at most `cache_max_gb`). Unreadable images are then skipped with a counted warning.
            Without the cache, images are decoded by `num_workers` processes every epoch.
        cache_max_gb: the size cap for `cache: auto`.
        cache_dir: where the cached pixels are kept, memory-mapped by every process of the machine and reused by
            later runs on the same images, size and crop (shared_cache.py); ~/.cache/ddpm_lightning/decoded
            ($XDG_CACHE_HOME) by default.
        cache_disk_gb: the most `cache_dir` keeps, the least recently used deleted first; 0: none, each process
            decodes into its own memory.
        cache_on_gpu: keep the cached pixels on the training GPU (no copy per batch); by default when training
            on a GPU.
        val_dataset, val_split: held-out images for the validation loss and FID/KID (any source `dataset` takes).
        val_fraction: or hold out this fraction of `dataset` instead (a fixed, seeded split).
        val_dataset_of: the training data set `val_dataset` holds images out of (configs/tiny.yaml's split of its
            photos). When `dataset` names another one and `val_dataset` is still this one, its images are no
            reference for what is trained: a seeded `val_fraction` of `dataset` (10% when it is 0) is held out
            instead, and the log says so. A `val_dataset` other than `val_dataset_of` is always used.
    """

    channels = 3  # every image is made RGB (`_to_rgb`): what the model takes and predicts

    def __init__(
        self,
        dataset: str = "huggan/smithsonian_butterflies_subset",
        split: str = "train",
        image_column: str | None = None,
        image_size: int = 128,
        crop: Crop = "squash",
        random_flip: bool = True,
        train_batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int | None = None,
        cache: Literal["auto", "memory", "none"] = "auto",
        cache_max_gb: float = 4.0,
        cache_dir: str | None = None,
        cache_disk_gb: float = 20.0,
        cache_on_gpu: bool | None = None,
        val_dataset: str | None = None,
        val_split: str = "train",
        val_fraction: float = 0.0,
        val_dataset_of: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.train_set: ResizedImages | CachedImages | None = None
        self.val_set: Indexed | None = None
        self.resume_state: dict | None = None  # the training loader's state from a checkpoint, applied once
        self.prepared: dict | None = None  # the settings of prepared shards, when `dataset` names them
        self.reference = "none"  # what the held-out images are, for every report (`reference_name`)

    def setup(self, stage: str) -> None:
        """Resolve the data, then cache or stream it (once: the datasets are kept)."""
        if self.train_set is not None:
            return
        hp = self.hparams
        val_dataset, val_fraction = self.held_out()
        if shards.is_prepared(hp.dataset):
            self.setup_shards(val_dataset)
            return
        train, val = training_and_validation(
            hp.dataset, hp.split, hp.image_column, val_dataset, hp.val_split, val_fraction
        )
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        on_gpu = hp.cache_on_gpu if hp.cache_on_gpu is not None else device.type == "cuda"
        self.train_set = self.images(train, hp.crop, device if on_gpu else None)
        val_crop: Crop = "center" if hp.crop == "random" else hp.crop  # the same input every epoch
        self.val_set = None if val is None else Indexed(self.images(val, val_crop, None))
        if val_dataset is not None:
            self.reference = f"{val_dataset} (split {hp.val_split!r})"
        elif val is not None:
            self.reference = f"a seeded {val_fraction:.0%} of {hp.dataset} (split {hp.split!r})"

    def held_out(self) -> tuple[str | None, float]:
        """The (val_dataset, val_fraction) that hold out images of the data set trained (`val_dataset_of`)."""
        hp = self.hparams
        tied, val_dataset = hp.val_dataset_of, hp.val_dataset
        if tied is None or val_dataset is None or same_source(tied, hp.dataset) or not same_source(tied, val_dataset):
            return val_dataset, hp.val_fraction
        fraction = hp.val_fraction or FALLBACK_FRACTION
        instead = (
            "no images are held out (prepared shards: name them with --data.val_dataset)"
            if shards.is_prepared(hp.dataset)
            else f"a seeded {fraction:.0%} of {hp.dataset} is held out instead"
        )
        rank_zero_info(
            f"--data.val_dataset {val_dataset} holds out images of {tied} (data.val_dataset_of), not of the "
            f"--data.dataset trained, {hp.dataset}: {instead}. Name other held-out images with --data.val_dataset."
        )
        return None, fraction

    def reference_name(self) -> str:
        """The held-out images, as every report names them: their source and how many."""
        if self.val_set is None:
            return "none"
        return f"{len(self.val_set)} held-out images: {self.reference}"

    def setup_shards(self, val_dataset: str | None) -> None:
        """Stream prepared shards (resized at preparation: this run's size and crop must be theirs).

        Validation images come from `val_dataset`, any source.
        """
        hp = self.hparams
        if hp.val_fraction and hp.val_dataset == val_dataset:
            raise ValueError(
                f"--data.val_fraction cannot hold out images of prepared shards ({hp.dataset}): name the held-out "
                "images with --data.val_dataset instead (a folder or a data set, not shards)."
            )
        if shards.is_prepared(val_dataset):
            raise ValueError(f"--data.val_dataset {val_dataset} names shards: give a folder or a data set instead.")
        self.prepared = shards.check_settings(hp.dataset, hp.image_size, hp.crop)
        rank_zero_info(f"Streaming {self.prepared['images']} training images of {hp.image_size} px from {hp.dataset}.")
        # The order is f(seed, epoch) on every rank: the seed Lightning's seed_everything gave every process.
        self.train_set = shards.stream(hp.dataset, torch.initial_seed() % 2**32)
        if val_dataset is not None:
            rows = load_source(val_dataset, hp.val_split, "--data.val_dataset")
            val = Split(rows, image_column_of(rows, hp.image_column))
            rank_zero_info(f"Found {len(rows)} validation images in {val_dataset} (split {hp.val_split!r}).")
            val_crop: Crop = "center" if hp.crop == "random" else hp.crop
            self.val_set = Indexed(self.images(val, val_crop, None))
            self.reference = f"{val_dataset} (split {hp.val_split!r})"

    def images(self, split: Split, crop: Crop, cache_device: torch.device | None) -> ResizedImages | CachedImages:
        """The split's images, resized; cached (on `cache_device`, if given) when `cache` says so."""
        images = ResizedImages(split.rows, split.column, self.hparams.image_size, crop)
        if not should_cache(images, self.hparams.cache, self.hparams.cache_max_gb):
            return images
        cached = CachedImages(self.decoded(images))
        return cached.to(cache_device) if cache_device is not None else cached

    def decoded(self, images: ResizedImages) -> torch.Tensor | Strips:
        """`decode_all`'s pixels, from the machine's shared cache or, with `cache_disk_gb` 0, this process's own.

        One process of the machine decodes them into the shared cache and all map it (shared_cache.py).
        """
        hp = self.hparams
        if hp.cache_disk_gb <= 0:
            return decode_all(images, self.num_workers, self.trainer)
        folder = Path(hp.cache_dir).expanduser() if hp.cache_dir else shared_cache.default_dir()
        name = shared_cache.key(images.rows, images.column, images.image_size, images.crop, MAX_ASPECT)
        decoded_here = False

        def decode() -> list[torch.Tensor]:
            nonlocal decoded_here
            decoded_here = True
            pixels = decode_all(images, self.num_workers, self.trainer)
            return list(pixels) if isinstance(pixels, Strips) else [pixels]

        parts, path = shared_cache.load_or_make(folder, name, decoded_bytes(images), hp.cache_disk_gb, decode)
        pixels = Strips(*parts) if images.crop == "random" else parts[0]
        if path is not None and not decoded_here:
            kept = len(parts[0])
            if kept < len(images):  # (decode_all named some of them, in the run or process that decoded them)
                rank_zero_warn(f"Skipped {len(images) - kept} of {len(images)} images that could not be read.")
            rank_zero_info(f"Read {kept} decoded images of {images.image_size} px from the cache {path}.")
        elif path is not None:
            rank_zero_info(f"Stored them in {path}: this machine's other processes and later runs read them there.")
        return pixels

    def train_dataloader(self) -> StatefulDataLoader | DataLoader:
        """The resumable training loader, in the epoch's order; applies a checkpoint's loader state once."""
        assert self.train_set is not None, "setup('fit') comes first"
        if self.prepared is not None:
            return self.shards_loader()
        cached = isinstance(self.train_set, CachedImages)
        cached_on_gpu = isinstance(self.train_set, CachedImages) and self.train_set.tensor.is_cuda
        workers = 0 if cached else self.num_workers  # cached batches are a memory copy: no processes needed
        # The shuffle order of epoch e is a function of (seed, e) alone, on one device or many, and the loader
        # is stateful (Lightning checkpoints its position): a run resumed mid-epoch sees exactly the batches
        # it would have seen, and its own generator keeps the loader from drawing on the global RNG.
        seed = torch.initial_seed()
        loader = StatefulDataLoader(
            self.train_set,
            batch_size=self.hparams.train_batch_size,
            sampler=EpochOrder(self.train_set, self.trainer, seed),  # torch's Sampler: the order
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and not cached_on_gpu,
            generator=torch.Generator().manual_seed(seed),
            # Cached: one indexing op per batch (CachedImages.__getitems__). Streamed random crops: strips.
            collate_fn=as_batch if cached else Strips.collate if self.hparams.crop == "random" else None,
        )
        if self.resume_state:  # see state_dict
            state, self.resume_state = self.resume_state, None
            if "epoch" in state:  # (absent when the checkpoint's run streamed shards)
                loader.sampler.set_epoch(state["epoch"])
            if "train_loader" in state:
                loader.load_state_dict(state["train_loader"])
        return loader

    def shards_loader(self) -> DataLoader:
        """LitData's loader over the streamed shards, resumed as `state_dict` says.

        Its order and state are LitData's own.
        """
        loader = shards.loader(
            self.train_set,
            self.hparams.train_batch_size,
            self.num_workers,
            collate_fn=Strips.collate if self.hparams.crop == "random" else None,
            pin_memory=torch.cuda.is_available(),
        )
        if self.resume_state:
            state, self.resume_state = self.resume_state, None
            if "stream" in state:  # (absent when the checkpoint's run read another kind of data)
                loader.load_state_dict(state["stream"])
        return loader

    def state_dict(self) -> dict:
        """The epoch whose order the loader is in and its position in it.

        Saved in every checkpoint, it is applied when the loader is built. Lightning checkpoints the position too,
        but applies it only when it builds the loader after restoring its loops, which it does not when the
        schedule's length was estimated first (any run with max_epochs), and it draws the first batch before it
        sets the sampler's epoch. Where it does apply it, its position at an epoch's end is dropped on resume
        (checkpointing.resume.drop_loader_end): this state starts the next epoch instead.
        """
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        if self.prepared is not None and loader is not None:  # LitData's own state: the epoch, the images drawn
            return {"stream": loader.state_dict()}
        if not isinstance(loader, StatefulDataLoader) or not isinstance(loader.sampler, EpochOrder):
            return {}
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches:
            return {"epoch": loader.sampler.epoch + 1}  # the epoch's batches are all drawn: the next starts afresh
        return {"epoch": loader.sampler.epoch, "train_loader": loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the loader's state, applied when the training loader is built."""
        self.resume_state = state_dict or None

    def val_dataloader(self) -> DataLoader | list:
        """The held-out images' loader, or none (an empty list) when there are none."""
        if self.val_set is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":
                raise ValueError("No validation images: set --data.val_dataset or --data.val_fraction.")
            return []  # fit without held-out images: no validation (the CLI also sets limit_val_batches=0)
        cached = isinstance(self.val_set.images, CachedImages)
        workers = 0 if cached else self.num_workers
        # Its own generator, as the training loader's: a validation draws nothing from the global RNG, so a run
        # validated at a step where another was not (a run's end, a due measurement) trains on exactly as that one.
        generator = torch.Generator().manual_seed(0)
        batch_size = self.hparams.val_batch_size or self.hparams.train_batch_size
        return DataLoader(self.val_set, batch_size=batch_size, num_workers=workers, generator=generator)

    def on_after_batch_transfer(
        self, batch: torch.Tensor | Strips | list[torch.Tensor], dataloader_idx: int
    ) -> torch.Tensor | Strips | list[torch.Tensor]:
        """Crop, flip and scale a training batch on its device; a validation batch goes on as it is."""
        # Training batches are uint8 images (or strips to crop): crop, flip and scale them here, on the device.
        # Validation batches are (index, uint8 images): the module scales them itself, unflipped, with noise
        # fixed per index.
        if isinstance(batch, Strips):
            batch = random_crop(batch)
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8:
            return augment(batch, self.hparams.random_flip)
        return batch

    def preview(self, n: int = 16) -> torch.Tensor:
        """The first n training images as the model sees them, before the flip: uint8 (n, 3, size, size).

        With `crop: random`, a random crop drawn with its own seeded generator (the training RNG is untouched).
        """
        assert self.train_set is not None, "setup('fit') comes first"
        first = range(min(n, len(self.train_set)))
        if isinstance(self.train_set, CachedImages):
            batch = self.train_set.__getitems__(list(first))
        else:
            images = (
                shards.first_images(self.hparams.dataset, n) if self.prepared else [self.train_set[i] for i in first]
            )
            batch = Strips.collate(images) if self.hparams.crop == "random" else torch.stack(images)
        if isinstance(batch, Strips):
            batch = random_crop(Strips(*(part.cpu() for part in batch)), torch.Generator().manual_seed(0))
        return batch.cpu()
