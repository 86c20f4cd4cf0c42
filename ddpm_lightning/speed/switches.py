"""The speed switches: `SpeedSwitches`, the run's `speed` group, applied to the UNet, its batches and AdamW.

They are the memory format, gradient checkpointing, matmul precision, the torch.compile'd UNet forwards
(`UNetForward`), the per-block compile (blocks.py), the CUDA-graph capture (capture.py) and AdamW's kernel
(optim.py); gradient clipping with a fused AdamW under mixed precision is precision.py's. None changes the maths:
checkpoints hold none of them, and a run may resume with others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from diffusers import UNet2DModel
from lightning.pytorch import Callback, LightningModule, Trainer

from ..unet import predict
from .blocks import compile_blocks
from .capture import CapturedForward, check_capture
from .optim import make_adamw

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
MatmulPrecision = Literal["highest", "high", "medium"]


class SpeedSwitches(Callback):
    """The run's speed switches (`--speed.*`): ways to train faster that leave the maths alone.

    The CLI wires them as the `speed` group; in Python, pass one among the Trainer's callbacks
    (`Trainer(callbacks=[SpeedSwitches(compile=True)])`). `DDPMModule` takes its trainer's (the defaults without
    one) and asks it to `apply` itself to the UNet, for the training batch's memory format (`batch`) and for AdamW
    (`adamw`). Combinations that cannot work are refused here, before anything is built.

    Args:
        compile: torch.compile the UNet's training and sampling forwards (`UNetForward`); checkpoints and saved
            folders do not change. At most one of `compile`, `compile_blocks`, `cuda_graph_capture`.
        compile_mode: torch.compile's `mode`; "reduce-overhead" and "max-autotune" use CUDA graphs on a GPU.
        compile_blocks: torch.compile each down, mid and up block instead (`blocks.py`): a shorter compile.
        cuda_graph_capture: the training forward and backward as CUDA graphs without torch.compile (`capture.py`;
            a static batch, CUDA only, no gradient accumulation).
        channels_last: the UNet and its inputs in channels-last memory format (faster convolutions on GPUs).
        fused_adamw: AdamW's fused kernel; by default on for parameters on a GPU, unless `compile_optimizer`.
        compile_optimizer: clipping and the AdamW update compiled as one function (`optim.CompiledAdamW`).
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        float32_matmul_precision: torch.set_float32_matmul_precision ("high": TF32 on GPUs that have it).
    """

    def __init__(
        self,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        compile_blocks: bool = False,
        cuda_graph_capture: bool = False,
        channels_last: bool = False,
        fused_adamw: bool | None = None,
        compile_optimizer: bool = False,
        gradient_checkpointing: bool = False,
        float32_matmul_precision: MatmulPrecision = "high",
    ) -> None:
        if compile + compile_blocks + cuda_graph_capture > 1:
            raise ValueError(
                "speed.compile, speed.compile_blocks and speed.cuda_graph_capture exclude each other: set one."
            )
        if compile_optimizer and fused_adamw:
            raise ValueError(
                "speed.compile_optimizer compiles AdamW's update into its own fused kernels, so it cannot use "
                "speed.fused_adamw true: set speed.fused_adamw false (or leave it out), or speed.compile_optimizer "
                "false."
            )
        self.compile, self.compile_mode, self.compile_blocks = compile, compile_mode, compile_blocks
        self.cuda_graph_capture, self.channels_last, self.fused_adamw = cuda_graph_capture, channels_last, fused_adamw
        self.compile_optimizer, self.gradient_checkpointing = compile_optimizer, gradient_checkpointing
        self.float32_matmul_precision = float32_matmul_precision

    @staticmethod
    def of(trainer: Trainer) -> SpeedSwitches | None:
        """The trainer's speed switches (the first among its callbacks), or None."""
        return next((c for c in trainer.callbacks if isinstance(c, SpeedSwitches)), None)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse, before any training, what the run's Trainer cannot do with these switches (`check_capture`)."""
        if self.cuda_graph_capture:
            check_capture(trainer)

    def apply(self, unet: UNet2DModel, forward: UNetForward) -> None:
        """The switches applied to `unet` and its `forward` (`DDPMModule.configure_model` asks).

        Each is a no-op where it does not apply, and a second fit on the same module keeps what the first compiled.
        """
        torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.compile and forward.compiled is None:
            forward.compile(self.compile_mode)
        if self.compile_blocks:
            compile_blocks(unet, self.compile_mode, uses_cuda_graphs(self.compile_mode))
        if self.cuda_graph_capture and forward.captured is None:
            forward.captured = CapturedForward()

    def batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A training batch in the UNet's memory format."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def adamw(
        self, parameters: Iterable[torch.nn.Parameter], settings: dict[str, Any], trainer: Trainer
    ) -> torch.optim.AdamW:
        """AdamW with `settings` (lr, betas, ...): compiled, fused or plain, as the switches say (`make_adamw`)."""
        return make_adamw(parameters, settings, self.fused_adamw, self.compile_optimizer, self.compile_mode, trainer)


SWITCHES = tuple(inspect.signature(SpeedSwitches).parameters)  # the `speed` group's keys
COMPILING = ("compile", "compile_blocks", "compile_optimizer")  # the switches that run torch.compile
# Their spelling before they were a group of their own (DDPMModule's arguments): read for one more release, with a
# warning, from configs, command lines and the hyperparameters of older checkpoints.
RENAMED = {f"model.{key}": f"speed.{key}" for key in SWITCHES}


def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether compiled code runs as CUDA graphs on a GPU (the compile modes that use them)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


class UNetForward:
    """The UNet's prediction in training (`train`) and in sampling (`sample`), eager or compiled.

    After `compile`, they go through torch.compile'd functions with static shapes.

    Training compiles once, for the largest batch seen; a smaller one (an epoch's short last batch) runs eagerly
    rather than compiling again, and so does validation (no gradients). Sampling compiles once per shape.
    """

    def __init__(self) -> None:
        self.compiled: dict[str, object] | None = None
        self.cuda_graphs = False
        self.batch = 0  # the batch size the training function was compiled for
        self.captured: Callable[..., torch.Tensor] | None = None  # speed.cuda_graph_capture's (capture.py)

    def compile(self, mode: CompileMode) -> None:
        """Compile the training and the sampling call with `mode`."""
        # Two functions, so two code objects: dynamo keeps its compiled graphs per code object, and the no-grad
        # sampling graph would otherwise count as a recompile of the training one. Static shapes (dynamic=False):
        # what CUDA graphs need; a batch dimension marked dynamic still recompiled for a last batch of 1 (dynamo
        # specialises sizes 0 and 1).
        self.compiled = {
            "train": torch.compile(unet_train_call, mode=mode, dynamic=False),
            "sample": torch.compile(predict, mode=mode, dynamic=False),
        }
        self.cuda_graphs = uses_cuda_graphs(mode)
        self.batch = 0

    def train(self, unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The training prediction: captured, compiled (for the compiled batch size, with gradients) or eager."""
        if self.captured is not None:
            return self.captured(unet, sample, timesteps)
        compiled = self.compiled
        if not compiled or not torch.is_grad_enabled() or len(sample) < self.batch:
            return unet_train_call(unet, sample, timesteps)
        self.batch = len(sample)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: last step's outputs are done with
        return compiled["train"](unet, sample, timesteps)  # type: ignore[operator]

    def sample(self, unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The sampling prediction: compiled (copied out of the CUDA graph's buffer) or eager."""
        compiled = self.compiled
        if not compiled:
            return predict(unet, sample, timesteps)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # CUDA graphs reuse their output buffer on the next call: copy it out.
        return compiled["sample"](unet, sample, timesteps).clone()  # type: ignore[operator]


def unet_train_call(unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's output tensor, as the training function (its own code object, compiled apart from sampling's)."""
    return unet(sample, timesteps, return_dict=False)[0]
