"""Prepared shards: a data set decoded and resized once into LitData chunks, then streamed.

`ddpm-lightning prepare` writes the chunks on a disk or in an object store (`s3://`, `gs://`); `--data.dataset`
streams them from there (LitData's StreamingDataset and StreamingDataLoader): each rank and each loader worker reads
its own chunks, the order is new every epoch, and a rank holds a few chunks at a time however large the data set
is. `ddpm_prepared.json`, written beside the chunks once they are all there, records the size and crop they were
resized with; a run at another size refuses them.

    ddpm-lightning prepare ./photos s3://bucket/photos-128 --image_size 128 --crop squash
    ddpm-lightning fit -c configs/butterflies.yaml --data.dataset s3://bucket/photos-128

LitData is the optional `stream` extra (`pip install 'ddpm-lightning[stream]'`): imported here, only when used.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # (LitData is optional, and torch is imported only where used)
    import torch
    from litdata import StreamingDataLoader, StreamingDataset

    from .images import ResizedImages


log = logging.getLogger(__name__)

SETTINGS = "ddpm_prepared.json"  # the preparation's settings; written last, so its presence means complete
SCHEMES = ("s3", "gs")


def is_prepared(dataset: str | None) -> bool:
    """Whether `dataset` names prepared shards rather than a source.

    That is a URL, or a folder holding their settings or LitData's index and chunks (an unfinished preparation,
    refused by `read_settings`).
    """
    if not dataset:
        return False
    if "://" in dataset:
        return True
    folder = Path(dataset).expanduser()
    return (folder / SETTINGS).is_file() or ((folder / "index.json").is_file() and any(folder.glob("chunk-*.bin")))


def litdata() -> ModuleType:
    """The LitData module, or a RuntimeError naming the install (the command line shows it as one line)."""
    try:
        import litdata
    except ImportError as err:
        raise RuntimeError(
            "Prepared shards need LitData: pip install 'ddpm-lightning[stream]' (or pip install litdata)."
        ) from err
    return litdata


def _split_url(url: str) -> tuple[str, str, str]:
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        raise ValueError(
            f"{url}: prepared shards are read from s3:// or gs:// URLs or a local folder, not {scheme}://."
        )
    bucket, _, prefix = rest.partition("/")
    return scheme, bucket, prefix.strip("/")


def _read_text(dataset: str, name: str) -> str:
    """A small file beside the chunks: from the folder, or from the bucket.

    A bucket is read with boto3 or google-cloud-storage, which LitData itself uses; credentials and endpoint as they
    configure themselves, e.g. AWS_ENDPOINT_URL.
    """
    if "://" not in dataset:
        return (Path(dataset).expanduser() / name).read_text()
    scheme, bucket, prefix = _split_url(dataset)
    key = f"{prefix}/{name}" if prefix else name
    if scheme == "s3":
        import boto3

        client = boto3.client("s3")
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(f"{dataset}/{name}") from err
    from google.cloud import storage

    blob = storage.Client().bucket(bucket).blob(key)
    if not blob.exists():
        raise FileNotFoundError(f"{dataset}/{name}")
    return blob.download_as_text()


def _write_text(dataset: str, name: str, text: str) -> None:
    if "://" not in dataset:
        (Path(dataset).expanduser() / name).write_text(text)
        return
    scheme, bucket, prefix = _split_url(dataset)
    key = f"{prefix}/{name}" if prefix else name
    if scheme == "s3":
        import boto3

        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=text.encode())
        return
    from google.cloud import storage

    storage.Client().bucket(bucket).blob(key).upload_from_string(text)


def read_settings(dataset: str) -> dict[str, Any]:
    """The settings `prepare` wrote beside the shards; a ValueError when there are none."""
    try:
        return json.loads(_read_text(dataset, SETTINGS))
    except FileNotFoundError:
        raise ValueError(
            f"{dataset} holds no {SETTINGS}: it was not written by `ddpm-lightning prepare`, or its preparation did "
            f"not finish. Prepare it: ddpm-lightning prepare SOURCE {dataset} --image_size N --crop CROP."
        ) from None


def check_settings(dataset: str, image_size: int, crop: str) -> dict[str, Any]:
    """The settings of prepared shards, which must be this run's image size and crop; else one line naming both fixes.

    The pixels were resized once, at preparation.
    """
    settings = read_settings(dataset)
    if (settings["image_size"], settings["crop"]) != (image_size, crop):
        raise ValueError(
            f"{dataset} was prepared at image_size {settings['image_size']} with crop {settings['crop']}, not "
            f"{image_size} with {crop}: train with --data.image_size {settings['image_size']} --data.crop "
            f"{settings['crop']}, or prepare the source again into another folder (ddpm-lightning prepare "
            f"{settings['source']} OUT --image_size {image_size} --crop {crop})."
        )
    return settings


def stream(dataset: str, seed: int) -> StreamingDataset:
    """The training images of prepared shards as a StreamingDataset.

    Its order is f(seed, epoch): every rank builds it with the same seed, and LitData gives each rank, then each of
    its loader workers, its own chunks.
    """
    return litdata().StreamingDataset(
        dataset,
        shuffle=True,
        seed=seed,
        # every rank the same number of whole batches (DDP steps in lockstep), on any world size, so that a resume
        # on another one is allowed: fewer than world size x batch images, other ones each epoch, are left out
        drop_last=True,
        # every image of a chunk in a new order each epoch (the window only saves decoding batches of small
        # items, and these are raw pixels)
        item_shuffle_window="full",
    )


def loader(
    dataset: StreamingDataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[torch.Tensor]], object] | None = None,
    pin_memory: bool = False,
) -> StreamingDataLoader:
    """LitData's StreamingDataLoader, whose state (epoch, images drawn) resumes mid-epoch.

    It resumes on the same world size exactly, on another one with the epoch's remaining images (LitData's elastic
    resume).
    """
    import torch

    return _loader_class()(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn if collate_fn is not None else torch.stack,
        # its own generator: each epoch's iterator would otherwise draw its workers' base seed from the global
        # RNG, which the noise and timesteps draw from (a resumed run would then draw other noise)
        generator=torch.Generator().manual_seed(0),
    )


@functools.cache
def _loader_class() -> type[StreamingDataLoader]:
    class EpochLoader(litdata().StreamingDataLoader):  # type: ignore[misc]  # (LitData is imported when called)
        """StreamingDataLoader, whose resumed epoch ends as Lightning ends it.

        A loaded state makes the next iteration go on where it stopped (`restore`), and LitData turns that off only
        after the epoch's last batch, when its iterator is drawn once more and ends; Lightning stops drawing at the
        epoch's length, so the epoch after would replay the resumed one. Once the resumed epoch has begun, the next
        starts afresh.
        """

        def __iter__(self) -> Iterator[Any]:
            """The batches (each whatever the collate_fn makes), with `restore` off once the first is drawn."""
            for batch in super().__iter__():
                self.restore = False
                yield batch

    return EpochLoader


def first_images(dataset: str, n: int) -> list[torch.Tensor]:
    """The first n images of the shards (in their stored order).

    They are read by a dataset of their own, so that the training stream's state is untouched.
    """
    images = litdata().StreamingDataset(dataset)
    return [images[i] for i in range(min(n, len(images)))]


class _Pixels:
    """LitData `optimize`'s function: item i of the source, decoded and resized as the cached path does.

    An unreadable one is None (skipped, with a warning naming the file).
    """

    def __init__(self, images: ResizedImages) -> None:
        self.images = images

    def __call__(self, i: int) -> torch.Tensor | None:
        try:
            return self.images.load(i)[0]
        except ValueError as err:
            log.warning(str(err))
            return None


@contextmanager
def _own_work_folder() -> Iterator[None]:
    """A private folder for optimize's staged chunks, unless the user named one.

    Optimize stages chunks bound for an object store in <tmp>/chunks, the same folder for every process on the
    machine.
    """
    if "DATA_OPTIMIZER_CACHE_FOLDER" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-prepare-") as folder:
        os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = folder
        try:
            yield
        finally:
            del os.environ["DATA_OPTIMIZER_CACHE_FOLDER"]


def write(
    images: ResizedImages, out: str, source: dict[str, Any], num_workers: int, chunk_mb: float = 64
) -> dict[str, Any]:
    """Decode and resize every image of `images` into LitData chunks at `out`, then write the settings beside them.

    `out` is a folder or an s3:// / gs:// URL; `num_workers` processes decode. The images are stored in a fixed
    shuffled order, so that a chunk holds a mix of the source (streaming shuffles whole chunks, then the images
    inside each). Returns the settings.
    """
    engine = litdata()
    if "://" in out:
        _split_url(out)
    order = np.random.default_rng(0).permutation(len(images)).tolist()
    with _own_work_folder():
        engine.optimize(
            fn=_Pixels(images),
            inputs=order,
            output_dir=out,
            chunk_bytes=int(chunk_mb * 1e6),
            num_workers=max(1, num_workers),
            # fork: spawned workers would each import torch again (seconds apiece) and pickle the rows
            start_method="fork" if sys.platform == "linux" else None,
            keep_data_ordered=True,  # the shards are a function of the source alone
            reorder_files=False,
            verbose=False,
        )
    with tempfile.TemporaryDirectory(prefix="ddpm-prepare-") as cache:  # (a URL's index.json is fetched here)
        written = len(engine.StreamingDataset(out, cache_dir=cache))
    if written < len(images):
        log.warning(f"Skipped {len(images) - written} of {len(images)} images that could not be read (named above).")
    settings = {"image_size": images.image_size, "crop": images.crop, "images": written, **source}
    _write_text(out, SETTINGS, json.dumps(settings, indent=1) + "\n")
    return settings
