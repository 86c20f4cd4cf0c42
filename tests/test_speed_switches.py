"""The GPU speed switches, run on the CPU in their GPU values: fused AdamW with clipping under every precision
(and fp16's skipped step on overflow), each switch's losses against the plain path, grids under the training
autocast, compile without recompiles, and no host sync per training step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.cli import main
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.speed.precision import FusedClipMixedPrecision

from conftest import MICRO_UNET, TINY_UNET, HostReads, fit_args, max_steps, scalars


def grad_norm(module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in module.parameters()])).item()


class GradNorms(Callback):
    """Records the gradient norm before clipping (Lightning's hook runs after unscaling, before clipping) and
    right after the optimizer step (clipped; a step post-hook, as the module frees the gradients after the step).
    Used by class path: `--trainer.callbacks+=test_speed_switches.GradNorms`."""

    seen: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        def after(*_) -> None:  # under CompiledAdamW it may run twice a step (its step, then AdamW's)
            self._after = grad_norm(pl_module.unet)

        trainer.optimizers[0].register_step_post_hook(after)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._before = grad_norm(pl_module.unet)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        GradNorms.seen.append((self._before, self._after))


# Lightning turns `precision: 16-mixed` into bf16-mixed on a CPU, so the fp16 case names the GPU's plugin itself:
# fp16 autocast and a GradScaler, on the CPU.
FP16_WITH_GRADSCALER = [
    "--trainer.precision",
    "null",
    "--trainer.plugins",
    '{"class_path": "lightning.pytorch.plugins.precision.MixedPrecision", '
    '"init_args": {"precision": "16-mixed", "device": "cpu"}}',
]
PRECISIONS = {
    "16-mixed": FP16_WITH_GRADSCALER,
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "32-true": ["--trainer.precision", "32-true"],
}


# The GPU default (fused AdamW) and the fast config's compiled clip-and-update.
OPTIMIZERS = {"fused": ["--model.fused_adamw", "true"], "compiled": ["--model.compile_optimizer", "true"]}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_adamw_trains_with_clipping_under_every_precision(precision, optimizer, image_folder, tmp_path):
    """Fused AdamW or the compiled step, with clipping (the tutorial clips at 1.0; 0.1 here, below the tiny UNet's
    gradient norm, so the clip has something to do): Lightning alone refuses to clip a fused AdamW under AMP."""
    GradNorms.seen = []
    torch._dynamo.reset()  # (a compiled step guards on its optimizer: earlier tests' would fill dynamo's cache)
    main(
        fit_args(
            image_folder,
            tmp_path / "run",
            *PRECISIONS[precision],
            *OPTIMIZERS[optimizer],
            "--trainer.gradient_clip_val",
            "0.1",
            "--model.learning_rate",
            "1e-2",
            "--model.lr_warmup_steps",
            "0",
            *max_steps(3),
            "--trainer.callbacks+=test_speed_switches.GradNorms",
        )
    )
    assert len(GradNorms.seen) == 3  # no step skipped (fp16 starts at a scale the tiny UNet does not overflow)
    for before, after in GradNorms.seen:
        assert before > 0.1  # so the clip had something to do
        assert after == pytest.approx(0.1, rel=1e-3)  # unscaled, then clipped


class InfGradientAt(Callback):
    """Makes one gradient infinite after the backward of step `step` (as an fp16 overflow would)."""

    def __init__(self, step: int):
        self.step = step
        self.params_before: dict[int, list[torch.Tensor]] = {}
        self.params_after: dict[int, list[torch.Tensor]] = {}
        self.scales: list[float] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.params_before[trainer.global_step] = [p.detach().clone() for p in pl_module.unet.parameters()]
        if trainer.global_step == self.step:
            next(pl_module.unet.parameters()).grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.params_after[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.unet.parameters()]
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def tiny_batches(n: int = 8, batch_size: int = 4) -> DataLoader:
    return DataLoader(
        torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, batch_size=batch_size
    )


@pytest.mark.slow
def test_fp16_fused_adamw_still_skips_the_step_when_gradients_overflow():
    spy = InfGradientAt(step=1)
    model = DDPMModule(unet=TINY_UNET, image_size=16, fused_adamw=True, lr_warmup_steps=0, learning_rate=1e-2)
    trainer = Trainer(
        accelerator="cpu",
        plugins=[FusedClipMixedPrecision("16-mixed", "cpu")],
        gradient_clip_val=1.0,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[spy],
    )
    trainer.fit(model, tiny_batches(12))
    changed = {
        step: any(not torch.equal(a, b) for a, b in zip(spy.params_before[step], spy.params_after[step]))
        for step in spy.params_after
    }
    # global_step advances even for a skipped step (Lightning counts optimizer.step calls)
    assert changed == {0: True, 1: False, 2: True}
    assert spy.scales[1] == spy.scales[0] / 2  # GradScaler saw the inf and backed off
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())


@pytest.mark.slow
def test_fused_clipping_under_lightnings_own_amp_plugin_fails_before_training():
    """Outside the CLI (a plain Trainer), the combination Lightning cannot run fails before the first step,
    naming the keys to change, instead of at the first optimizer step."""
    started = []
    spy = Callback()
    spy.on_train_batch_start = lambda *args: started.append(1)
    model = DDPMModule(unet=TINY_UNET, image_size=16, fused_adamw=True)
    trainer = Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spy],
    )
    with pytest.raises(
        ValueError, match="FusedClipMixedPrecision.*model.fused_adamw false.*trainer.gradient_clip_val null"
    ):
        trainer.fit(model, tiny_batches())
    assert not started


def train_losses(precision: str = "32-true", steps: int = 3, **switches) -> list[float]:
    """The losses of `steps` training steps from the same seed, weights and batches."""
    switches = {"fused_adamw": False, "float32_matmul_precision": "highest", **switches}  # the plain path's values
    losses = []
    record = Callback()
    record.on_train_batch_end = lambda trainer, module, outputs, *args: losses.append(outputs["loss"].item())
    seed_everything(0)
    model = DDPMModule(unet=TINY_UNET, image_size=16, lr_warmup_steps=0, learning_rate=1e-3, **switches)
    plugins = [FusedClipMixedPrecision(precision, "cpu")] if "mixed" in precision else []
    trainer = Trainer(
        accelerator="cpu",
        precision=None if plugins else precision,
        plugins=plugins,
        gradient_clip_val=1.0,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, tiny_batches(4 * steps))
    torch.set_float32_matmul_precision("highest")  # (process-wide: leave torch's default for the other tests)
    return losses


@pytest.fixture(scope="module")
def plain_losses() -> list[float]:
    return train_losses()


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches",
    [
        {"fused_adamw": True},
        {"channels_last": True},
        {"gradient_checkpointing": True},
        {"float32_matmul_precision": "high"},  # TF32 on a GPU that has it; exact float32 on a CPU
        {"fused_adamw": True, "channels_last": True, "gradient_checkpointing": True},
        {"compile_optimizer": True},  # with the LR changing every step (cosine decay over the 3 steps)
    ],
    ids=lambda switches: "+".join(switches),
)
def test_speed_switch_gives_the_plain_losses(switches, plain_losses):
    torch._dynamo.reset()
    # The first loss is before any step; the later ones follow the optimizer's updates.
    assert train_losses(**switches) == pytest.approx(plain_losses, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_losses_stay_near_float32(precision, plain_losses):
    losses = train_losses(precision, fused_adamw=True)
    assert losses == pytest.approx(plain_losses, rel=5e-2)  # half-precision matmuls: a looser bound
    assert losses != plain_losses  # autocast really ran


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_grid_samples_under_the_training_autocast(precision, tmp_path):
    dtypes = []
    model = DDPMModule(unet=TINY_UNET, image_size=16)
    model.unet.conv_in.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    # (the plugin itself: Lightning's precision="16-mixed" would run bf16 on a CPU)
    trainer = Trainer(
        accelerator="cpu",
        plugins=[MixedPrecision(precision, "cpu")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.strategy.connect(model)
    SampleGrid(output_dir=str(tmp_path), eval_batch_size=4, num_inference_steps=2).write_grid(trainer, model)
    assert dtypes == [{"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]] * 2


@pytest.mark.slow
def test_a_compiled_fit_compiles_once_per_graph_and_gives_the_eager_losses(image_folder, tmp_path, monkeypatch):
    """Two epochs with a short last batch (of 1), validation and a grid each epoch: one training graph and one
    sampling graph, never compiled again (error_on_recompile turns any recompile into a failure), and the
    same losses as the same run without compile."""
    from torch._dynamo.utils import counters

    from conftest import scalars

    # 12 images, 3 held out: 9 to train on at batch 4 -> batches of 4, 4 and 1 in each epoch
    args = [
        "--model.unet",
        json.dumps(MICRO_UNET),
        "--data.val_fraction",
        "0.25",
        "--trainer.max_epochs",
        "2",
        "--grid.save_image_epochs",
        "1",
    ]
    main(fit_args(image_folder, tmp_path / "eager", *args, "--checkpoint.dirpath", "eager"))
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # (not monkeypatch: its undo deletes the entry)
        main(
            fit_args(
                image_folder,
                tmp_path / "compiled",
                *args,
                "--model.compile",
                "true",
                "--checkpoint.dirpath",
                "compiled",
            )
        )
    assert counters["stats"]["unique_graphs"] == 2  # the training call and predict
    assert (tmp_path / "compiled" / "samples" / "0001.png").exists()
    eager, compiled = (scalars(tmp_path / run / "logs", "train/loss") for run in ("eager", "compiled"))
    assert len(compiled) == 6 and compiled == pytest.approx(eager, rel=1e-3)


def host_reads_in_fit(image_folder, out, steps: int, *extra: str) -> int:
    with HostReads() as reads:
        main(
            fit_args(
                image_folder,
                out,
                "--trainer.max_steps",
                str(steps),
                "--trainer.max_epochs",
                "1",
                "--data.train_batch_size",
                "1",
                "--trainer.log_every_n_steps",
                "100",
                "--model.nan_check_every_n_steps",
                "100",
                *extra,
            )
        )
    return reads.total


@pytest.mark.slow
@pytest.mark.parametrize(
    "precision, optimizer", [("16-mixed", "fused"), ("bf16-mixed", "fused"), ("bf16-mixed", "compiled")]
)
def test_no_host_read_per_training_step(precision, optimizer, image_folder, tmp_path):
    """With the progress bar off (as in butterflies-fast.yaml), a training step never waits for the device:
    2 steps and 6 steps of one epoch read the same number of values back (the start and the end do read).
    (16-mixed with the compiled step does read: GradScaler checks for overflow before a non-fused step.)"""
    torch._dynamo.reset()
    args = [*PRECISIONS[precision], *OPTIMIZERS[optimizer], "--trainer.gradient_clip_val", "1.0"]
    assert host_reads_in_fit(image_folder, tmp_path / "a", 2, *args) == host_reads_in_fit(
        image_folder, tmp_path / "b", 6, *args
    )


def test_cache_on_gpu_and_pin_memory_in_their_gpu_values_give_the_same_batches(image_folder, monkeypatch):
    """The GPU branches of the data path on a CPU: the cache moved to the training device (here the CPU device,
    through the same code), and a loader that pins memory (torch.cuda.is_available() faked for its creation;
    without a GPU the DataLoader pins nothing). Both deliver exactly the default loader's batches."""
    from ddpm_lightning.data import ImageDataModule

    trainer = Trainer(accelerator="cpu", logger=False)

    def loader(**kwargs):
        data = ImageDataModule(
            dataset=str(image_folder), image_size=16, train_batch_size=4, num_workers=0, cache="memory", **kwargs
        )
        data.trainer = trainer
        data.setup("fit")
        return data.train_dataloader()

    plain = list(loader(cache_on_gpu=False))
    assert [len(b) for b in plain] == [4, 4, 4]
    on_device = list(loader(cache_on_gpu=True))
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        pinning = loader(cache_on_gpu=False)
    assert pinning.pin_memory
    for batches in (on_device, list(pinning)):
        assert all(
            torch.equal(a, b) and b.device == trainer.strategy.root_device for a, b in zip(plain, batches, strict=True)
        )


def test_compiled_step_follows_the_lr_schedule_without_recompiling_and_in_its_gpu_values(monkeypatch):
    """CompiledAdamW against torch's AdamW after Lightning's clipping, step by step over a warm-up and a decay:
    the same weights, compiled once for the whole schedule (its LR is a tensor filled in place), in its GPU values
    (capturable=True: the step counter and the LR stay on the device), which a CPU can run inside torch.compile. Its state_dict is plain AdamW's: a float LR, not capturable."""
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


@pytest.mark.slow
def test_compiled_step_refuses_fused_adamw():
    model = DDPMModule(unet=TINY_UNET, image_size=16, compile_optimizer=True, fused_adamw=True)
    trainer = Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match="model.fused_adamw false"):
        trainer.fit(model, tiny_batches())


@pytest.mark.parametrize(
    "mode, graphs",
    [("reduce-overhead", True), ("max-autotune", True), ("max-autotune-no-cudagraphs", False), ("default", False)],
)
def test_each_compiled_call_starts_a_cuda_graph_step_in_the_modes_that_use_graphs(mode, graphs, monkeypatch):
    """A CUDA graph's outputs are overwritten by its next replay: each compiled training forward and sampling
    forward tells torch a new step begins (so last step's outputs are let go), in every mode that uses graphs."""
    model = DDPMModule(unet=MICRO_UNET, image_size=16, compile=True, compile_mode=mode)
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))

    def plain(unet, x, t):  # the compiled functions' signature, not compiled
        return unet(x, t, return_dict=False)[0]

    model.configure_model()
    model.unet_forward.compiled = {"train": plain, "sample": plain}
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([1, 2])
    model.unet_forward.train(model.unet, x, t)
    with torch.no_grad():
        model.unet_forward.sample(model.unet, x, t)
    assert len(calls) == (2 if graphs else 0)


@pytest.mark.slow
def test_gradients_are_freed_after_each_optimizer_step_and_kept_within_an_accumulation_window():
    """Under CUDA graphs the gradients are the backward graph's outputs, which the next replay (a step, a grid)
    overwrites, and Lightning's teardown moves them (`module.cpu()`): they are freed right after each optimizer
    step, as the tutorial's loop does, and kept between the micro-batches of an accumulation window. The compiled
    optimizer step reads them as the backward left them."""
    held = []

    class Grads(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            held.append(any(p.grad is not None for p in pl_module.unet.parameters()))

    for switches, accumulate in (({}, 1), ({}, 2), ({"compile_optimizer": True}, 1)):
        torch._dynamo.reset()
        model = DDPMModule(unet=MICRO_UNET, image_size=16, **switches)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=2,
            accumulate_grad_batches=accumulate,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Grads()],
        )
        trainer.fit(model, tiny_batches())
        assert trainer.global_step == 2
        assert all(p.grad is None for p in model.unet.parameters())
    assert held == [False, False] + [True, False, True, False] + [False, False]


def test_compiled_step_keeps_weights_finite_at_a_zero_lr_with_zero_gradients():
    """The warm-up's first step has an LR of exactly 0, and an attention key bias has a gradient of exactly 0;
    AdamW's tensor-LR formula divides one by the other. The compiled step must leave such weights unchanged,
    as torch's AdamW does (found by the compiled resume test: NaN weights after the first step)."""
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
def test_bf16_mixed_trains_on_cpu_under_bf16_autocast(image_folder, tmp_path, monkeypatch):
    from ddpm_lightning.module import DDPMModule

    seen = []
    real = DDPMModule.denoising_loss

    def record(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), loss.dtype))
        return loss

    monkeypatch.setattr(DDPMModule, "denoising_loss", record)
    out = tmp_path / "run"
    main(
        fit_args(
            image_folder,
            out,
            *max_steps(3),
            "--trainer.precision",
            "bf16-mixed",
        )
    )
    assert seen[:3] == [(True, torch.bfloat16, torch.float32)] * 3  # the UNet under bf16; the loss in float32
    state = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 master weights
    assert sorted(scalars(out / "logs", "train/loss")) == [0, 1, 2]
    assert all(math.isfinite(v) for v in scalars(out / "logs", "train/loss").values())
