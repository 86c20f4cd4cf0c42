"""EMA, the validation loss, prediction targets and FID/KID, through the real CLI where it matters."""

from __future__ import annotations

import pytest
import torch

from conftest import fit_args, scalars
from ddpm_lightning.cli import main
from test_module import TINY_UNET, tiny_module


def test_ema_follows_the_warmup_formula_once_per_optimizer_step(image_folder, tmp_path, monkeypatch):
    """decay_k = min(1 - (1 + k / inv_gamma) ** -power, max_decay), counted in optimizer steps (accumulation 2)."""
    from ddpm_lightning.module import DDPMModule

    seen = []
    real = DDPMModule.on_train_batch_end

    def record(self, outputs, batch, batch_idx):
        before = [p.detach().clone() for p in self.ema.shadow_params] if self.ema else None
        real(self, outputs, batch, batch_idx)
        seen.append((self.trainer.global_step, self.ema.optimization_step, self.ema.cur_decay_value, before,
                     [p.detach().clone() for p in self.unet.parameters()], [p.detach().clone() for p in self.ema.shadow_params]))

    monkeypatch.setattr(DDPMModule, "on_train_batch_end", record)
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "2", "--trainer.accumulate_grad_batches", "2",
                  "--model.use_ema", "true", "--model.ema_inv_gamma", "1.0", "--model.ema_power", "0.75",
                  "--model.ema_max_decay", "0.5"))
    # 3 batches an epoch: optimizer steps after batches 1 and 2 (the epoch's end) of each epoch
    assert [s[0] for s in seen] == [0, 1, 2, 2, 3, 4]
    assert [s[1] for s in seen] == [s[0] for s in seen]  # one EMA update per optimizer step, none per micro-batch
    for step, ema_step, decay, before, weights, after in seen[1:]:
        k = max(0, ema_step - 1)
        expected = 0.0 if k == 0 else min(1 - (1 + k) ** -0.75, 0.5)
        assert decay == pytest.approx(expected)
    # the update itself: ema = decay * ema + (1 - decay) * weights, at an update with a non-zero decay
    step, ema_step, decay, before, weights, after = seen[4]
    for b, w, a in zip(before, weights, after):
        torch.testing.assert_close(a, decay * b + (1 - decay) * w)


def test_ema_is_restored_on_resume_and_used_for_the_saved_model(image_folder, tmp_path):
    from diffusers import DDPMPipeline

    args = ["--model.use_ema", "true", "--trainer.max_epochs", "-1", "--model.learning_rate", "0.01"]
    main(fit_args(image_folder, tmp_path / "run", *args, "--trainer.max_steps", "3"))
    first = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)
    assert first["ema"]["optimization_step"] == 3
    main(fit_args(image_folder, tmp_path / "run", *args, "--trainer.max_steps", "6", "--ckpt_path", "last"))
    final = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)
    assert final["ema"]["optimization_step"] == 6  # continued, not restarted at 0

    raw = {k.removeprefix("unet."): v for k, v in final["state_dict"].items()}
    saved = DDPMPipeline.from_pretrained(tmp_path / "run").unet.state_dict()
    names = [n for n, _ in tiny_module().unet.named_parameters()]  # the order EMAModel keeps its shadow params in
    for name, shadow in zip(names, final["ema"]["shadow_params"]):
        torch.testing.assert_close(saved[name], shadow)  # the saved folder holds the EMA weights
    assert any(not torch.equal(saved[n], raw[n]) for n in names)  # ... which differ from the raw ones


def test_validation_loss_is_deterministic_and_monitorable(image_folder, tmp_path):
    out = tmp_path / "run"
    main(fit_args(image_folder, out, "--trainer.max_epochs", "2", "--data.val_fraction", "0.25",
                  "--checkpoint.monitor", "val/loss", "--checkpoint.save_top_k", "1", "--model.use_ema", "true"))
    logged = scalars(out / "logs", "val/loss")
    assert len(logged) == 2 and len(scalars(out / "logs", "val/loss_ema")) == 2
    best = list((tmp_path / "checkpoints" / "run").glob("epoch=*.ckpt"))
    assert len(best) == 1  # chosen by val/loss

    # the same weights give the same number, twice: fixed timesteps and fixed noise per image
    for run in ("a", "b"):
        main(["validate", "-c", str(out / "logs" / "config.yaml"), "--ckpt_path", str(best[0]),
              "--output_dir", str(tmp_path / run), "--trainer.logger", "false"])
    # validate prints its metrics; read them back from the callback metrics of a third run in-process
    from lightning.pytorch import Trainer

    from ddpm_lightning.data import ImageDataModule
    from ddpm_lightning.module import DDPMModule

    model = DDPMModule.load_from_checkpoint(best[0])
    dm = ImageDataModule(dataset=str(image_folder), image_size=16, train_batch_size=4, num_workers=0, val_fraction=0.25)
    trainer = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    torch.manual_seed(1)
    first = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    torch.manual_seed(2)  # a different global RNG state changes nothing
    assert trainer.validate(model, dm, verbose=False)[0]["val/loss"] == first


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_learns(prediction_type):
    torch.manual_seed(0)
    model = tiny_module(prediction_type=prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(images), torch.randint(0, 1000, (8,))
    losses = []
    for _ in range(30):
        loss = model.denoising_loss(images, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    generated = model.sample(2, model.make_scheduler("ddim"), 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(generated).all()


def test_fid_and_kid_through_validate_with_a_custom_extractor(image_folder, tmp_path, capsys):
    main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--data.val_fraction", "0.5"))
    main(["validate", "-c", str(tmp_path / "run" / "logs" / "config.yaml"), "--ckpt_path", "last",
          "--quality.feature", "conftest.TinyFeatures", "--quality.num_samples", "6",
          "--quality.num_inference_steps", "2", "--trainer.logger", "false"])
    out = capsys.readouterr().out
    assert "val/fid" in out and "val/kid_mean" in out


def test_missing_inception_weights_say_how_and_training_goes_on(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.warns(UserWarning, match="FID/KID are off: .*weights-inception-2015-12-05"):
        main(fit_args(image_folder, tmp_path / "run", "--trainer.max_epochs", "1", "--data.val_fraction", "0.5",
                      "--quality.every_n_epochs", "1"))
    assert (tmp_path / "checkpoints" / "run" / "last.ckpt").exists()
    assert len(scalars(tmp_path / "run" / "logs", "val/loss")) == 1
