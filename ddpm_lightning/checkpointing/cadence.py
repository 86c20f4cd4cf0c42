"""When checkpoints are written: `PeriodicCheckpoint`.

Every 10 minutes of training by default, at the end of the run and on a stop signal (signals.py), one file at a time
with `last.ckpt` a link to it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ..stop_on_nan import check_finite
from .writes import AtomicCheckpointIO


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with a cheap default: a checkpoint every `train_time_interval` of training (10 minutes).

    That is rather than every epoch, with one at the end of the run and one on a stop signal; each save is one file
    (the previous one is deleted with the default save_top_k=1) and `last.ckpt` is a link to it.

    Setting `every_n_train_steps` or `every_n_epochs` replaces the time cadence; `save_top_k: -1` keeps every file.
    An epoch cadence saves at the epoch's end also in epochs that are not validated.

    Args:
        train_time_interval: save every this much training time, "h:mm:ss" (default 0:10:00); null for none.
        save_last: "link": last.ckpt links to the latest file; true: a copy; false: none.
        enable_version_counter: add -v1, -v2 to a name that exists (off: a run has its own folder).
    """

    def __init__(
        self,
        *args: Any,
        train_time_interval: timedelta | None = timedelta(minutes=10),
        save_last: bool | str | None = "link",
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        # No version counter by default: a run has its own folder, so `last.ckpt` is always this run's (the
        # counter would write last-v1.ckpt on resume, as a linked save does not record the link's name).
        if kwargs.get("every_n_train_steps") or kwargs.get("every_n_epochs"):
            train_time_interval = None
        # An epoch cadence saves at every due epoch's end. Left to itself Lightning saves it after validation where
        # trainer.check_val_every_n_epoch is not 1 (configs/tiny.yaml), and the epochs between go unsaved. A
        # monitored metric keeps Lightning's choice: it is there after validation.
        if kwargs.get("save_on_train_epoch_end") is None and kwargs.get("monitor") is None:
            kwargs["save_on_train_epoch_end"] = True
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

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        stale, self._stale = self._stale, []
        kept = {os.path.abspath(p) for p in [*self.best_k_models, self.last_model_path] if p}
        for path in stale:
            if os.path.abspath(path) not in kept:
                super()._remove_checkpoint(trainer, path)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Queue for removal the files an earlier cadence kept in this folder, where one file is kept."""
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
        """Refuse to save weights that are not finite."""
        check_finite(trainer)  # (called on every rank before anything is written)

    def _monitor_candidates(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        if ended_inside_its_epoch(trainer):  # named after the epoch underway, as its checkpoint is saved
            candidates["epoch"] = torch.tensor(epoch_underway(trainer))
        return candidates

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
        """Save as the cadence says, and at the last epoch's end."""
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs > 0:
            self.save_now(trainer)  # the last epoch's end: the run's final checkpoint, named after that epoch

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the run's end."""
        self.save_now(trainer)  # the end of the run is always saved, whatever the cadence (unless just saved)
        super().on_train_end(trainer, pl_module)


def ended_inside_its_epoch(trainer: Trainer) -> bool:
    """Whether the run stops inside an epoch whose end hooks run (or ran): `max_steps` (or a stop request) came first.

    Lightning then runs the epoch's end as if its batches were done, and counts it done; a checkpoint saved from
    here on is saved as the middle of that epoch instead (PreemptionCheckpoint.on_save_checkpoint), so a run
    resumed from it with a larger max_steps or max_epochs goes on with the epoch's next batch, as the run that never
    stopped does.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    in_epoch_end = epochs.started > 0 and epochs.processed == epochs.started  # its end hooks began
    return in_epoch_end and not batches.is_last_batch and batches.current.ready < trainer.num_training_batches


def epoch_underway(trainer: Trainer) -> int:
    """The epoch the run is in (counted from 0): the one whose end hooks run, until the next one starts."""
    return trainer.fit_loop.epoch_progress.current.started - 1
