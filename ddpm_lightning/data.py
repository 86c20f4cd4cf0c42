"""Where images come from: one `ImageDataModule` for Hub data sets, local Hub-format data sets and image folders.

    ddpm-lightning fit -c configs/butterflies.yaml --data.dataset path/to/my/photos

`dataset` is resolved in this order:
1. a `save_to_disk` folder (it holds `dataset_info.json` or `dataset_dict.json`) -> `datasets.load_from_disk`;
2. a local folder or file of Hub-format data (parquet, arrow, csv, json) -> `datasets.load_dataset`, the same
   call a Hub id goes through;
3. any other local folder -> every image file under it, nested folders included, whatever the file names
   (`imagefolder` would move `test_*` / `val_*` files into other splits and silently train on fewer);
4. anything else is a Hub data set id -> `datasets.load_dataset(id, split=split)`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

# Files PIL can open, by extension (lower case). Everything else under an image folder is ignored.
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
HUB_DATA_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def default_num_workers() -> int:
    """One loader worker per CPU core this process may use, at most 8 (decoding a JPEG is the loader's work)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def find_images(folder: Path) -> list[str]:
    """Every image file under `folder`, following links to folders (each real folder once: no cycles). Files of
    other types are counted and a few named in one warning (hidden files such as .DS_Store are not)."""
    images, others, seen = [], [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            dirs.clear()
            continue
        seen.add(real)
        for name in files:
            path = os.path.join(root, name)
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
                images.append(path)
            elif not name.startswith("."):
                others.append(os.path.relpath(path, folder))
    if others and images:
        rank_zero_warn(
            f"Skipped {len(others)} file(s) under {folder} that are not a supported image type, e.g. "
            f"{', '.join(sorted(others)[:5])} (supported: {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...; "
            "convert others, e.g. HEIC, to JPEG or PNG)."
        )
    return sorted(images)


def load_source(source: str, split: str = "train") -> datasets.Dataset:
    """Resolve `source` (see the module docstring) into one `datasets.Dataset`."""
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source} has splits {list(ds)}, not {split!r}: set --data.split to one of them.")
            ds = ds[split]
        return ds
    if path.is_file():
        if path.suffix.lower() not in HUB_DATA_EXTENSIONS:
            kind = "a single image" if path.suffix.lower() in IMAGE_EXTENSIONS else f"a {path.suffix or 'plain'} file"
            raise ValueError(
                f"--data.dataset {source} is {kind}: give the folder holding the images (e.g. {path.parent}), "
                f"a data file ({', '.join(HUB_DATA_EXTENSIONS)}), a save_to_disk folder or a Hub id"
                + (" (unzip an archive first)" if path.suffix.lower() in (".zip", ".tar", ".gz", ".tgz") else "") + "."
            )
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        images = [] if suffixes & {".parquet", ".arrow"} else find_images(path)
        if suffixes & set(HUB_DATA_EXTENSIONS) and not images:
            try:
                return datasets.load_dataset(str(path), split=split)
            except Exception as err:  # noqa: BLE001 - e.g. only an empty labels.csv (a pandas or split error)
                cause = err.__cause__ or err
                raise ValueError(f"{path} holds no images and no usable data files ({type(cause).__name__}: "
                                 f"{str(cause).splitlines()[0] if str(cause) else ''}): "
                                 "point --data.dataset at a folder of images or a data set with rows.") from err
        if not images:
            raise FileNotFoundError(
                f"No image files found under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...): "
                "point --data.dataset at a folder of images, a local data set or a Hub data set id."
            )
        return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    if looks_like_path(source):
        raise FileNotFoundError(f"{source} does not exist: give an existing folder or file, or a Hub id 'user/name'.")
    try:
        return datasets.load_dataset(source, split=split)
    except ConnectionError as err:  # offline, or the Hub is unreachable
        raise ConnectionError(
            f"Could not load the Hub data set {source!r} ({err}). Offline? Download it once where the Hub is "
            "reachable (it is then cached), or point --data.dataset at a local folder or data set."
        ) from err


def looks_like_path(name: str) -> bool:
    """A path (that may not exist) rather than a Hub id, which is 'name' or 'user/name'."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def image_column_of(ds: datasets.Dataset, column: str | None) -> str:
    if column is not None:
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} is not in the data set (it has {ds.column_names}): set --data.image_column.")
        feature = ds.features[column]
        if not isinstance(feature, (datasets.Image, dict)) and getattr(feature, "dtype", None) not in ("string", "binary", "large_string"):
            kinds = {name: getattr(f, "dtype", type(f).__name__) for name, f in ds.features.items()}
            raise ValueError(f"Column {column!r} holds {kinds[column]}, not images (the columns hold {kinds}): "
                             "set --data.image_column to the image column.")
        return column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    if "image" in ds.column_names:
        return "image"
    raise ValueError(f"No image column in the data set (it has {ds.column_names}): set --data.image_column.")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: grayscale, RGBA and palette convert as PIL does; 16-bit scales to 8 bits instead of clipping."""
    if image.mode.startswith("I"):  # 16/32-bit integer grayscale
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(source) -> Image.Image:
    """Decode an image file (a path or a file object) now, the right way up: the EXIF orientation a phone
    records is applied, as `datasets.Image()` decoding does. A truncated file fails here, not later."""
    image = Image.open(source)
    image.load()
    return ImageOps.exif_transpose(image)


class ResizedImages(Dataset):
    """Item i of an image column, decoded, made RGB and resized to a square: a uint8 tensor (3, size, size).

    The random flip and the scaling to [-1, 1] happen per batch on the device (`augment`), so the same
    resized pixels can be decoded once and cached.
    """

    def __init__(self, ds: datasets.Dataset, column: str, image_size: int):
        # Undecoded rows ({"path", "bytes"}) so an error can name the file.
        self.rows = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.resize = transforms.Resize((image_size, image_size))  # the tutorial's Resize, on the PIL image
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> tuple[torch.Tensor, bool]:
        """(pixels, whether the original was smaller than image_size); a ValueError naming the file if unreadable."""
        row = self.rows[i][self.column]
        try:
            image = open_image(io.BytesIO(row["bytes"]) if row["bytes"] else row["path"])
        except Exception as err:  # noqa: BLE001 - re-raised with the file's name
            name = row["path"] or f"row {i}"
            raise ValueError(f"Could not read image {name} ({type(err).__name__}: {err}): remove or fix it.") from err
        return pil_to_tensor(self.resize(_to_rgb(image))), min(image.size) < self.image_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i)[0]


class _TryItems(Dataset):
    """ResizedImages whose items report a failure instead of raising it (for the decoding pass)."""

    def __init__(self, images: ResizedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, bool, str]:
        try:
            return *self.images.load(i), ""
        except ValueError as err:
            return None, False, str(err)


class EpochSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch), one slice per rank). Lightning sets the epoch before each
    epoch's iteration starts; a resumed run sets it from the checkpoint (ImageDataModule.load_state_dict),
    because Lightning first iterates the loader before it restores its own epoch count."""

    def __init__(self, dataset: Dataset, trainer, seed: int):
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class Indexed(Dataset):
    """(index, item) pairs: validation noise is seeded by the image's index, so it is the same every epoch."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.images[i]


class CachedImages(Dataset):
    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pixels[i]


def augment(batch: torch.Tensor) -> torch.Tensor:
    """The tutorial's RandomHorizontalFlip + ToTensor + Normalize([0.5], [0.5]) on a uint8 batch, on its device."""
    images = batch.float().div_(127.5).sub_(1.0)
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class ImageDataModule(LightningDataModule):
    """Training images for a DDPM.

    Args:
        dataset: a Hub data set id, a local image folder, a local Hub-format data set or a `save_to_disk` folder.
        split: the split to train on, for data sets that have splits.
        image_column: the column holding the images; found from the features when left out.
        image_size: side of the square training images; also the UNet's sample_size (linked by the CLI).
        train_batch_size: images per batch on each device.
        num_workers: loader processes per device; one per available core, at most 8, by default.
        cache: decode and resize every image once and keep the uint8 pixels in memory ("auto": when they
            take at most `cache_max_gb`). Unreadable images are then skipped with a counted warning.
            Without the cache, images are decoded by `num_workers` processes every epoch.
        cache_max_gb: the size cap for `cache: auto`.
        cache_on_gpu: keep the cached pixels on the training GPU (no copy per batch); by default when training
            on a GPU.
        val_dataset, val_split: held-out images for the validation loss (any source `dataset` takes).
        val_fraction: or hold out this fraction of `dataset` instead (a fixed, seeded split).
    """

    def __init__(
        self,
        dataset: str = "huggan/smithsonian_butterflies_subset",
        split: str = "train",
        image_column: str | None = None,
        image_size: int = 128,
        train_batch_size: int = 16,
        num_workers: int | None = None,
        cache: Literal["auto", "memory", "none"] = "auto",
        cache_max_gb: float = 4.0,
        cache_on_gpu: bool | None = None,
        val_dataset: str | None = None,
        val_split: str = "train",
        val_fraction: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.resume_state: dict | None = None  # the training loader's state from a checkpoint, applied once

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.train_set is None:
            ds = load_source(hp.dataset, hp.split)
            column = image_column_of(ds, hp.image_column)
            if len(ds) == 0:
                raise ValueError(f"{hp.dataset} (split {hp.split!r}) holds no rows: nothing to train on.")
            rank_zero_info(f"Found {len(ds)} training images in {hp.dataset} (split {hp.split!r}, column {column!r}).")
            val = None
            if hp.val_dataset is not None:
                val = load_source(hp.val_dataset, hp.val_split)
                val_column = image_column_of(val, hp.image_column)
                rank_zero_info(f"Found {len(val)} validation images in {hp.val_dataset} (split {hp.val_split!r}).")
            elif hp.val_fraction > 0:
                parts = ds.train_test_split(test_size=hp.val_fraction, seed=0, shuffle=True)
                ds, val, val_column = parts["train"], parts["test"], column
                rank_zero_info(f"Held out {len(val)} of them for validation (val_fraction={hp.val_fraction}).")
            self.train_set = self.images(ds, column)
            self.val_set = None if val is None else Indexed(self.images(val, val_column))
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            on_gpu = hp.cache_on_gpu if hp.cache_on_gpu is not None else device.type == "cuda"
            if on_gpu and isinstance(self.train_set, CachedImages):
                self.train_set.pixels = self.train_set.pixels.to(device)

    def images(self, ds: datasets.Dataset, column: str) -> Dataset:
        images = ResizedImages(ds, column, self.hparams.image_size)
        cache_gb = len(ds) * 3 * self.hparams.image_size**2 / 1e9
        if self.hparams.cache == "memory" or (self.hparams.cache == "auto" and cache_gb <= self.hparams.cache_max_gb):
            return CachedImages(self.decode_all(images))
        return images

    def decode_all(self, images: ResizedImages) -> torch.Tensor:
        """Decode and resize every image once, in `num_workers` processes; skip and count the unreadable ones."""
        pixels, smaller, failures = [], 0, []
        for batch in DataLoader(_TryItems(images), batch_size=32, num_workers=self.num_workers, collate_fn=list):
            for tensor, small, error in batch:
                if tensor is None:
                    failures.append(error)
                else:
                    pixels.append(tensor)
                    smaller += small
        if failures:
            rank_zero_warn(
                f"Skipped {len(failures)} of {len(images)} images that could not be read, e.g. "
                + "; ".join(failures[:3])
            )
        if not pixels:
            raise ValueError(f"None of the {len(images)} images could be read, e.g. {failures[0]}")
        if smaller:
            rank_zero_info(f"{smaller} of {len(pixels)} images are smaller than {images.image_size} px and were upscaled.")
        rank_zero_info(f"Cached {len(pixels)} images of {images.image_size} px in memory.")
        return torch.stack(pixels)

    def train_dataloader(self) -> StatefulDataLoader:
        cached = isinstance(self.train_set, CachedImages)
        workers = 0 if cached else self.num_workers  # cached batches are a memory copy: no processes needed
        # The shuffle order of epoch e is a function of (seed, e) alone, on one device or many, and the loader
        # is stateful (Lightning checkpoints its position): a run resumed mid-epoch sees exactly the batches
        # it would have seen, and its own generator keeps the loader from drawing on the global RNG.
        seed = torch.initial_seed()
        loader = StatefulDataLoader(
            self.train_set,
            batch_size=self.hparams.train_batch_size,
            sampler=EpochSampler(self.train_set, self.trainer, seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and not (cached and self.train_set.pixels.is_cuda),
            generator=torch.Generator().manual_seed(seed),
        )
        if self.resume_state:  # see state_dict
            state, self.resume_state = self.resume_state, None
            loader.sampler.set_epoch(state["epoch"])
            if "train_loader" in state:
                loader.load_state_dict(state["train_loader"])
        return loader

    def state_dict(self) -> dict:
        """The epoch whose order the loader is in and its position in it, saved in every checkpoint and applied
        when the loader is built. Lightning checkpoints the position too, but applies it only when it builds the
        loader after restoring its loops, which it does not when the schedule's length was estimated first
        (any run with max_epochs), and it draws the first batch before it sets the sampler's epoch."""
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None
        if not isinstance(loader, StatefulDataLoader) or not isinstance(loader.sampler, EpochSampler):
            return {}
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready >= trainer.num_training_batches:
            return {"epoch": loader.sampler.epoch + 1}  # the epoch's batches are all drawn: the next starts afresh
        return {"epoch": loader.sampler.epoch, "train_loader": loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_state = state_dict or None

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":
                raise ValueError("No validation images: set --data.val_dataset or --data.val_fraction.")
            return []  # fit without held-out images: no validation (the CLI also sets limit_val_batches=0)
        cached = isinstance(self.val_set.images, CachedImages)
        workers = 0 if cached else self.num_workers
        return DataLoader(self.val_set, batch_size=self.hparams.train_batch_size, num_workers=workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Training batches are uint8 images: flip and scale them here, on the device. Validation batches are
        # (index, uint8 images): the module scales them itself, unflipped, with noise fixed per index.
        if isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8:
            return augment(batch)
        return batch
