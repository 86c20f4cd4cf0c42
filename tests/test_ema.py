"""The weights' moving average (ema.py): its warm-up formula once per optimizer step, the same on every DDP rank, in
the checkpoint of the step it was saved at, restored on resume and used for the saved model."""

from __future__ import annotations

import subprocess

import pytest
import torch

from ddpm_lightning.cli import main

from conftest import (
    EMA_AT_A_HIGH_LR,
    NO_SAVES,
    child_env,
    crash_args,
    ddp_fit_command,
    fit_args,
    max_steps,
    tiny_module,
)


@pytest.mark.slow
def test_ema_follows_the_warmup_formula_once_per_optimizer_step(image_folder, tmp_path, monkeypatch):
    """decay_k = min(1 - (1 + k / inv_gamma) ** -power, max_decay), counted in optimizer steps (accumulation 2).
    inv_gamma 2 and power 0.6 (not the defaults) and a cap that applies from k = 3 only: k = 1, 2 check the formula."""
    from ddpm_lightning.ema import UpdateEMA

    seen = []
    real = UpdateEMA.on_train_batch_end

    def record(self, trainer, module, outputs, batch, batch_idx):
        before = [p.detach().clone() for p in module.ema.shadow_params]
        real(self, trainer, module, outputs, batch, batch_idx)
        seen.append(
            (
                trainer.global_step,
                module.ema.optimization_step,
                module.ema.cur_decay_value,
                before,
                [p.detach().clone() for p in module.unet.parameters()],
                [p.detach().clone() for p in module.ema.shadow_params],
            )
        )

    monkeypatch.setattr(UpdateEMA, "on_train_batch_end", record)
    main(
        fit_args(
            image_folder,
            tmp_path / "run",
            "--trainer.max_epochs",
            "2",
            "--trainer.accumulate_grad_batches",
            "2",
            "--model.use_ema",
            "true",
            "--model.ema_inv_gamma",
            "2.0",
            "--model.ema_power",
            "0.6",
            "--model.ema_max_decay",
            "0.4",
        )
    )
    # 3 batches an epoch: optimizer steps after batches 1 and 2 (the epoch's end) of each epoch
    assert [s[0] for s in seen] == [0, 1, 2, 2, 3, 4]
    assert [s[1] for s in seen] == [s[0] for s in seen]  # one EMA update per optimizer step, none per micro-batch
    decays = {}
    for _step, ema_step, decay, *_ in seen[1:]:
        decays[max(0, ema_step - 1)] = decay
    # by hand: 1 - 1.5 ** -0.6, 1 - 2 ** -0.6, then the cap (1 - 2.5 ** -0.6 = 0.423 > 0.4)
    assert decays == pytest.approx({0: 0.0, 1: 0.21595, 2: 0.34025, 3: 0.4}, abs=1e-5)
    # the update itself: ema = decay * ema + (1 - decay) * weights, at an update with a non-zero decay
    step, ema_step, decay, before, weights, after = seen[4]
    for b, w, a in zip(before, weights, after):
        torch.testing.assert_close(a, decay * b + (1 - decay) * w)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_checkpoint_in_the_middle_of_an_epoch_holds_that_steps_ema_and_resumes_to_the_straight_runs(twelve, tmp_path):
    """A step cadence saves at the end of a training batch: the weight average of that very step is in it (not
    the step before's), so `--ckpt_path last` ends with the straight run's average."""
    ema = ["--model.use_ema", "true", "--model.ema_max_decay", "0.9", "--trainer.max_epochs", "2"]
    main(fit_args(twelve, tmp_path / "straight", *NO_SAVES, *ema))
    crashing = fit_args(twelve, tmp_path / "crashed", *NO_SAVES, *ema, "--checkpoint.every_n_train_steps", "2")
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(3)])
    saved = torch.load(tmp_path / "checkpoints" / "crashed" / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["global_step"] == saved["ema"]["optimization_step"] == 2
    main([*crashing, "--ckpt_path", "last"])
    a, b = (
        torch.load(tmp_path / "checkpoints" / run / "last.ckpt", weights_only=False) for run in ("straight", "crashed")
    )
    assert a["ema"]["optimization_step"] == b["ema"]["optimization_step"] == 6
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.slow
def test_every_ddp_rank_holds_the_same_ema(image_folder, tmp_path):
    cmd = [
        *ddp_fit_command(image_folder, tmp_path / "run", *max_steps(3)),
        *EMA_AT_A_HIGH_LR,
        *NO_SAVES,
        "--trainer.callbacks+=conftest.SaveEMAPerRank",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["optimization_step"] == rank1["optimization_step"] == 3
    for a, b in zip(rank0["shadow_params"], rank1["shadow_params"], strict=True):
        assert torch.equal(a, b)
    raw = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert not torch.equal(rank0["shadow_params"][0], raw["unet.conv_in.weight"])  # an average, not the weights
