"""Where images come from: a `--data.dataset` value resolved into one `datasets.Dataset` and its image column.

`load_source` resolves the value and `image_column_of` finds the column; `training_and_validation` gives the
training and validation images a run names, and `is_hub_id` is the one rule for whether a name is a Hub id or a
local path, which the data, the model card and `ddpm-lightning sample` all follow.

`dataset` is resolved in this order:
1. a `save_to_disk` folder (it holds `dataset_info.json` or `dataset_dict.json`) -> `datasets.load_from_disk`;
2. a local folder or file of Hub-format data (parquet, arrow, csv, json) -> `datasets.load_dataset`, the same
   call a Hub id goes through;
3. any other local folder -> every image file under it, nested folders included, whatever the file names
   (`imagefolder` would move `test_*` / `val_*` files into other splits and silently train on fewer);
4. a Hub data set id -> `datasets.load_dataset(id, split=split)`; anything else does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import datasets
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from .files import first_line

# Files PIL can open, by extension (lower case). Everything else under an image folder is ignored.
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
HUB_DATA_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def find_images(folder: Path) -> list[str]:
    """Every image file under `folder`, following links to folders (each real folder once: no cycles).

    Files of other types are counted and a few named in one warning (hidden files such as .DS_Store are not).
    """
    images, others, _ = scan_folder(folder)
    warn_skipped(folder, images, others)
    return images


def scan_folder(folder: Path) -> tuple[list[str], list[str], set[str]]:
    """One walk of `folder`: its image files, its other files and every file's suffix.

    Returns:
        The image files (sorted), the other files (relative to `folder`, hidden ones left out) and the suffixes of
        all files (lower case, which say whether the folder is a Hub-format data set).
    """
    images, others, suffixes, seen = [], [], set(), set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            dirs.clear()
            continue
        seen.add(real)
        for name in files:
            path = os.path.join(root, name)
            suffix = os.path.splitext(name)[1].lower()
            suffixes.add(suffix)
            if suffix in IMAGE_EXTENSIONS and os.path.isfile(path):
                images.append(path)
            elif not name.startswith("."):
                others.append(os.path.relpath(path, folder))
    return sorted(images), others, suffixes


def warn_skipped(folder: Path, images: list[str], others: list[str]) -> None:
    """One warning that counts the files skipped beside the images, naming a few."""
    if others and images:
        rank_zero_warn(
            f"Skipped {len(others)} file(s) under {folder} that are not a supported image type, e.g. "
            f"{', '.join(sorted(others)[:5])} (supported: {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...; "
            "convert others, e.g. HEIC, to JPEG or PNG)."
        )


def load_source(source: str, split: str = "train", option: str = "--data.dataset") -> datasets.Dataset:
    """Resolve `source` (see the module docstring) into one `datasets.Dataset`; errors name it as `option`."""
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
                f"{option} {source} is {kind}: give the folder holding the images (e.g. {path.parent}), "
                f"a data file ({', '.join(HUB_DATA_EXTENSIONS)}), a save_to_disk folder or a Hub id"
                + (" (unzip an archive first)" if path.suffix.lower() in (".zip", ".tar", ".gz", ".tgz") else "")
                + "."
            )
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    if path.is_dir():
        images, others, suffixes = scan_folder(path)
        if suffixes & {".parquet", ".arrow"}:  # a Hub-format data set: its rows, not any images beside them
            images = []
        warn_skipped(path, images, others)
        if suffixes & set(HUB_DATA_EXTENSIONS) and not images:
            try:
                return datasets.load_dataset(str(path), split=split)
            except Exception as err:
                cause = err.__cause__ or err
                raise ValueError(
                    f"{path} holds no images and no usable data files ({type(cause).__name__}: {first_line(cause)}): "
                    f"point {option} at a folder of images or a data set with rows."
                ) from err
        if not images:
            raise FileNotFoundError(
                f"No image files found under {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...): "
                f"point {option} at a folder of images, a local data set or a Hub data set id."
            )
        return datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    if not is_hub_id(source):
        raise FileNotFoundError(
            f"{source} does not exist: it is no file or folder here, nor a valid Hub id 'user/name'. "
            "Give an existing folder or file, or a Hub data set id."
        )
    try:
        return datasets.load_dataset(source, split=split)
    except ConnectionError as err:  # offline, or the Hub is unreachable
        raise ConnectionError(
            f"Could not load the Hub data set {source!r} ({err}). Offline? Download it once where the Hub is "
            f"reachable (it is then cached), or point {option} at a local folder or data set."
        ) from err


def is_hub_id(name: str | None) -> bool:
    """Whether `name` is a Hub repo id ('name' or 'user/name') rather than a local path.

    It is when no file or folder of that name exists here, it does not look like a path ('.', '/' or '~' first,
    more than one '/', the OS's own separator) and huggingface_hub accepts it as a repo id.
    """
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return os.sep == "/" or os.sep not in name


def image_column_of(ds: datasets.Dataset, column: str | None) -> str:
    """The image column: `column`, checked, or the first Image feature (else one named "image")."""
    if column is not None:
        if column not in ds.column_names:
            raise ValueError(f"Column {column!r} is not in the data set ({ds.column_names}): set --data.image_column.")
        feature = ds.features[column]
        textual = getattr(feature, "dtype", None) in ("string", "binary", "large_string")  # paths or bytes
        if not isinstance(feature, (datasets.Image, dict)) and not textual:
            kinds = {name: getattr(f, "dtype", type(f).__name__) for name, f in ds.features.items()}
            raise ValueError(
                f"Column {column!r} holds {kinds[column]}, not images (the columns hold {kinds}): "
                "set --data.image_column to the image column."
            )
        return column
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    if "image" in ds.column_names:
        return "image"
    raise ValueError(f"No image column in the data set (it has {ds.column_names}): set --data.image_column.")


class Split(NamedTuple):
    """Rows of a data set and the column holding their images."""

    rows: datasets.Dataset
    column: str


def training_and_validation(
    dataset: str, split: str, image_column: str | None, val_dataset: str | None, val_split: str, val_fraction: float
) -> tuple[Split, Split | None]:
    """The training images and the held-out ones.

    The held-out ones are `val_dataset` (any source), or a fixed, seeded `val_fraction` of `dataset`, or none.
    """
    ds = load_source(dataset, split)
    column = image_column_of(ds, image_column)
    if len(ds) == 0:
        raise ValueError(f"{dataset} (split {split!r}) holds no rows: nothing to train on.")
    rank_zero_info(f"Found {len(ds)} training images in {dataset} (split {split!r}, column {column!r}).")
    if val_dataset is not None:
        val = load_source(val_dataset, val_split, "--data.val_dataset")
        rank_zero_info(f"Found {len(val)} validation images in {val_dataset} (split {val_split!r}).")
        return Split(ds, column), Split(val, image_column_of(val, image_column))
    if val_fraction > 0:
        parts = ds.train_test_split(test_size=val_fraction, seed=0, shuffle=True)
        rank_zero_info(f"Held out {len(parts['test'])} of them for validation (val_fraction={val_fraction}).")
        return Split(parts["train"], column), Split(parts["test"], column)
    return Split(ds, column), None
