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

import os
from pathlib import Path

import datasets
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# Files PIL can open, by extension (lower case). Everything else under an image folder is ignored.
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
HUB_DATA_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def default_num_workers() -> int:
    """One loader worker per CPU core this process may use, at most 8 (decoding a JPEG is the loader's work)."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def find_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


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
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.rglob("*") if p.is_file()}
        images = [] if suffixes & {".parquet", ".arrow"} else find_images(path)
        if suffixes & set(HUB_DATA_EXTENSIONS) and not images:
            return datasets.load_dataset(str(path), split=split)
        if not images:
            raise FileNotFoundError(
                f"No image files found under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...): "
                "point --data.dataset at a folder of images, a local data set or a Hub data set id."
            )
        return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FileNotFoundError(f"{source} does not exist: give an existing folder or file, or a Hub id 'user/name'.")
    try:
        return datasets.load_dataset(source, split=split)
    except ConnectionError as err:  # offline, or the Hub is unreachable
        raise ConnectionError(
            f"Could not load the Hub data set {source!r} ({err}). Offline? Download it once where the Hub is "
            "reachable (it is then cached), or point --data.dataset at a local folder or data set."
        ) from err


def image_column_of(ds: datasets.Dataset, column: str | None) -> str:
    if column is not None:
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} is not in the data set (it has {ds.column_names}): set --data.image_column.")
        return column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    if "image" in ds.column_names:
        return "image"
    raise ValueError(f"No image column in the data set (it has {ds.column_names}): set --data.image_column.")


class ImageDataset(Dataset):
    """An image column of a `datasets.Dataset`, decoded to RGB and transformed, one tensor per item."""

    def __init__(self, ds: datasets.Dataset, column: str, transform):
        self.ds = ds.select_columns([column])
        self.column = column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.ds[i][self.column]
        if not isinstance(image, Image.Image):  # a path or bytes column that was not cast to datasets.Image
            image = datasets.Image().decode_example({"path": image, "bytes": None} if isinstance(image, str) else image)
        return self.transform(image.convert("RGB"))


def train_transform(image_size: int) -> transforms.Compose:
    """The tutorial's augmentation: resize to a square, random horizontal flip, scale to [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


class ImageDataModule(LightningDataModule):
    """Training images for a DDPM.

    Args:
        dataset: a Hub data set id, a local image folder, a local Hub-format data set or a `save_to_disk` folder.
        split: the split to train on, for data sets that have splits.
        image_column: the column holding the images; found from the features when left out.
        image_size: side of the square training images; also the UNet's sample_size (linked by the CLI).
        train_batch_size: images per batch on each device.
        num_workers: loader processes per device; one per available core, at most 8, by default.
    """

    def __init__(
        self,
        dataset: str = "huggan/smithsonian_butterflies_subset",
        split: str = "train",
        image_column: str | None = None,
        image_size: int = 128,
        train_batch_size: int = 16,
        num_workers: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.train_set: ImageDataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        ds = load_source(hp.dataset, hp.split)
        column = image_column_of(ds, hp.image_column)
        if len(ds) == 0:
            raise ValueError(f"{hp.dataset} (split {hp.split!r}) holds no rows: nothing to train on.")
        rank_zero_info(f"Found {len(ds)} training images in {hp.dataset} (split {hp.split!r}, column {column!r}).")
        self.train_set = ImageDataset(ds, column, train_transform(hp.image_size))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.train_batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )
