"""Decoded images, the cache's pixels and the random crop's strips.

Each image file or row is decoded, made RGB and resized (`ResizedImages`); every one of a data set is decoded once by
loader workers (`decode_all`) and held in one tensor (`CachedImages`), or in `Strips` for `crop: random`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import traceback
from collections.abc import Callable
from typing import IO, Any, Literal, NamedTuple

import datasets
import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from ..reporting.progress import progress_bar

Crop = Literal["squash", "center", "random"]


# crop: random keeps at most this long a side (times image_size), so a panorama cannot blow up the cache.
MAX_ASPECT = 2.0


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any mode: grayscale, RGBA and palette convert as PIL does; 16-bit scales to 8 bits, not clipped."""
    if image.mode.startswith("I"):  # 16/32-bit integer grayscale
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def open_image(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """Decode an image file (a path or a file object) now, the right way up.

    The EXIF orientation a phone records is applied, as `datasets.Image()` decoding does. A truncated file fails
    here, not later.
    """
    image = Image.open(source)
    image.load()
    return ImageOps.exif_transpose(image)


class ResizedImages(Dataset):
    """Item i of an image column, decoded, made RGB and resized (`crop`): a uint8 tensor.

    squash: the tutorial's Resize((size, size)), (3, size, size). center: torchvision's Resize(size) (the
    short side) then CenterCrop(size), (3, size, size). random: Resize(size) only, with the long side
    center-cropped to at most MAX_ASPECT * size, (3, size, long) or (3, long, size); `random_crop` cuts the
    square per batch. The random flip and the scaling to [-1, 1] also happen per batch on the device
    (`augment`), so the same resized pixels can be decoded once and cached.
    """

    def __init__(self, ds: datasets.Dataset, column: str, image_size: int, crop: Crop = "squash") -> None:
        # Undecoded rows ({"path", "bytes"}) so an error can name the file.
        self.rows = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.image_size = image_size
        self.crop = crop
        # squash: the tutorial's Resize, on the PIL image; else the short side to image_size, aspect kept
        self.resize = transforms.Resize((image_size, image_size) if crop == "squash" else image_size)
        self.center = transforms.CenterCrop(image_size)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """The decoded RGB image, resized and (for center/random) cropped, as torchvision's transforms do."""
        image = self.resize(image)
        if self.crop == "center":
            image = self.center(image)
        elif self.crop == "random":
            bound = int(MAX_ASPECT * self.image_size)
            if max(image.size) > bound:  # very wide or tall: keep the middle (the crop choice stays bounded)
                w, h = image.size
                image = transforms.functional.center_crop(image, [min(h, bound), min(w, bound)])
        return pil_to_tensor(image)

    def __len__(self) -> int:
        """The number of images."""
        return len(self.rows)

    def load(self, i: int) -> tuple[torch.Tensor, bool]:
        """(pixels, whether the original was smaller than image_size); a ValueError naming the file if unreadable."""
        row = self.rows[i][self.column]
        try:
            image = open_image(io.BytesIO(row["bytes"]) if row["bytes"] else row["path"])
        except Exception as err:
            if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
                raise  # the process's limit, not the file: never counted as an unreadable image
            name = row["path"] or f"row {i}"
            raise ValueError(f"Could not read image {name} ({type(err).__name__}: {err}): remove or fix it.") from err
        return self.transform(_to_rgb(image)), min(image.size) < self.image_size

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image i's pixels."""
        return self.load(i)[0]

    def try_load(self, indices: list[int]) -> Decoded:
        """`load` of each image, skipping those that fail.

        This is the decoding pass's collate_fn (so it runs in the loader's workers), which counts failures instead
        of stopping at the first.
        """
        loaded, smaller, errors = [], 0, []
        for i in indices:
            try:
                image, small = self.load(i)
            except ValueError as err:
                errors.append(str(err))
                continue
            loaded.append(image)
            smaller += small
        pixels = (Strips.collate(loaded) if self.crop == "random" else torch.stack(loaded)) if loaded else None
        return Decoded(pixels, len(loaded), smaller, errors)


class Strips(NamedTuple):
    """Images resized to a short side of `size` for `crop: random`, held landscape so they stack.

    Portrait ones are transposed, all zero-padded on the right to the longest. `random_crop` cuts a square from
    each.
    """

    pixels: torch.Tensor  # (N, 3, size, longest) uint8
    lengths: torch.Tensor  # (N,) each image's long side
    portrait: torch.Tensor  # (N,) bool: stored transposed

    @staticmethod
    def collate(images: list[torch.Tensor]) -> Strips:
        """The images (each (3, size, long) or (3, long, size)) as one Strips."""
        portrait = torch.tensor([im.shape[1] > im.shape[2] for im in images])
        images = [im.transpose(1, 2) if p else im for im, p in zip(images, portrait)]
        lengths = torch.tensor([im.shape[2] for im in images])
        pixels = torch.zeros(len(images), images[0].shape[0], images[0].shape[1], int(lengths.max()), dtype=torch.uint8)
        for canvas, im in zip(pixels, images):
            canvas[:, :, : im.shape[2]] = im
        return Strips(pixels, lengths, portrait)

    @staticmethod
    def join(parts: list[Strips]) -> Strips:
        """Batches of strips as one, padded to the longest of all: what `collate` of all their images gives."""
        first = parts[0].pixels
        longest = max(part.pixels.shape[3] for part in parts)
        pixels = torch.zeros(sum(len(p.pixels) for p in parts), *first.shape[1:3], longest, dtype=torch.uint8)
        start = 0
        for part in parts:
            pixels[start : start + len(part.pixels), :, :, : part.pixels.shape[3]] = part.pixels
            start += len(part.pixels)
        return Strips(pixels, torch.cat([p.lengths for p in parts]), torch.cat([p.portrait for p in parts]))


class Decoded(NamedTuple):
    """One batch of the decoding pass as a loader worker returns it.

    The images it could read as one tensor (squares) or one Strips (`crop: random`), None if none, and how many;
    how many of them were upscaled; why each other one failed. A batch crosses from the worker as a few
    shared-memory tensors, each an open file while it lives in this process.
    """

    pixels: torch.Tensor | Strips | None
    read: int
    smaller: int
    errors: list[str]


def random_crop(strips: Strips, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size), as torchvision's, of every image in a batch of strips, in one gather on their device.

    The offset along each image's long side is uniform.
    """
    pixels, lengths, portrait = strips
    n, channels, size, _ = pixels.shape
    draw = torch.rand(n, generator=generator, device=pixels.device if generator is None else generator.device)
    offsets = (draw.to(pixels.device) * (lengths - size + 1)).long().clamp_max(lengths - size)
    columns = offsets[:, None] + torch.arange(size, device=pixels.device)
    crops = pixels.gather(3, columns[:, None, None, :].expand(n, channels, size, size))
    return torch.where(portrait[:, None, None, None], crops.transpose(2, 3), crops)


class CachedImages(Dataset):
    """Decoded pixels in one tensor (on the CPU or the training GPU): squares, or Strips for `crop: random`.

    The loader hands `__getitems__` a batch of indices: a batch is one indexing op, on the pixels' device.
    """

    def __init__(self, pixels: torch.Tensor | Strips) -> None:
        self.pixels = pixels

    @property
    def tensor(self) -> torch.Tensor:
        """The pixels tensor (of the Strips, for `crop: random`)."""
        return self.pixels.pixels if isinstance(self.pixels, Strips) else self.pixels

    def __len__(self) -> int:
        """The number of images."""
        return len(self.tensor)

    def each(self, function: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Strips:
        """`function` of the pixels tensor, or of each tensor of the Strips."""
        return Strips(*map(function, self.pixels)) if isinstance(self.pixels, Strips) else function(self.pixels)

    def __getitems__(self, indices: list[int]) -> torch.Tensor | Strips:
        """The batch of these images, in one indexing op."""
        index = torch.as_tensor(indices, device=self.tensor.device)
        return self.each(lambda t: t[index])

    def __getitem__(self, i: int) -> torch.Tensor | Strips:
        """Image i's pixels."""
        return self.each(lambda t: t[i])

    def to(self, device: torch.device) -> CachedImages:
        """Move the pixels to `device`."""
        self.pixels = self.each(lambda t: t.to(device))
        return self


def decoded_bytes(images: ResizedImages) -> int:
    """The most the decoded pixels can take (a random crop keeps up to MAX_ASPECT times a square per image)."""
    return int(len(images) * 3 * images.image_size**2 * (MAX_ASPECT if images.crop == "random" else 1))


def should_cache(images: ResizedImages, cache: str, cache_max_gb: float) -> bool:
    """`cache: memory`, or `cache: auto` with the decoded pixels at most `cache_max_gb`.

    A random crop keeps up to MAX_ASPECT times a square per image (`decoded_bytes`).
    """
    return cache == "memory" or (cache == "auto" and decoded_bytes(images) / 1e9 <= cache_max_gb)


def decode_all(images: ResizedImages, num_workers: int, trainer: Trainer | None = None) -> torch.Tensor | Strips:
    """Decode and resize every image once, in `num_workers` processes; skip and count the unreadable ones.

    Each batch from a worker is copied out of its shared memory as it arrives (squares into one tensor made up
    front, strips into per-batch copies joined at the end, their long side being known only then): only the
    batches the loader prefetches hold shared memory and open files, whatever the number of images.
    """
    n, size, random = len(images), images.image_size, images.crop == "random"
    squares = torch.empty((0 if random else n, 3, size, size), dtype=torch.uint8)
    strips: list[Strips] = []
    kept, smaller, failures = 0, 0, []
    bar = progress_bar(trainer, f"Caching {n} images", n, "image")
    indices: Any = range(n)  # (any sized, indexable object will do)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each copy is small and the workers keep the cores busy: threads would wait on them
    # Its own generator: the training RNG is the same after decoding here as after reading the shared cache.
    loader = DataLoader(
        indices, batch_size=32, num_workers=num_workers, collate_fn=images.try_load, generator=torch.Generator()
    )
    try:
        for batch in loader:
            if isinstance(batch.pixels, Strips):
                strips.append(Strips(*(part.clone() for part in batch.pixels)))
            elif batch.pixels is not None:
                squares[kept : kept + batch.read] = batch.pixels
            kept, smaller = kept + batch.read, smaller + batch.smaller
            failures += batch.errors
            bar.update(batch.read + len(batch.errors))
    except (RuntimeError, OSError) as err:
        explained = limit_hit(err, num_workers)
        if explained is None:
            raise
        traceback.clear_frames(err.__traceback__)  # the loader's workers and pipes: closed now, not with the error
        raise RuntimeError(explained) from err
    finally:
        torch.set_num_threads(threads)
        bar.close()
    if failures:
        examples = "; ".join(failures[:3])
        rank_zero_warn(f"Skipped {len(failures)} of {n} images that could not be read, e.g. {examples}")
    if not kept:
        raise ValueError(f"None of the {n} images could be read, e.g. {failures[0]}")
    if smaller:
        rank_zero_info(f"{smaller} of {kept} images are smaller than {size} px: upscaled.")
    rank_zero_info(f"Cached {kept} images of {size} px in memory.")
    return Strips.join(strips) if random else squares[:kept]


def limit_hit(err: BaseException, num_workers: int) -> str | None:
    """One line naming the resource limit a loader failure ran into and the way past it; None for any other failure.

    A worker's error reaches this process as its type with the worker's traceback as the message.
    """
    text = str(err)
    without_workers = " or set --data.num_workers 0" if num_workers else ""
    if "Too many open files" in text or "ancdata" in text or getattr(err, "errno", None) == errno.EMFILE:
        import resource  # (Unix only, as these errors are)

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (
            f"Ran out of open files decoding the images (the open-file limit, `ulimit -n`, is {soft}): raise it "
            f"before the command, e.g. `ulimit -n {max(4 * soft, 65536)}`{without_workers}."
        )
    if "No space left on device" in text or "shared memory" in text:
        free = shutil.disk_usage("/dev/shm").free / 2**20 if os.path.isdir("/dev/shm") else 0
        return (
            f"Ran out of shared memory passing decoded images from the loader processes ({free:.0f} MB free in "
            f"/dev/shm): enlarge it (in Docker, `--shm-size 8g`){without_workers}."
        )
    return None
