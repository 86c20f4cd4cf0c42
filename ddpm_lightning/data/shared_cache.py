"""Decoded images shared by the processes of one machine and by its later runs.

The first process that needs a data set's pixels decodes them and writes them to one file (atomically); every
process then memory-maps that file, so its
pages are shared through the OS's page cache (one copy per machine, however many DDP ranks) and a later run or a
resume on the same images decodes nothing.

A file is named by a hash of everything its pixels depend on (`key`): each image's bytes, or its file's path, size,
modification and change times and inode; the image size and crop; the decoding libraries' versions. Changed images,
size or crop are another file, never a stale one. Each file holds a CRC-32 of its pixels, checked whenever it is
read: a damaged file (a bad disk block, a partial copy) is decoded again, never trained on. The folder
(`default_dir()`, or `data.cache_dir`) keeps at most `data.cache_disk_gb` of them, the least recently used deleted
first. Where it cannot be used (not writable, no file locks, a full disk), each process decodes into its own memory
instead, as with `data.cache_disk_gb 0`, and one warning says why.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import datasets
import PIL
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..files import PARTIAL, first_line

log = logging.getLogger(__name__)

FORMAT = 2  # raise when what a file holds, or how pixels are decoded, changes: older files are then never read
ABANDONED_S = 3600  # a partial file untouched this long was left by a killed process: deleted when making room


def default_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm_lightning/decoded, i.e. ~/.cache/ddpm_lightning/decoded by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm_lightning" / "decoded"


def key(rows: datasets.Dataset, column: str, image_size: int, crop: str, max_aspect: float) -> str:
    """A name for the pixels of `rows` decoded at `image_size` with `crop`, in their order.

    It is a hash of each row's bytes (an in-file image) or path, size, modification and change times and inode (an
    image file), and of the settings. The change time catches a file rewritten with its old size and modification
    time put back (`touch -r`, `rsync`, `cp --preserve`): only the kernel sets it.
    """
    settings = {"format": FORMAT, "size": image_size, "crop": crop, "max_aspect": max_aspect, "rows": len(rows)}
    settings |= {"pillow": PIL.__version__, "torchvision": torchvision.__version__}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for batch in rows.with_format("arrow").iter(batch_size=4096):
        for row in batch[column].to_pylist():
            data, path = (row or {}).get("bytes"), (row or {}).get("path")
            if data is not None:
                digest.update(b"bytes %d\0" % len(data))
                digest.update(data)
                continue
            path = os.path.abspath(path) if path else ""
            try:
                stat = os.stat(path)
                digest.update(
                    f"file {path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\0".encode()
                )
            except OSError:
                digest.update(f"missing {path}\0".encode())  # unreadable now: skipped when decoded
    return digest.hexdigest()[:40]


def load_or_make(
    folder: Path, name: str, most_bytes: int, disk_gb: float, make: Callable[[], list[torch.Tensor]]
) -> tuple[list[torch.Tensor], Path | None]:
    """The tensors stored as `name` in `folder`, memory-mapped; made by `make` and stored first if absent.

    One process at a time makes them (a file lock: the others wait, then map what it stored). Returns them and the
    file, or `make()`'s own tensors and None where the folder cannot hold them (`most_bytes` over `disk_gb`, not
    writable, no file locks, a full disk).
    """
    path = folder / f"{name}.pt"
    found = read(path)
    if found is not None:
        return found, path
    if most_bytes > disk_gb * 1e9:
        rank_zero_info(
            f"The decoded images take up to {most_bytes / 1e9:.1f} GB, more than data.cache_disk_gb "
            f"({disk_gb:g}): each process decodes them into its own memory."
        )
        return make(), None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{name}.lock", "a")  # (held until the file is stored)
    except OSError as err:
        return unusable(folder, err, make), None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        except OSError as err:  # a file system without locks (some network mounts)
            return unusable(folder, err, make), None
        found = read(path, quiet=True)  # stored by another process while this one waited (damage: told above)
        if found is not None:
            return found, path
        tensors = make()
        try:
            write(path, tensors, disk_gb)
        except (OSError, RuntimeError) as err:  # (torch reports a full disk as a RuntimeError)
            return unusable(folder, err, lambda: tensors), None
    stored = read(path, verify=False)  # this process's pages shared too, not a copy of its own beside them
    return (stored, path) if stored is not None else (tensors, None)


def read(path: Path, verify: bool = True, quiet: bool = False) -> list[torch.Tensor] | None:
    """The tensors of a stored file, memory-mapped (read-only use keeps the pages shared).

    None if it is absent, unreadable or damaged (its pixels' checksums differ from those stored with them): then
    made and written again, after a warning unless `quiet`. `verify` False skips the checksums (a file this process
    has just written).
    """
    try:
        stored = torch.load(path, mmap=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):  # (torch reports a damaged archive as a RuntimeError)
        return None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        return None  # (never, by its name: the key holds FORMAT)
    if verify and checksums(stored["tensors"]) != stored.get("checksums"):
        if not quiet:
            warn(f"The decoded images in {path} are damaged (their checksum differs): decoding them again.")
        return None
    try:
        os.utime(path)  # its last use, for the least-recently-used cleanup
    except OSError:  # a read-only cache: still read
        pass
    return stored["tensors"]


def checksums(tensors: list[torch.Tensor]) -> list[int]:
    """The CRC-32 of each tensor's bytes: read once from the mapped file, ~0.6 s per GB on one core."""
    return [zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().data) for t in tensors]


def write(path: Path, tensors: list[torch.Tensor], disk_gb: float) -> None:
    """Store `tensors` as `path`, whole or not at all: written beside it, fsynced, renamed into place.

    The least recently used files are deleted first, to keep the folder within `disk_gb`.
    """
    tensors = [t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for t in tensors]  # no unused rows
    nbytes = sum(t.nbytes for t in tensors) + 2**12  # (and the archive's own few bytes)
    make_room(path.parent, nbytes, disk_gb)
    free = shutil.disk_usage(path.parent).free
    if free < nbytes:
        raise OSError(f"{nbytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
    partial = path.with_name(f".{path.stem}{PARTIAL}{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            torch.save({"format": FORMAT, "tensors": tensors, "checksums": checksums(tensors)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def make_room(folder: Path, nbytes: int, disk_gb: float) -> None:
    """Delete the least recently used stored files until `nbytes` more fit within `disk_gb`.

    Also the partial files that killed processes left. A process that has a deleted file mapped keeps reading it.
    """
    stored = []
    for path in folder.glob("*.pt"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted by another process meanwhile
            continue
        stored.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in stored)
    for _, size, path in sorted(stored):
        if total + nbytes <= disk_gb * 1e9:
            break
        path.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)
        total -= size
    for path in folder.glob(f".*{PARTIAL}*"):
        try:
            if time.time() - path.stat().st_mtime > ABANDONED_S:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def unusable(folder: Path, err: BaseException, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """`make()`, after one warning saying why the shared cache is not used."""
    warn(
        f"Cannot keep the decoded images in {folder} ({first_line(err)}): each process decodes them into its own "
        "memory. Give a writable folder on a local disk with --data.cache_dir (or --data.cache_disk_gb 0 to use none)."
    )
    return make()


@rank_zero_only
def warn(message: str) -> None:
    """A warning as a message on the package's log (not Python's `file:line: UserWarning:` form), from rank 0."""
    log.warning(message)
