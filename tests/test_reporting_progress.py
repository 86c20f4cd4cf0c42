"""The training bar (on by default, as in configs/butterflies.yaml) reads the loss back only on log steps: no
GPU sync per step. Counted on the CPU as calls that would wait for a GPU (`.item()`, `float()`, ...)."""

from __future__ import annotations

import pytest

from ddpm_lightning.cli import main
from ddpm_lightning.reporting.progress import TrainingProgressBar

from conftest import HostReads, fit_args, scalars


@pytest.mark.slow
def test_the_bar_shows_the_loss_read_only_on_log_steps(image_folder, tmp_path, monkeypatch):
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
        "--model.fused_adamw",
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
    logged = scalars(out / "logs", "train/loss")
    assert float(bar.shown["train/loss"]) == pytest.approx(logged[max(logged)], rel=1e-3)
    assert "train/lr" in bar.shown and "img/s" in bar.shown
