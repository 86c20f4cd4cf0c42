"""The speed switches (speed/switches.py's `SpeedSwitches`, the `speed` group), run on the CPU in their GPU values:
each gives the plain path's losses and keeps the checkpoint's keys, channels-last, gradient checkpointing and compile
take effect, a compiled fit compiles once per graph, compiled calls start a CUDA-graph step, the compilers exclude
each other, and a training step reads nothing back from the device."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from ddpm_lightning.cli import main, raised_by_this_package
from ddpm_lightning.module import DDPMModule
from ddpm_lightning.speed import SpeedSwitches
from ddpm_lightning.speed.precision import FusedClipMixedPrecision

from conftest import (
    MICRO_UNET,
    OPTIMIZERS,
    PRECISIONS,
    TINY_UNET,
    HostReads,
    fit_args,
    max_steps,
    scalars,
    tiny_batches,
    tiny_module,
)


@pytest.mark.parametrize("pair", [("compile", "compile_blocks"), ("compile", "cuda_graph_capture")])
def test_whole_compile_block_compile_and_capture_refuse_each_other(pair, image_folder, tmp_path):
    """Refused when the group is built, and from the command line before training, in one line."""
    with pytest.raises(ValueError, match="speed.compile, speed.compile_blocks and speed.cuda_graph_capture exclude"):
        SpeedSwitches(**dict.fromkeys(pair, True))
    with pytest.raises(
        ValueError, match="speed.compile, speed.compile_blocks and speed.cuda_graph_capture exclude"
    ) as err:
        main(fit_args(image_folder, tmp_path / "run", *(arg for key in pair for arg in (f"--speed.{key}", "true"))))
    assert "\n" not in str(err.value) and raised_by_this_package(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_speed_switches_keep_checkpoint_keys_and_train_on_cpu(image_folder, tmp_path):
    """channels_last, gradient checkpointing, fused AdamW and in-place compile degrade cleanly on a CPU."""
    from ddpm_lightning.cli import main

    from conftest import fit_args

    main(
        fit_args(
            image_folder,
            tmp_path / "plain",
            *max_steps(2),
            "--checkpoint.dirpath",
            "plain",
        )
    )
    main(
        fit_args(
            image_folder,
            tmp_path / "fast",
            *max_steps(2),
            "--speed.channels_last",
            "true",
            "--speed.gradient_checkpointing",
            "true",
            "--speed.fused_adamw",
            "true",
            "--checkpoint.dirpath",
            "fast",
        )
    )
    plain = torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)
    fast = torch.load(tmp_path / "fast" / "last.ckpt", weights_only=True)
    assert plain["state_dict"].keys() == fast["state_dict"].keys()
    assert all(torch.isfinite(v).all() for v in fast["state_dict"].values())

    model = tiny_module(speed=SpeedSwitches(compile=True))
    keys = set(model.unet.state_dict())
    model.configure_model()
    assert set(model.unet.state_dict()) == keys  # compiled in place: the same keys in checkpoints and folders


@pytest.mark.slow
def test_speed_switches_take_effect_in_a_training_step():
    """channels_last: the UNet's weights and the batch it gets are channels-last; gradient checkpointing: each
    checkpointed ResNet block runs its forward again in the backward pass; compile: the compiled forward runs and
    gives the plain UNet's output."""
    torch.manual_seed(0)
    plain = tiny_module()
    fast = tiny_module(stop_on_nan=False, speed=SpeedSwitches(channels_last=True, gradient_checkpointing=True))
    fast.load_state_dict(plain.state_dict())
    for model in (plain, fast):
        model.configure_model()
    calls, formats = {"plain": 0, "fast": 0}, []
    for name, model in (("plain", plain), ("fast", fast)):  # (forward hooks do not fire in the recomputation)
        block = model.unet.down_blocks[0].resnets[0]
        block.forward = lambda *a, _name=name, _forward=block.forward, **k: (
            calls.__setitem__(_name, calls[_name] + 1) or _forward(*a, **k)
        )
    fast.unet.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    batch = torch.rand(2, 3, 16, 16) * 2 - 1
    fast.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda _: 1)
    fast.log = lambda *a, **k: None
    fast._trainer = SimpleNamespace(global_step=0)
    for model in (plain, fast):
        torch.manual_seed(1)
        loss = model.training_step(batch, 0) if model is fast else model.denoising_loss(batch)
        loss.backward()
    assert calls == {"plain": 1, "fast": 2}  # recomputed in the backward pass
    assert formats == [True]  # the batch reached the UNet in channels-last
    weight = fast.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert all(torch.isfinite(p.grad).all() for p in fast.unet.parameters())


@pytest.mark.slow
def test_compiled_unet_runs_and_matches_the_plain_one():
    torch.manual_seed(0)
    plain, compiled = tiny_module(), tiny_module(speed=SpeedSwitches(compile=True))
    compiled.load_state_dict(plain.state_dict())
    compiled.configure_model()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    noisy, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        expected = plain.unet(noisy, t).sample
        got = compiled.unet_forward.sample(
            compiled.unet, noisy, t
        )  # the compiled sampling forward (the training one: test_a_compiled_fit_compiles_once_per_graph...)
    assert counters["stats"]["unique_graphs"] == 1  # torch.compile traced the UNet's forward
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def train_losses(precision: str = "32-true", steps: int = 3, **switches) -> list[float]:
    """The losses of `steps` training steps from the same seed, weights and batches."""
    switches = {"fused_adamw": False, "float32_matmul_precision": "highest", **switches}  # the plain path's values
    losses = []
    record = Callback()
    record.on_train_batch_end = lambda trainer, module, outputs, *args: losses.append(outputs["loss"].item())
    seed_everything(0)
    model = DDPMModule(unet=TINY_UNET, image_size=16, lr_warmup_steps=0, learning_rate=1e-3)
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
        callbacks=[record, SpeedSwitches(**switches)],
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


@pytest.mark.slow
def test_a_compiled_fit_compiles_once_per_graph_and_gives_the_eager_losses(image_folder, tmp_path, monkeypatch):
    """Two epochs with a short last batch (of 1), validation and a grid each epoch: one training graph and one
    sampling graph, never compiled again (error_on_recompile turns any recompile into a failure), and the
    same losses as the same run without compile."""
    from torch._dynamo.utils import counters

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
                "--speed.compile",
                "true",
                "--checkpoint.dirpath",
                "compiled",
            )
        )
    assert counters["stats"]["unique_graphs"] == 2  # the training call and predict
    assert (tmp_path / "compiled" / "samples" / "0001.png").exists()
    eager, compiled = (scalars(tmp_path / run / "logs", "train/loss") for run in ("eager", "compiled"))
    assert len(compiled) == 6 and compiled == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize(
    "mode, graphs",
    [("reduce-overhead", True), ("max-autotune", True), ("max-autotune-no-cudagraphs", False), ("default", False)],
)
def test_each_compiled_call_starts_a_cuda_graph_step_in_the_modes_that_use_graphs(mode, graphs, monkeypatch):
    """A CUDA graph's outputs are overwritten by its next replay: each compiled training forward and sampling
    forward tells torch a new step begins (so last step's outputs are let go), in every mode that uses graphs."""
    model = DDPMModule(unet=MICRO_UNET, image_size=16)
    model.speed = SpeedSwitches(compile=True, compile_mode=mode)
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
    # Each run decodes its own images: with the shared cache the first run builds it and the second reuses it,
    # and those start-ups read different numbers of values.
    args += ["--data.cache_disk_gb", "0"]
    assert host_reads_in_fit(image_folder, tmp_path / "a", 2, *args) == host_reads_in_fit(
        image_folder, tmp_path / "b", 6, *args
    )
