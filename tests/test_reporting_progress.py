"""The training bar (on by default, as in configs/butterflies.yaml) reads the loss back only on log steps: no
GPU sync per step. Counted on the CPU as calls that would wait for a GPU (`.item()`, `float()`, ...)."""

from __future__ import annotations

import re

import pytest

from ddpm_lightning.cli import main
from ddpm_lightning.reporting.progress import (
    RemainingTime,
    TrainingProgressBar,
    batches_and_ends_left,
    format_seconds,
)

from conftest import HostReads, fit_args, scalars


@pytest.mark.slow
def test_the_bar_shows_the_loss_read_only_on_log_steps(image_folder, tmp_path, monkeypatch, capfd):
    bars = []
    setup = TrainingProgressBar.setup
    monkeypatch.setattr(TrainingProgressBar, "setup", lambda self, *a, **k: bars.append(self) or setup(self, *a, **k))
    out = tmp_path / "run"
    args = [
        "--trainer.enable_progress_bar",
        "true",
        "--trainer.max_steps",
        "10",
        "--data.train_batch_size",
        "1",
        "--trainer.log_every_n_steps",
        "3",
        "--model.nan_check_every_n_steps",
        "100",
        "--speed.fused_adamw",
        "true",  # as on a GPU: a plain AdamW reads its step counter, a CPU tensor, back every step
        "--trainer.callbacks+=conftest.MarkSteps",
    ]
    with HostReads() as reads:
        main(fit_args(image_folder, out, *args))
    [bar] = bars  # Lightning's default bar was replaced by this one
    read_steps = {s for s in reads.steps if isinstance(s, int)}
    # The first step, the loggers' steps, and the last (the NaN check and the grid at the end of the run).
    assert read_steps <= {1, 3, 6, 9, 10} and {3, 6, 9} <= read_steps, reads.steps
    assert bar.read_at == 9
    logged = scalars(out / "logs", "train/loss")  # by step index: a read at step 9 logged index 8
    assert float(bar.shown["train/loss"]) == pytest.approx(logged[bar.read_at - 1], rel=1e-3)
    assert "train/lr" in bar.shown and "img/s" in bar.shown
    # The whole run's time left, on the bar from the third batch on (two measured intervals): 1 epoch of 12 images at
    # batch 1 (10 steps), its end not yet measured ("+"), down to 0 at the last batch.
    shown = capfd.readouterr().out
    assert re.search(r"run left=00:\d\d\+", shown) and bar.shown["run left"] == "00:00+"


def test_the_run_time_left_follows_the_measured_speed_and_epoch_ends():
    assert RemainingTime().window_seconds == 120  # docs/configuration.md: "the batches of the last 2 minutes"
    clock = RemainingTime(window_seconds=5.0)
    now = 0.0
    for _ in range(4):  # 1 s a batch
        now += 1.0
        clock.batch_end(now)
    assert clock.remaining(10, 2) == (pytest.approx(10.0), 0)  # no epoch end measured yet: left out, and said so
    assert format_seconds(10.0, ends_measured=False) == "00:10+"
    clock.epoch_end()  # an epoch end that takes 7 s, then a 1 s batch
    now += 8.0
    clock.batch_end(now)
    seconds, measured = clock.remaining(10, 2)
    assert measured == 1 and seconds == pytest.approx(10 * 1.0 + 2 * 7.0)
    for _ in range(10):  # twice as slow: the 5 s window forgets the fast batches
        now += 2.0
        clock.batch_end(now)
    assert clock.remaining(10, 0) == (pytest.approx(20.0), 1)
    assert format_seconds(3723.0, ends_measured=True) == "1:02:03"


def test_batches_and_epoch_ends_left_count_the_runs_own_end():
    from lightning.pytorch import Trainer

    from conftest import tiny_batches, tiny_module

    class Stop(Exception):
        pass

    seen = []

    class Record(TrainingProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batches_and_ends_left(trainer, batch_idx))
            if len(seen) == 3:
                raise Stop

    trainer = Trainer(max_epochs=3, callbacks=[Record()], logger=False, enable_checkpointing=False)
    with pytest.raises(Stop):  # 2 batches an epoch, 3 epochs: 6 batches, 3 epoch ends
        trainer.fit(tiny_module(), tiny_batches(8, 4))
    assert seen == [(5, 3), (4, 3), (3, 2)]  # after an epoch's last batch, its own end is still to come
