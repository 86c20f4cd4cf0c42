"""Checkpoints that cost little and survive interruptions, and resume exactly: a time cadence, writes in a
background thread that are atomic, `last.ckpt` a link, a save on SIGTERM / SIGUSR1 / Ctrl-C and at the end, the
RNG states a checkpoint carries (`RNGStates`), and resume checks.

    ddpm-lightning fit -c configs/butterflies.yaml                    # kill -TERM <pid>: saves, exits 0
    ddpm-lightning fit -c configs/butterflies.yaml --ckpt_path last   # continues from that step
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import zipfile
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning_utilities.core.apply_func import apply_to_collection

from .stop_on_nan import check_finite

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

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
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


PARTIAL = ".partial-"  # a write in progress: .<name>.partial-<pid> beside its destination


def remove_partial_files(folder: str | Path | None) -> None:
    """Delete what writes killed mid-way left in `folder` (up to a checkpoint's size each); call it only while
    holding the run's lock, so no write of another process is in progress there."""
    if folder is not None and Path(folder).is_dir():
        for path in Path(folder).glob(f".*{PARTIAL}*"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_error(path: Path, err: BaseException) -> CheckpointWriteError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "its folder cannot be read"
    last = path.parent / "last.ckpt"
    kept = f"last.ckpt still points at {os.readlink(last)}" if last.is_symlink() and last.exists() else "no last.ckpt"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointWriteError(
        f"Cannot write the checkpoint {path} ({reason}; {free}): training stopped, nothing was deleted ({kept}). "
        "Free some space (or choose another --checkpoint.dirpath), then resume with --ckpt_path last."
    )


def save_pipeline(unet, scheduler, folder: str | Path) -> None:
    """`DDPMPipeline(unet, scheduler).save_pretrained(folder)`, written beside and swapped in: the new files go to a
    hidden folder inside `folder`, then each replaces its old self in one rename (the weights first, model_index.json
    last). A kill at any moment leaves each file whole, old or new, and the folder a loadable model."""
    from diffusers import DDPMPipeline

    folder = Path(folder)
    staging = folder / f".model{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", p.name))
        for new in files:
            with open(new, "rb") as f:
                os.fsync(f.fileno())  # on disk before any rename
        for new in sorted(files, key=lambda p: p.name == "model_index.json"):
            destination = folder / new.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(new, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Checkpoints written by one background thread (the tensors are copied on the training thread first, as in
    Lightning's AsyncCheckpointIO), with removals and links queued behind the writes: the previous checkpoint is
    deleted, and `last.ckpt` re-pointed, only once the new file is complete. After a failed write nothing queued
    behind it runs (the previous checkpoint stays, and `last` on it), and the next save (or the end of `fit`, which
    waits for the queue) raises the error."""

    def __init__(self, checkpoint_io: AtomicCheckpointIO | None = None):
        super().__init__(checkpoint_io or AtomicCheckpointIO())
        self._queue: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None  # the first failed task's error: nothing after it runs
        self._reported = False

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())  # the values now
        self._in_order(self.checkpoint_io.save_checkpoint, copy, path, storage_options)

    def remove_checkpoint(self, path) -> None:
        self._in_order(self.checkpoint_io.remove_checkpoint, path)

    def link(self, target: str, link: str) -> None:
        self._in_order(self.checkpoint_io.link, target, link)

    def _in_order(self, function, *args) -> None:
        self._raise_failure()
        if self._queue is None:  # (again after a teardown: fit, then validate)
            self._queue = ThreadPoolExecutor(max_workers=1)

        def run():
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
        if self._queue is not None:
            self._queue.shutdown(wait=True)
            self._queue = None
        self._raise_failure()


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with a cheap default: a checkpoint every `train_time_interval` of training (10 minutes)
    rather than every epoch, one at the end of the run and one on a stop signal; each save is one file (the
    previous one is deleted with the default save_top_k=1) and `last.ckpt` is a link to it.

    Setting `every_n_train_steps` or `every_n_epochs` replaces the time cadence; `save_top_k: -1` keeps every file.

    Args:
        train_time_interval: save every this much training time, "h:mm:ss" (default 0:10:00); null for none.
        save_last: "link": last.ckpt links to the latest file; true: a copy; false: none.
        enable_version_counter: add -v1, -v2 to a name that exists (off: a run has its own folder).
    """

    def __init__(
        self,
        *args,
        train_time_interval: timedelta | None = timedelta(minutes=10),
        save_last: bool | str | None = "link",
        enable_version_counter: bool = False,
        **kwargs,
    ):
        # No version counter by default: a run has its own folder, so `last.ckpt` is always this run's (the
        # counter would write last-v1.ckpt on resume, as a linked save does not record the link's name).
        if kwargs.get("every_n_train_steps") or kwargs.get("every_n_epochs"):
            train_time_interval = None
        super().__init__(
            *args,
            train_time_interval=train_time_interval,
            save_last=save_last,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self._stale: list[str] = []

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # The previous file goes once `last` points at the new one (both queued behind its write): a kill at
        # any moment leaves `last` pointing at a complete checkpoint.
        if self.save_last:
            self._stale.append(filepath)
        else:
            super()._remove_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        stale, self._stale = self._stale, []
        kept = {os.path.abspath(p) for p in [*self.best_k_models, self.last_model_path] if p}
        for path in stale:
            if os.path.abspath(path) not in kept:
                super()._remove_checkpoint(trainer, path)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # Resumed with another cadence: Lightning restores no state saved under another cadence (state_key), so
        # the old cadence's file would stay beside the new one. Where one file is kept, it goes at the next save.
        states = checkpoint.get("callbacks", {})
        if self.state_key in states or self.save_top_k != 1 or self.monitor is not None:
            return
        for state in states.values():
            if isinstance(state, dict) and state.get("dirpath") == self.dirpath:
                old = [state.get("best_model_path"), *state.get("best_k_models", {})]
                self._stale += [path for path in old if path and os.path.exists(path)]

    def _link_checkpoint(self, trainer: Trainer, filepath: str, linkpath: str) -> None:
        io = trainer.strategy.checkpoint_io
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            (io.link if hasattr(io, "link") else AtomicCheckpointIO().link)(filepath, linkpath)
        trainer.strategy.barrier()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        check_finite(trainer)  # (called on every rank before anything is written)

    def save_now(self, trainer: Trainer) -> None:
        """A checkpoint at this step (unless one was just written), as the cadence would write it, and `last`."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        else:  # the monitored metric is not there yet: a plain file
            self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs > 0:
            self.save_now(trainer)  # the last epoch's end: the run's final checkpoint, named after that epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_now(trainer)  # the end of the run is always saved, whatever the cadence (unless just saved)
        super().on_train_end(trainer, pl_module)


class _SignalAtOptimizerStep(_SignalConnector):
    """Lightning's signal connector, whose SIGTERM flag reads as set only where an optimizer step has just been
    taken: Lightning's loops check the flag after each micro-batch, and a stop inside a gradient-accumulation
    window would lose the window's gradients (a checkpoint holds no gradients)."""

    @property
    def received_sigterm(self) -> bool:
        return self.__dict__.get("_sigterm", False) and not self.trainer.fit_loop.epoch_loop._should_accumulate()

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:
        self.__dict__["_sigterm"] = value

    def teardown(self) -> None:
        """Lightning puts the handlers from before `fit` back: SIGTERM's default, which ends the process (status
        143), and ours for SIGUSR1, which Python resets to its default (the same) as the interpreter exits. Once a
        stop is under way, a repeated SIGTERM or SIGUSR1 is the same request: from here to the process's end it is
        ignored, so the run exits as the first one asked (0, its checkpoint saved). Both are held while the
        handlers are swapped, so none arrives in between."""
        stop_signals = {signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM)}
        if not self.__dict__.get("_sigterm", False) or not hasattr(signal, "pthread_sigmask"):
            return super().teardown()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            super().teardown()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if signal.getsignal(signal.SIGUSR1) is sigusr1_as_sigterm:
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def sigusr1_as_sigterm(*_) -> None:
    signal.raise_signal(signal.SIGTERM)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, SIGUSR1 (as SLURM sends before a time limit) or Ctrl-C, save a checkpoint and `last.ckpt` at the
    next optimizer step (after a gradient-accumulation window's step) and exit: status 0 for SIGTERM / SIGUSR1,
    130 for Ctrl-C (the shell's code for it, so a script chained with `&&` does not go on as if training had
    finished). A second Ctrl-C aborts at once.

    Lightning's own SIGTERM handler stops every rank at the next step boundary by raising SIGTERMException;
    this callback saves the checkpoint there (all ranks take part, as saving needs), so
    `--ckpt_path last` continues from that step. Under SLURM with auto-requeue, Lightning handles SIGUSR1
    itself (it saves and requeues), so SIGUSR1 is left to it.

    A grid or a quality measurement stops at its next denoising step (`sampling.stop_if_signalled`); what the
    interrupted epoch end or validation had left to do is skipped, and the resume warns once (`skipped_work`).
    A repeated SIGTERM / SIGUSR1 while stopping changes nothing (`_SignalAtOptimizerStep.teardown`).
    """

    interrupted = False  # set by Ctrl-C: main() turns the stop's exit status into 130

    def __init__(self):
        self._between_epochs = False
        self._skipped = ""  # what the stop left undone (skipped_work), noted in its checkpoint
        self._previous_sigusr1 = None
        self._previous_sigint = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and hasattr(signal, "SIGUSR1") and not slurm_requeue:
            # SIGUSR1 becomes a SIGTERM, which Lightning turns into a stop at the next step on every rank.
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, sigusr1_as_sigterm)
        if stage == "fit" and type(trainer._signal_connector) is _SignalConnector:
            trainer._signal_connector.__class__ = _SignalAtOptimizerStep  # its handlers are bound to this object

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # From here on (Lightning's SIGTERM handler is in place), Ctrl-C stops like SIGTERM; before, it is the
        # plain KeyboardInterrupt (no step to save yet).
        PreemptionCheckpoint.interrupted = False
        self._previous_sigint = signal.signal(signal.SIGINT, self._first_ctrl_c)

    def _first_ctrl_c(self, *_) -> None:
        log.info("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again aborts at once).")
        PreemptionCheckpoint.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one raises KeyboardInterrupt
        signal.raise_signal(signal.SIGTERM)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        # A stop after the epoch's last batch (Lightning checks the signal after the epoch ended; a grid's sampling
        # checks it during the epoch-end hooks) is saved as the next epoch's start: the epoch counted as done, its
        # batches not (the epoch loop still counts them, and Lightning the loader's position at its end, until the
        # next epoch starts; resumed with them, the next epoch would have no batches left).
        if self._between_epochs:
            loops = checkpoint["loops"]["fit_loop"]
            for counts in loops["epoch_progress"].values():
                counts["completed"] = counts["processed"]
            batches = loops["epoch_loop.batch_progress"]
            loops["epoch_loop.batch_progress"] = {
                **batches,
                "current": dict.fromkeys(batches["current"], 0),
                "is_last_batch": False,
            }
            loops["state_dict"].pop("combined_loader", None)
        if self._skipped:
            checkpoint[SKIPPED] = self._skipped

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if checkpoint.get(SKIPPED):
            rank_zero_warn(f"This run was stopped by a signal {checkpoint[SKIPPED]}.")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None or not checkpoint.dirpath:
            return
        epochs = trainer.fit_loop.epoch_progress.current
        in_epoch_end = epochs.processed > epochs.completed  # (`processed` counts before the epoch-end hooks)
        self._between_epochs = in_epoch_end or epochs.completed == epochs.started
        self._skipped = skipped_work(trainer, in_epoch_end)
        if isinstance(checkpoint, PeriodicCheckpoint):
            checkpoint.save_now(trainer)
            path = checkpoint.last_model_path
        else:
            path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
            trainer.save_checkpoint(path)
        skipped, self._between_epochs, self._skipped = self._skipped, False, ""
        note = f"; stopped {skipped}" if skipped else ""
        log.info(f"[rank {trainer.global_rank}] Stopped by a signal at step {trainer.global_step}: saved {path}{note}")


SKIPPED = "skipped_after_a_stop"  # a checkpoint's note of the interrupted work that a resumed run does not redo


def skipped_work(trainer: Trainer, in_epoch_end: bool) -> str:
    """What a stop in the middle of an epoch's end or of a validation leaves undone, for good: a resumed run goes
    on from the next step, as Lightning resumes (it does not run an epoch's end, or a validation, twice)."""
    epoch = trainer.current_epoch
    if in_epoch_end:
        last = (
            trainer.max_epochs is not None
            and 0 < trainer.max_epochs <= epoch + 1
            or 0 < trainer.max_steps <= trainer.global_step
        )
        export = " (this was the run's last epoch: `ddpm-lightning export <this checkpoint> <folder>` writes the model)"
        return (
            f"during the end of epoch {epoch} (its grid): that epoch's grid, and its model save when one was due, "
            f"were not written and are not redone{export if last else ''}"
        )
    if trainer.validating:
        return f"during epoch {epoch}'s validation: that epoch's val/ metrics (loss, FID/KID) were not logged"
    return ""


class RNGStates(Callback):
    """The torch, CUDA, numpy and Python RNG states in every checkpoint (in types `torch.load(weights_only=True)`
    accepts), restored on resume: Lightning keeps none, and with them the noise, timestep and flip draws continue."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }

    def load_state_dict(self, states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(states["python"])

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:  # a 0.1.0 checkpoint: the module saved them at the top level
            self.load_state_dict(checkpoint["rng_states"])


FRESH_START = "To start the run again from step 0 instead: leave --ckpt_path out and pass --overwrite true."


class SameData(Callback):
    """A checkpoint records its run's data settings (Lightning keeps the data module's hyperparameters) and the number
    of training images; a resume that changes them says so. Another image size is refused: the UNet was trained at
    one size, and its saved folder says which. Any other change (the data set, the batch size, images added or
    removed, ...) goes on with one warning naming it: from there on, the images come in another order than in
    the uninterrupted run, so it no longer equals that run."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        images = train_images(trainer)
        if images is not None:
            checkpoint["train_images"] = images

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        then = checkpoint.get("datamodule_hyper_parameters") or {}
        now = dict(trainer.datamodule.hparams) if trainer.datamodule is not None else {}
        if "image_size" in then and then["image_size"] != now.get("image_size", then["image_size"]):
            raise ValueError(
                f"The checkpoint was trained at data.image_size {then['image_size']}, not {now['image_size']}: a "
                f"resumed run keeps its image size (resume with --data.image_size {then['image_size']}). To train "
                "at another size, start a new run (another --output_dir)."
            )
        changed = [
            f"{key} {then[key]!r} -> {now[key]!r}" for key in sorted(then) if key in now and then[key] != now[key]
        ]
        images = train_images(trainer)
        if "train_images" in checkpoint and images is not None and checkpoint["train_images"] != images:
            changed.append(f"{checkpoint['train_images']} -> {images} training images")
        if changed:
            rank_zero_warn(
                f"Resuming with other data than the checkpoint's run ({'; '.join(changed)}): training goes on with "
                "it, but the images now come in another order than in the uninterrupted run, so the result will not "
                "equal that run's."
            )


def train_images(trainer: Trainer) -> int | None:
    images = getattr(trainer.datamodule, "train_set", None)
    return len(images) if images is not None else None


def check_ckpt_path(ckpt_path: str | None, checkpoint: ModelCheckpoint | None) -> None:
    """Fail before training, with the fix, where Lightning would start from scratch (a `last` that is missing or
    points at nothing) or fail deep inside torch.load (a truncated file)."""
    if ckpt_path is None or "://" in ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return
    if ckpt_path == "last":
        if checkpoint is None:  # not known yet: checked again once the Trainer exists
            return
        folder = Path(checkpoint.dirpath) if checkpoint.dirpath else None
        found = [p for p in folder.glob("last*.ckpt") if LAST.match(p.name)] if folder and folder.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last.ckpt in {folder or 'the checkpoint folder'} to resume from. "
                "Give the checkpoint's path (or --checkpoint.dirpath, if the run kept its checkpoints elsewhere). "
                + FRESH_START
            )
        existing = [p for p in found if p.exists()]
        if not existing:  # a link whose file was deleted or never written
            link = found[0]
            raise FileNotFoundError(
                f"--ckpt_path last: {link} points at {os.readlink(link) if link.is_symlink() else '?'}, which "
                f"does not exist. Resume from another checkpoint in {folder} by its path, if there is one. "
                + FRESH_START
            )
        latest = max(existing, key=lambda p: p.stat().st_mtime)  # the one Lightning picks
        ckpt_path = f"last ({latest} -> {latest.resolve()})" if latest.is_symlink() else f"last ({latest})"
        path = latest.resolve()
    else:
        path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file.")
    try:  # a checkpoint is a zip archive; a truncated one has lost its central directory at the end
        zipfile.ZipFile(path).close()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is not a readable checkpoint ({err}): it is truncated or corrupt. "
            "Resume from another checkpoint by its path (an epoch=*.ckpt beside it, if there is one). " + FRESH_START
        ) from err
    try:  # (memory-mapped: no tensor is read) a plain torch.save of weights is no checkpoint to resume
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # objects weights_only refuses: left to Lightning's own loading
        return
    if not isinstance(content, dict) or "pytorch-lightning_version" not in content:
        raise ValueError(
            f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no pytorch-lightning_version: a plain torch.save?). "
            "Give a .ckpt written by `ddpm-lightning fit` (its checkpoint folder's last.ckpt)."
        )


LAST = re.compile(r"^last(-\d+)?\.ckpt$")  # the names Lightning's `--ckpt_path last` looks for
