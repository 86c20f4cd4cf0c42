"""Progress bars: the training bar without a GPU sync per step, and a bar for long work outside the training loop.

The training bar is `TrainingProgressBar`; `progress_bar` is the other (caching the images, drawing a grid).

Lightning turns every value logged with `prog_bar=True` into a Python number after each batch
(`_ResultCollection.metrics`: `convert_tensors_to_scalars`), whether or not a bar shows it: a read of a device
tensor, so a wait for the GPU every step. So DDPMModule logs train/loss and train/lr (and ImagesThroughput img/s)
without it, and this bar reads them from `trainer.callback_metrics` (device tensors, left unread by Lightning) every
`log_every_n_steps` optimizer steps, when the loggers read them anyway, and at the first step. The CLI puts it in
place of Lightning's default bar.

The bar also shows the whole run's remaining time (`run left=1:02:03`), from `RemainingTime`: measured step time
and measured epoch ends (validation, grids, model saves, checkpoints), read from the host's clock without a wait
for the GPU.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

SHOWN = ("img/s", "train/loss", "train/lr")  # img/s: logged by monitor.ImagesThroughput on log steps


class RemainingTime:
    """The run's remaining wall time, from the time between batch ends as measured so far.

    A batch's time is the mean over the batches of the last `window_seconds` (at least the last 10): it follows
    a change of speed within that window, and a checkpoint written between two batches is spread over it. The time
    an epoch end adds (validation, grids, model saves, checkpoints, the next epoch's first batch wait) beyond one
    batch is measured at each epoch end; the mean over the ends so far counts once for each end still to come (the
    run's own end included). Until an end has been measured the estimate leaves them out, and says so
    (`remaining` returns `measured_ends` 0).

    Args:
        window_seconds: the span of recent batches whose mean time is the batch time.
    """

    def __init__(self, window_seconds: float = 120.0) -> None:
        self.window_seconds = window_seconds
        self.intervals: deque[float] = deque()
        self.window_sum = 0.0
        self.last_end: float | None = None
        self.ends_seconds: list[float] = []  # what each epoch end (or validation) added beyond one batch
        self.after_end = False  # an epoch end or validation happened since the last batch end

    def batch_end(self, now: float) -> None:
        """A training batch ended at `now` (seconds, any clock)."""
        if self.last_end is not None:
            interval = now - self.last_end
            if self.after_end:
                if self.intervals:
                    self.ends_seconds.append(max(0.0, interval - self.batch_seconds()))
            else:
                self.intervals.append(interval)
                self.window_sum += interval
                while len(self.intervals) > 10 and self.window_sum - self.intervals[0] >= self.window_seconds:
                    self.window_sum -= self.intervals.popleft()
        self.last_end, self.after_end = now, False

    def epoch_end(self) -> None:
        """An epoch ended, or validation ran: the next interval holds that work and one batch."""
        if self.last_end is not None:
            self.after_end = True

    def batch_seconds(self) -> float:
        """The mean time of a batch in the window."""
        return self.window_sum / len(self.intervals)

    def remaining(self, batches_left: int, ends_left: int) -> tuple[float, int] | None:
        """Seconds left for `batches_left` batches and `ends_left` epoch ends, and how many ends were measured.

        None until two batch intervals have been measured.
        """
        if len(self.intervals) < 2:
            return None
        per_end = sum(self.ends_seconds) / len(self.ends_seconds) if self.ends_seconds else 0.0
        return batches_left * self.batch_seconds() + ends_left * per_end, len(self.ends_seconds)


def batches_and_ends_left(trainer: Trainer, batch_idx: int) -> tuple[int, int] | None:
    """Training batches (micro-batches) left in the run after `batch_idx`, and epoch ends left (the run's end too).

    None when the run has no set length (max_steps and max_epochs both -1) or the epoch's length is unknown.
    """
    total = trainer.estimated_stepping_batches  # optimizer steps of the whole run (Lightning's own count)
    per_epoch = trainer.num_training_batches
    if not math.isfinite(total) or not math.isfinite(per_epoch) or per_epoch <= 0:
        return None
    batches_left = max(0, int(total) - trainer.global_step) * trainer.accumulate_grad_batches
    in_epoch = max(0, int(per_epoch) - batch_idx - 1)
    ends = 1 if batches_left <= in_epoch else 1 + math.ceil((batches_left - in_epoch) / per_epoch)
    return batches_left, ends


def format_seconds(seconds: float, ends_measured: bool) -> str:
    """`1:02:03` (or `2:03`), with a `+` while the epoch ends are not yet measured (they are left out)."""
    return Tqdm.format_interval(seconds) + ("" if ends_measured else "+")


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with img/s, train/loss and train/lr as of the last log step, and the run's time left.

    The log step is every `log_every_n_steps` steps (Lightning's default cadence, 50 steps, when it is 0). The time
    left (`run left`) is `RemainingTime`'s, updated every batch.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self.shown: dict[str, str] = {}
        self.read_at: int | None = None  # the optimizer step of the values shown
        self.clock = RemainingTime()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Read the values shown on a log step (once per optimizer step), then update the bar."""
        self.clock.batch_end(time.perf_counter())
        left = batches_and_ends_left(trainer, batch_idx)
        estimate = self.clock.remaining(*left) if left is not None else None
        if estimate is not None:
            self.shown["run left"] = format_seconds(estimate[0], ends_measured=estimate[1] > 0)
        step = trainer.global_step
        due = self.read_at is None or step % (trainer.log_every_n_steps or 50) == 0
        if due and step != self.read_at:  # once per optimizer step, not per micro-batch under accumulation
            metrics = trainer.callback_metrics
            self.shown.update({name: f"{float(metrics[name]):.4g}" for name in SHOWN if name in metrics})
            self.read_at = step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the epoch's bar; the time to the next batch end is an epoch end's."""
        self.clock.epoch_end()
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the validation bar; validation (not the sanity check) is timed with the epoch ends."""
        if not trainer.sanity_checking:
            self.clock.epoch_end()
        super().on_validation_start(trainer, pl_module)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        """Lightning's values, with the ones read on the last log step."""
        return {**super().get_metrics(trainer, pl_module), **self.shown}


def progress_bar(trainer: Trainer | None, description: str, total: int, unit: str) -> Tqdm:
    """Lightning's tqdm bar for long work outside the training loop.

    It is shown on rank 0 while the Trainer shows progress bars (disabled, silent, otherwise). The caller updates
    and closes it.
    """
    shown = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
    options = {"dynamic_ncols": True, "leave": False, "file": sys.stdout, "disable": not shown}
    return Tqdm(total=total, desc=description, unit=unit, **options)
