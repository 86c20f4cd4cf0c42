"""Stop signals: a checkpoint at the next optimizer step, then the run's end.

SIGTERM, SIGUSR1 (as SLURM sends before a time limit) and a first Ctrl-C save a checkpoint at the next optimizer
step and end the run (`PreemptionCheckpoint`); a grid or a quality measurement in progress ends at its next
denoising step (`stop_if_signalled`).

    ddpm-lightning fit -c configs/butterflies.yaml                    # kill -TERM <pid>: saves, exits 0
    ddpm-lightning fit -c configs/butterflies.yaml --ckpt_path last   # continues from that step
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors import signal_connector
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .cadence import PeriodicCheckpoint, ended_inside_its_epoch

log = logging.getLogger(__name__)

STOP_SIGNALS = [signal.SIGTERM, *([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])]


class _SignalAtOptimizerStep(_SignalConnector):
    """Lightning's signal connector, whose SIGTERM flag reads as set only where an optimizer step has just been taken.

    Lightning's loops check the flag after each micro-batch, and a stop inside a gradient-accumulation window would
    lose the window's gradients (a checkpoint holds no gradients).
    """

    @property
    def received_sigterm(self) -> bool:
        return self.__dict__.get("_sigterm", False) and not self.trainer.fit_loop.epoch_loop._should_accumulate()

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:
        self.__dict__["_sigterm"] = value

    def teardown(self) -> None:
        """Put the handlers from before `fit` back, then ignore a repeated stop signal.

        Lightning puts back SIGTERM's default, which ends the process (status 143), and ours for SIGUSR1, which
        Python resets to its default (the same) as the interpreter exits. Once a stop is under way, a repeated
        SIGTERM or SIGUSR1 is the same request: from here to the process's end it is ignored, so the run exits as
        the first one asked (0, its checkpoint saved). Both are held while the handlers are swapped, so none
        arrives in between.
        """
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


class CtrlCIsNoSigterm(logging.Filter):
    """Leave Lightning's "Received SIGTERM" line out of its log after a first Ctrl-C.

    A first Ctrl-C arrives as a SIGTERM (PreemptionCheckpoint._first_ctrl_c, which says "Ctrl-C"): Lightning's
    "Received SIGTERM: 15" line would name the wrong signal.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Lightning's "Received SIGTERM" record when a Ctrl-C sent the SIGTERM."""
        return not (PreemptionCheckpoint.interrupted and "Received SIGTERM" in record.getMessage())


def sigusr1_as_sigterm(*_: object) -> None:
    """Handle SIGUSR1 by raising a SIGTERM, which Lightning turns into a stop at the next step."""
    signal.raise_signal(signal.SIGTERM)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, SIGUSR1 or Ctrl-C, save a checkpoint and `last.ckpt` at the next optimizer step and exit.

    SIGUSR1 is what SLURM sends before a time limit; the step is the one after a gradient-accumulation window. The
    exit status is 0 for SIGTERM / SIGUSR1, 130 for Ctrl-C (the shell's code for it, so a script chained with `&&`
    does not go on as if training had finished). A second Ctrl-C aborts at once.

    Lightning's own SIGTERM handler stops every rank at the next step boundary by raising SIGTERMException;
    this callback saves the checkpoint there (all ranks take part, as saving needs), so
    `--ckpt_path last` continues from that step. Under SLURM with auto-requeue, Lightning handles SIGUSR1
    itself (it saves and requeues), so SIGUSR1 is left to it.

    A grid or a quality measurement stops at its next denoising step (`sampling.stop_if_signalled`); what the
    interrupted epoch end or validation had left to do is skipped, and the resume warns once (`skipped_work`).
    A repeated SIGTERM / SIGUSR1 while stopping changes nothing (`_SignalAtOptimizerStep.teardown`).
    """

    interrupted = False  # set by Ctrl-C: main() turns the stop's exit status into 130

    def __init__(self) -> None:
        self._between_epochs = False
        self._skipped = ""  # what the stop left undone (skipped_work), noted in its checkpoint
        self._previous_sigusr1: Callable[[int, FrameType | None], Any] | int | None = None
        self._previous_sigint: Callable[[int, FrameType | None], Any] | int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Turn SIGUSR1 into SIGTERM, and Lightning's SIGTERM flag into one read at optimizer steps."""
        environment = getattr(trainer.strategy, "cluster_environment", None)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and hasattr(signal, "SIGUSR1") and not slurm_requeue:
            # SIGUSR1 becomes a SIGTERM, which Lightning turns into a stop at the next step on every rank.
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, sigusr1_as_sigterm)
        if stage == "fit" and type(trainer._signal_connector) is _SignalConnector:
            trainer._signal_connector.__class__ = _SignalAtOptimizerStep  # its handlers are bound to this object
        lightning_log = logging.getLogger(signal_connector.__name__)
        if not any(isinstance(f, CtrlCIsNoSigterm) for f in lightning_log.filters):
            lightning_log.addFilter(CtrlCIsNoSigterm())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make a first Ctrl-C stop the run as SIGTERM does."""
        # From here on (Lightning's SIGTERM handler is in place), Ctrl-C stops like SIGTERM; before, it is the
        # plain KeyboardInterrupt (no step to save yet).
        PreemptionCheckpoint.interrupted = False
        self._previous_sigint = signal.signal(signal.SIGINT, self._first_ctrl_c)

    def _first_ctrl_c(self, *_: object) -> None:
        log.info("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again aborts at once).")
        PreemptionCheckpoint.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second one raises KeyboardInterrupt
        signal.raise_signal(signal.SIGTERM)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Put back the SIGUSR1 and SIGINT handlers from before."""
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Save a run's end inside an epoch as that epoch underway, a stop between epochs as the next one's start.

        And note the work a stop skipped.
        """
        # A stop after the epoch's last batch (Lightning checks the signal after the epoch ended; a grid's sampling
        # checks it during the epoch-end hooks) is saved as the next epoch's start: the epoch counted as done, its
        # batches not (the epoch loop still counts them, and Lightning the loader's position at its end, until the
        # next epoch starts; resumed with them, the next epoch would have no batches left).
        if ended_inside_its_epoch(trainer):
            # The run stops inside an epoch (max_steps; the epoch-end hooks ran, and Lightning counts it done): the
            # epoch is saved as underway, as a stop signal between steps saves it, so a longer run resumed from here
            # goes on with its next batch instead of starting the next epoch.
            loops = checkpoint["loops"]["fit_loop"]
            for counts in loops["epoch_progress"].values():
                counts["processed"] = counts["completed"] = counts["started"] - 1
            checkpoint["epoch"] = loops["epoch_progress"]["current"]["completed"]
        elif self._between_epochs:
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
        """Warn once that the stopped run skipped some work, if it did."""
        if checkpoint.get(SKIPPED):
            rank_zero_warn(f"This run was stopped by a signal {checkpoint[SKIPPED]}.")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Save the checkpoint and `last.ckpt` when the exception is Lightning's stop on a signal."""
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
    """What a stop in the middle of an epoch's end or of a validation leaves undone, for good.

    A resumed run goes on from the next step, as Lightning resumes (it does not run an epoch's end, or a
    validation, twice).
    """
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


def stop_if_signalled(trainer: Trainer) -> None:
    """Raise Lightning's SIGTERMException once a stop signal has arrived.

    A stop signal is SIGTERM; SIGUSR1 and a first Ctrl-C become one. A grid or a quality measurement ends at that
    denoising step, and the run saves its checkpoint and exits as a stop between training steps does
    (PreemptionCheckpoint), instead of after the whole draw. Every rank decides together, as Lightning's training
    loop does at each step: none is left in the next collective.
    """
    if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
        raise SIGTERMException
