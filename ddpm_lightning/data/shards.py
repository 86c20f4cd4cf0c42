"""Prepared shards: a data set decoded and resized once into LitData chunks, then streamed.

`ddpm-lightning prepare` writes the chunks on a disk or in an object store (`s3://`, `gs://`); `--data.dataset`
streams them from there (LitData's StreamingDataset and StreamingDataLoader): each rank and each loader worker reads
its own chunks, the order is new every epoch, and a rank holds a few chunks at a time however large the data set
is. `ddpm_prepared.json`, written beside the chunks once they are all there, records the size and crop they were
resized with; a run at another size refuses them.

    ddpm-lightning prepare ./photos s3://bucket/photos-128 --image_size 128 --crop squash
    ddpm-lightning fit -c configs/butterflies.yaml --data.dataset s3://bucket/photos-128

LitData is the optional `stream` extra (`pip install 'ddpm-lightning[stream]'`): imported here, only when used.

An object store is asked first, with short timeouts (`storage_config`: DDPM_LIGHTNING_STORAGE_TIMEOUT seconds a
request, 3 tries), whether the bucket is there and the keys work; a failure is one line naming the URL and the fix
(`StorageError`), never LitData's retrying for minutes. LitData's own transfers get the same timeouts.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
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
TIMEOUT_VARIABLE = "DDPM_LIGHTNING_STORAGE_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0  # one request to an object store: to connect, and then to hear back
ATTEMPTS = 3  # tries of a request (botocore's standard retries; a request refused outright is not tried again)


class StorageError(OSError):
    """An object store that cannot be used as asked; its message names the URL and the fix (shown as one line)."""


def is_prepared(dataset: str | None) -> bool:
    """Whether `dataset` names prepared shards rather than a source.

    That is a URL, or a folder holding their settings or LitData's index and chunks (an unfinished preparation,
    refused by `read_settings`).
    """
    if not dataset:
        return False
    if "://" in dataset:
        return True
    return any_shards(Path(dataset).expanduser())


def any_shards(folder: Path) -> bool:
    """Whether `folder` holds prepared shards or some of them: settings, LitData's index or chunks.

    A killed preparation leaves chunks and per-worker indexes (`0.index.json`) but no `index.json`.
    """
    return folder.is_dir() and (
        (folder / SETTINGS).is_file() or any(folder.glob("chunk-*.bin")) or any(folder.glob("[0-9]*.index.json"))
    )


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


def timeout_s() -> float:
    """Seconds an object store request may take to connect, and then to answer (DDPM_LIGHTNING_STORAGE_TIMEOUT)."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_VARIABLE}={value!r}: give the seconds an object store request may take, e.g. 10.")
    return seconds


def storage_config() -> Any:
    """The botocore settings of every S3 request here and in LitData: bounded timeouts and tries, not 1000 tries."""
    from botocore.config import Config

    seconds = timeout_s()
    return Config(
        connect_timeout=seconds, read_timeout=seconds, retries={"total_max_attempts": ATTEMPTS, "mode": "standard"}
    )


def storage_options(dataset: str) -> dict[str, Any]:
    """LitData's `storage_options` for `dataset`: the bounded botocore settings for S3, nothing otherwise."""
    return {"config": storage_config()} if dataset.startswith("s3://") else {}


def _s3_client() -> Any:
    """An S3 client with the bounded settings, and the credentials the environment names now.

    (boto3's default session keeps the ones it found first.)
    """
    import boto3

    return boto3.session.Session().client("s3", config=storage_config())


def _endpoint(client: Any) -> str:
    return str(getattr(client.meta, "endpoint_url", "") or "the default endpoint")


def storage_error(url: str, client: Any, err: Exception) -> StorageError:
    """One line for a failed S3 request on `url`: what went wrong, and what to do about it."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

    endpoint = _endpoint(client)
    if isinstance(err, NoCredentialsError):
        return StorageError(
            f"{url}: no credentials for the object store at {endpoint}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        )
    if isinstance(err, (ConnectionError, HTTPClientError)):  # refused, timed out, closed, no such host
        return StorageError(
            f"{url}: cannot reach the object store at {endpoint} ({type(err).__name__}, after {ATTEMPTS} tries of "
            f"up to {timeout_s():g} s): check that it is up and that AWS_ENDPOINT_URL names it (a slower one: "
            f"raise {TIMEOUT_VARIABLE})."
        )
    code = err.response.get("Error", {}).get("Code", "") if isinstance(err, ClientError) else ""
    bucket = _split_url(url)[1]
    if code == "NoSuchBucket":
        return StorageError(
            f"{url}: there is no bucket {bucket} at {endpoint}: create it (aws s3 mb s3://{bucket}) or correct the URL."
        )
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403", "ExpiredToken"):
        return StorageError(
            f"{url}: the object store at {endpoint} refused these credentials ({code}): set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys that may read and write s3://{bucket}."
        )
    return StorageError(f"{url}: the object store at {endpoint} answered {code or type(err).__name__}: {err}")


@contextmanager
def _s3_request(url: str, client: Any) -> Iterator[None]:
    """Turn botocore's failures of the requests inside into `storage_error`'s one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as err:
        if isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise
        raise storage_error(url, client, err) from err


def _s3_keys(url: str, most: int) -> list[str]:
    """Up to `most` keys under the URL's prefix (as a folder): the bucket, the keys and the endpoint checked."""
    _, bucket, prefix = _split_url(url)
    client = _s3_client()
    with _s3_request(url, client):
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=most)
    return [item["Key"] for item in listed.get("Contents", [])]


def check_new_output(out: str) -> None:
    """Refuse an output that holds anything, in one line saying what it holds and what to do.

    An unfinished preparation (a killed `prepare`: chunks, no settings) is told apart from finished shards and
    from other files. A bucket is asked first (`_s3_keys`): a missing bucket, wrong keys or an unreachable
    endpoint stop here, in seconds.
    """
    if out.startswith("s3://"):
        names = [key.rsplit("/", 1)[-1] for key in _s3_keys(out, 1000)]
        remove = f"aws s3 rm --recursive {out}"
    elif "://" in out:
        _split_url(out)
        return  # (gs://: LitData's own check, which names no folder)
    else:
        folder = Path(out).expanduser()
        if not folder.exists():
            return
        if not folder.is_dir():
            raise ValueError(f"{out} exists and is not a folder: give a new folder for the shards.")
        names = [path.name for path in folder.iterdir()]
        remove = f"rm -r {out}"
    if not names:
        return
    if SETTINGS in names:
        raise ValueError(
            f"{out} already holds prepared shards: train from it with --data.dataset {out}, or give a new folder "
            "for these."
        )
    if any(name.startswith("chunk-") or name.endswith("index.json") for name in names):
        raise ValueError(
            f"{out} holds an unfinished preparation (shards without {SETTINGS}: a `prepare` that was stopped): "
            f"delete it ({remove}) and run the same `prepare` again, or give a new folder."
        )
    raise ValueError(f"{out} is not empty (it holds {names[0]}, ...): give a new folder for the shards.")


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
        client = _s3_client()
        try:
            with _s3_request(dataset, client):
                return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(f"{dataset}/{name}") from err
    from google.cloud import storage

    blob = storage.Client().bucket(bucket).blob(key)
    if not blob.exists():
        raise FileNotFoundError(f"{dataset}/{name}")
    return blob.download_as_text()


def _write_text(dataset: str, name: str, text: str) -> None:
    """A small file beside the chunks, whole or not at all (in a folder: written beside it, then renamed)."""
    if "://" not in dataset:
        path = Path(dataset).expanduser() / name
        partial = path.with_name(f".{name}.partial-{os.getpid()}")
        try:
            with open(partial, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return
    scheme, bucket, prefix = _split_url(dataset)
    key = f"{prefix}/{name}" if prefix else name
    if scheme == "s3":  # (an object appears whole or not at all)
        client = _s3_client()
        with _s3_request(dataset, client):
            client.put_object(Bucket=bucket, Key=key, Body=text.encode())
        return
    from google.cloud import storage

    storage.Client().bucket(bucket).blob(key).upload_from_string(text)


def read_settings(dataset: str) -> dict[str, Any]:
    """The settings `prepare` wrote beside the shards; a ValueError when there are none."""
    try:
        return json.loads(_read_text(dataset, SETTINGS))
    except FileNotFoundError:
        if _unfinished(dataset):
            remove = f"aws s3 rm --recursive {dataset}" if dataset.startswith("s3://") else f"rm -r {dataset}"
            raise ValueError(
                f"{dataset} holds an unfinished preparation (shards without {SETTINGS}: a `prepare` that was "
                f"stopped): delete it ({remove}) and run the same `ddpm-lightning prepare SOURCE {dataset} ...` "
                "again."
            ) from None
        raise ValueError(
            f"{dataset} holds no {SETTINGS}: it was not written by `ddpm-lightning prepare`, or its preparation did "
            f"not finish. Prepare it: ddpm-lightning prepare SOURCE {dataset} --image_size N --crop CROP."
        ) from None


def _unfinished(dataset: str) -> bool:
    """Whether `dataset`, which holds no settings, holds some of what `prepare` writes (a stopped preparation)."""
    if dataset.startswith("s3://"):
        return bool(_s3_keys(dataset, 1))
    return "://" not in dataset and any_shards(Path(dataset).expanduser())


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
        storage_options=storage_options(dataset),
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
    images = litdata().StreamingDataset(dataset, storage_options=storage_options(dataset))
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


_PR_SET_PDEATHSIG = 1  # prctl(2)
_dies_with_parent = False  # set while `write` runs, and inherited: every process forked meanwhile dies with its parent
_forked_by: tuple[int, bool] = (0, False)  # (the forking process, whether from its main thread), seen by the child


def _note_forking_process() -> None:
    global _forked_by
    _forked_by = (os.getpid(), threading.current_thread() is threading.main_thread())


def _die_with_parent() -> None:
    """In a child forked while `write` runs: be killed when the parent dies (LitData's workers, writers, uploaders).

    Only for a fork from a main thread: the kernel sends the signal when the forking thread ends.
    """
    parent, from_main_thread = _forked_by
    if not (_dies_with_parent and from_main_thread):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


if sys.platform == "linux":
    os.register_at_fork(before=_note_forking_process, after_in_child=_die_with_parent)


@contextmanager
def _children_die_with_this_process() -> Iterator[None]:
    """Every process forked inside is killed with its parent: a `prepare` killed by `kill -9` leaves no worker."""
    global _dies_with_parent
    previous, _dies_with_parent = _dies_with_parent, True
    try:
        yield
    finally:
        _dies_with_parent = previous


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

    `out` is a new folder or an s3:// / gs:// URL (`check_new_output`); `num_workers` processes decode. The images
    are stored in a fixed shuffled order, so that a chunk holds a mix of the source (streaming shuffles whole
    chunks, then the images inside each). The settings are written last, whole: their presence means the shards
    are complete. Returns the settings.
    """
    engine = litdata()
    if "://" in out:
        _split_url(out)
    order = np.random.default_rng(0).permutation(len(images)).tolist()
    with _own_work_folder(), _children_die_with_this_process():
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
            storage_options=storage_options(out),
        )
    with tempfile.TemporaryDirectory(prefix="ddpm-prepare-") as cache:  # (a URL's index.json is fetched here)
        written = len(engine.StreamingDataset(out, cache_dir=cache, storage_options=storage_options(out)))
    if written < len(images):
        log.warning(f"Skipped {len(images) - written} of {len(images)} images that could not be read (named above).")
    settings = {"image_size": images.image_size, "crop": images.crop, "images": written, **source}
    _write_text(out, SETTINGS, json.dumps(settings, indent=1) + "\n")
    return settings
