"""Checkpoints that survive interruptions: atomic writes, a save on SIGTERM / SIGUSR1, and resume checks.

    ddpm-lightning fit -c configs/butterflies.yaml                    # kill -TERM <pid>: saves last.ckpt, exits 0
    ddpm-lightning fit -c configs/butterflies.yaml --ckpt_path last   # continues from that step
"""

from __future__ import annotations

import logging
import os
import signal
import zipfile
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside its destination, fsync it, then rename it into place.

    A process killed mid-write leaves the previous file intact. Lightning's own save renames a temporary
    file from the system's temp folder, which becomes a plain, interruptible copy when that folder is on
    another file system than the checkpoints (common on clusters: local /tmp, checkpoints on shared storage).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # never matches last*.ckpt
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)  # atomic on POSIX and Windows within one file system
        finally:
            partial.unlink(missing_ok=True)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, or SIGUSR1 as SLURM sends before a time limit, save `last.ckpt` and exit with status 0.

    Lightning's own SIGTERM handler stops every rank at the next step boundary by raising SIGTERMException;
    this callback saves the checkpoint there (all ranks take part, as saving needs), so
    `--ckpt_path last` continues from that step. Under SLURM with auto-requeue, Lightning handles SIGUSR1
    itself (it saves and requeues), so SIGUSR1 is left to it.
    """

    def __init__(self):
        self._previous_sigusr1 = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and hasattr(signal, "SIGUSR1") and not slurm_requeue:
            # SIGUSR1 becomes a SIGTERM, which Lightning turns into a stop at the next step on every rank.
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, lambda *_: signal.raise_signal(signal.SIGTERM))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if isinstance(exception, SIGTERMException) and checkpoint is not None and checkpoint.dirpath:
            path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
            trainer.save_checkpoint(path)
            log.info(f"[rank {trainer.global_rank}] Stopped by a signal at step {trainer.global_step}: saved {path}")


def check_ckpt_path(ckpt_path: str | None, checkpoint: ModelCheckpoint | None) -> None:
    """Fail before training, with the fix, where Lightning would start from scratch or fail deep inside torch.load."""
    if ckpt_path is None or "://" in ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        if checkpoint is None:  # not known yet: checked again once the Trainer exists
            return
        folder = Path(checkpoint.dirpath) if checkpoint.dirpath else None
        found = sorted(folder.glob("last*.ckpt")) if folder is not None and folder.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last.ckpt in {folder or 'the checkpoint folder'} to resume from. "
                "Leave --ckpt_path out to start from scratch, or give the checkpoint's path "
                "(--checkpoint.dirpath if the run kept its checkpoints elsewhere)."
            )
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file.")
    try:  # a checkpoint is a zip archive; a truncated one has lost its central directory at the end
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is not a readable checkpoint ({err}): it is truncated or corrupt. "
            "Resume from another checkpoint, e.g. an epoch=*.ckpt beside it."
        ) from err
