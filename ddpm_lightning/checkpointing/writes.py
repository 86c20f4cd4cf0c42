"""Checkpoint writes that survive interruptions.

Each file is written beside its destination and renamed into place (`AtomicCheckpointIO`), in one background thread
that removes the previous file and re-points `last.ckpt` only once the new one is complete
(`BackgroundCheckpointIO`); what a killed write leaves (a `files.PARTIAL` file) is swept at the next start
(`files.remove_partial_files`). A failed write stops the run in one line: why, what is kept, what next (`write_error`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from ..files import PARTIAL, next_run, why_not_written

log = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full or read-only disk, ...); the previous one is kept as `last`."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside its destination, fsync it, then rename it into place.

    A process killed mid-write leaves the previous file intact. Lightning's own save renames a temporary
    file from the system's temp folder, which becomes a plain, interruptible copy when that folder is on
    another file system than the checkpoints (common on clusters: local /tmp, checkpoints on shared storage).
    A failed write (a full disk: torch reports it as "unexpected pos ...") raises CheckpointWriteError, one line
    naming the file, the free space and the fix.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write the checkpoint to a temporary file beside `path`, then rename it into place."""
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")  # never matches last*.ckpt
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)  # atomic on POSIX and Windows within one file system
        except (OSError, RuntimeError) as err:
            raise write_error(path, err) from err
        finally:
            partial.unlink(missing_ok=True)

    def link(self, target: str, link: str) -> None:
        """Point `link` at `target` (relative, so the folder can move); swapped in atomically like a save."""
        partial = Path(link).with_name(f".{Path(link).name}{PARTIAL}{os.getpid()}")
        partial.unlink(missing_ok=True)
        try:
            os.symlink(os.path.relpath(target, os.path.dirname(link)), partial)
        except OSError:  # no symlinks (Windows without the right): a copy, as Lightning falls back to
            shutil.copy(target, partial)
        os.replace(partial, link)


def write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    """The one-line error of a failed checkpoint write: why, what is kept, and what to do."""
    last = path.parent / "last.ckpt"
    has_last = last.is_symlink() and last.exists()
    kept = f"last.ckpt still points at {os.readlink(last)}" if has_last else "no last.ckpt"
    return CheckpointWriteError(
        f"Cannot write the checkpoint {path} ({why_not_written(path.parent, err)}): training stopped, nothing was "
        f"deleted ({kept}). Free some space (or choose another --checkpoint.dirpath), then {next_run(has_last)}."
    )


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Checkpoints written by one background thread, with removals and links queued behind the writes.

    The tensors are copied on the training thread first, as in Lightning's AsyncCheckpointIO. The previous
    checkpoint is deleted, and `last.ckpt` re-pointed, only once the new file is complete. After a failed write
    nothing queued behind it runs (the previous checkpoint stays, and `last` on it), and the next save (or the end
    of `fit`, which waits for the queue) raises the error.
    """

    def __init__(self, checkpoint_io: AtomicCheckpointIO | None = None) -> None:
        super().__init__(checkpoint_io or AtomicCheckpointIO())
        self._queue: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None  # the first failed task's error: nothing after it runs
        self._reported = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Copy the tensors now and queue their write."""
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())  # the values now
        self._in_order(self.checkpoint_io.save_checkpoint, copy, path, storage_options)

    def remove_checkpoint(self, path: str | Path) -> None:
        """Queue the file's removal behind the writes."""
        self._in_order(self.checkpoint_io.remove_checkpoint, path)

    def link(self, target: str, link: str) -> None:
        """Queue the link behind the writes."""
        self._in_order(self.checkpoint_io.link, target, link)

    def _in_order(self, function: Callable[..., object], *args: object) -> None:
        self._raise_failure()
        if self._queue is None:  # (again after a teardown: fit, then validate)
            self._queue = ThreadPoolExecutor(max_workers=1)

        def run() -> None:
            if self._failure is None:
                try:
                    function(*args)
                except BaseException as err:
                    self._failure = err

        self._queue.submit(run)

    def _raise_failure(self) -> None:
        if self._failure is not None and not self._reported:
            self._reported = True  # once: Lightning tears down again while handling it
            raise self._failure

    def teardown(self) -> None:
        """Wait for the queued work, then raise its failure, if any."""
        if self._queue is not None:
            self._queue.shutdown(wait=True)
            self._queue = None
        self._raise_failure()
