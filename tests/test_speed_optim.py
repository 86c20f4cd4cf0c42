"""AdamW (speed/optim.py): the combinations `make_adamw` refuses, and the compiled clip-and-update
(`CompiledAdamW`): torch's AdamW step by step without recompiling, finite at a zero LR, and a resume with it equal
to the straight run."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.speed import SpeedSwitches

from conftest import (
    NO_SAVES,
    TINY_UNET,
    assert_same_weights,
    crash_args,
    fit_args,
    step_and_weights,
    tiny_batches,
)


@pytest.mark.slow
def test_fused_clipping_under_lightnings_own_amp_plugin_fails_before_training():
    """Outside the CLI (a plain Trainer), the combination Lightning cannot run fails before the first step,
    naming the keys to change, instead of at the first optimizer step."""
    started = []
    spy = Callback()
    spy.on_train_batch_start = lambda *args: started.append(1)
    model = DDPMModule(unet=TINY_UNET, image_size=16)
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spy, SpeedSwitches(fused_adamw=True)],
    )
    with pytest.raises(
        ValueError, match="FusedClipMixedPrecision.*speed.fused_adamw false.*trainer.gradient_clip_val null"
    ):
        trainer.fit(model, tiny_batches())
    assert not started


def test_compiled_step_refuses_fused_adamw():
    with pytest.raises(ValueError, match="speed.fused_adamw false"):
        SpeedSwitches(compile_optimizer=True, fused_adamw=True)


def test_compiled_step_follows_the_lr_schedule_without_recompiling_and_in_its_gpu_values(monkeypatch):
    """CompiledAdamW against torch's AdamW after Lightning's clipping, step by step over a warm-up and a decay:
    the same weights, compiled once for the whole schedule (its LR is a tensor filled in place), in its GPU values
    (capturable=True: the step counter and the LR stay on the device), which a CPU can run inside torch.compile.
    Its state_dict is plain AdamW's: a float LR, not capturable."""
    from torch._dynamo.utils import counters
    from torch.optim.lr_scheduler import LambdaLR

    from ddpm_lightning.speed.optim import CompiledAdamW

    def make(cls, **kwargs):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        optimizer = cls(net.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)
        return net, optimizer, LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3) * 0.9**step)

    plain, plain_opt, plain_lr = make(torch.optim.AdamW)
    compiled, compiled_opt, compiled_lr = make(CompiledAdamW, clip_val=0.05)
    for group in compiled_opt.param_groups:  # what its first step does on a GPU (on a CPU: capturable=False)
        group["lr"] = torch.tensor(group["lr"])
        group["capturable"] = True
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
            for net, opt in ((plain, plain_opt), (compiled, compiled_opt)):
                opt.zero_grad(set_to_none=False)
                net(x).square().mean().backward()
            assert torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05) > 0.05  # the clip has work to do
            plain_opt.step()
            compiled_opt.step()
            plain_lr.step()
            compiled_lr.step()
            for a, b in zip(plain.parameters(), compiled.parameters(), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2  # the clip, and the update (torch breaks the graph at step)
    assert isinstance(compiled_opt.param_groups[0]["lr"], torch.Tensor)
    assert compiled_opt.param_groups[0]["lr"].item() == pytest.approx(plain_opt.param_groups[0]["lr"])
    saved = compiled_opt.state_dict()["param_groups"][0]
    assert type(saved["lr"]) is float and saved["capturable"] is False
    plain_opt.load_state_dict(compiled_opt.state_dict())  # a checkpoint of it resumes without it


def test_compiled_step_keeps_weights_finite_at_a_zero_lr_with_zero_gradients():
    """The warm-up's first step has an LR of exactly 0, and an attention key bias has a gradient of exactly 0;
    AdamW's tensor-LR formula divides one by the other. The compiled step must leave such weights unchanged,
    as torch's AdamW does (else a compiled run's weights are NaN after its first step)."""
    from torch.optim.lr_scheduler import LambdaLR

    from ddpm_lightning.speed.optim import CompiledAdamW

    weights = {}
    for cls in (torch.optim.AdamW, CompiledAdamW):
        torch.manual_seed(0)
        w, zero_grad = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
        optimizer = cls([w, zero_grad], lr=1e-2)
        LambdaLR(optimizer, lambda step: step / 10)  # 0 at the first step, as the cosine warm-up
        ((w * torch.arange(4.0)).sum() + 0 * zero_grad.sum()).backward()
        optimizer.step()
        weights[cls] = (w.detach().clone(), zero_grad.detach().clone())
    for a, b in zip(weights[torch.optim.AdamW], weights[CompiledAdamW], strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-20)


@pytest.mark.slow
def test_resume_with_the_compiled_optimizer_step_equals_the_straight_run(twelve, tmp_path):
    """`speed.compile_optimizer` keeps its LR in a tensor on the device and saves plain
    AdamW's state: crashed at step 4 and resumed from the epoch-end checkpoint, the run ends with the weights of
    the compiled run that never crashed."""
    compiled = [
        *NO_SAVES,
        "--trainer.max_epochs",
        "2",
        "--speed.compile_optimizer",
        "true",
        "--trainer.gradient_clip_val",
        "0.1",
        "--checkpoint.every_n_epochs",
        "1",
    ]
    torch._dynamo.reset()
    main(fit_args(twelve, tmp_path / "straight", *compiled))
    crashing = fit_args(twelve, tmp_path / "crashed", *compiled)
    with pytest.raises(RuntimeError, match="injected crash"):
        main([*crashing, *crash_args(4)])
    assert step_and_weights(tmp_path / "checkpoints" / "crashed" / "last.ckpt")[0] == 3
    main([*crashing, "--ckpt_path", "last"])
    step_a, a = step_and_weights(tmp_path / "checkpoints" / "straight" / "last.ckpt")
    step_b, b = step_and_weights(tmp_path / "checkpoints" / "crashed" / "last.ckpt")
    assert step_a == step_b == 6
    assert_same_weights(a, b)
