"""The NaN stop (stop_on_nan.py): a NaN loss stops the run naming its first step, and no checkpoint, grid or model
is written after one (each save checks first)."""

from __future__ import annotations

import pytest
import torch

from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule

from conftest import fit_args, max_steps, step_of


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_first_step(image_folder, tmp_path, monkeypatch):
    from ddpm_lightning.cli import main

    from conftest import fit_args

    real = DDPMModule.denoising_loss

    def nan_from_step_5(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if self.trainer.global_step >= 5 else loss

    monkeypatch.setattr(DDPMModule, "denoising_loss", nan_from_step_5)
    with pytest.raises(FloatingPointError, match="NaN or infinite at step 5 .*stop_on_nan false"):
        main(
            fit_args(
                image_folder,
                tmp_path / "run",
                *max_steps(20),
                "--model.nan_check_every_n_steps",
                "4",
            )
        )
    assert not (tmp_path / "run" / "model_index.json").exists()  # no final save of broken weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "diverge, first_bad, last_good",
    [
        (["--trainer.callbacks+=conftest.NaNAtStep", "--trainer.callbacks.step", "5"], 5, 4),
        (["--model.learning_rate", "1e9", "--model.lr_warmup_steps", "0"], 1, None),  # a rate that diverges at once
    ],
)
def test_no_checkpoint_grid_or_model_is_written_after_a_nan_loss(twelve, tmp_path, diverge, first_bad, last_good):
    """Checkpoints every 2 steps, the NaN check every 10: each save checks first. Grids and saves every epoch."""
    out, folder = tmp_path / "run", tmp_path / "checkpoints" / "run"
    saves = ["--grid.save_image_epochs", "1", "--save.save_model_epochs", "1", "--checkpoint.every_n_train_steps", "2"]
    with pytest.raises(FloatingPointError, match=f"NaN or infinite at step {first_bad}"):
        main(fit_args(twelve, out, *saves, *max_steps(12), *diverge))
    if last_good is None:
        assert not folder.exists() or not list(folder.iterdir())
        assert not list((out / "samples").glob("0*.png")) and not (out / "unet").exists()  # no grid, no model
        return
    assert step_of(folder / "last.ckpt") == last_good
    assert sorted(p.name for p in folder.iterdir()) == [f"epoch=1-step={last_good}.ckpt", "last.ckpt"]
    weights = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sorted((out / "samples").glob("0*.png")) == [out / "samples" / "0000.png"]  # epoch 0 (steps 0-2) only
    from diffusers import UNet2DModel

    saved = UNet2DModel.from_pretrained(out / "unet")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
