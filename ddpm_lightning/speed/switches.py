"""The speed switches of `DDPMModule` that leave the maths alone, applied by `apply_speed_switches`.

They are the memory format, gradient checkpointing, matmul precision, the torch.compile'd UNet forwards
(`UNetForward`), the per-block compile (blocks.py) and the CUDA-graph capture (capture.py). The compiled optimizer
step is optim.py's; gradient clipping with a fused AdamW under mixed precision is precision.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import UNet2DModel
from lightning.pytorch import LightningModule

from ..unet import predict
from .blocks import compile_blocks
from .capture import CapturedForward, check_capture

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def check_one_compiler(compile: bool, compile_blocks: bool, cuda_graph_capture: bool) -> None:
    """Refuse more than one of the three ways to compile."""
    if compile + compile_blocks + cuda_graph_capture > 1:
        raise ValueError(
            "model.compile, model.compile_blocks and model.cuda_graph_capture exclude each other: set one."
        )


def apply_speed_switches(module: LightningModule) -> None:
    """`DDPMModule`'s switches (its hyperparameters), applied to its UNet once it is on its device.

    Each is a no-op where it does not apply, and a second fit on the same module keeps what the first compiled.
    """
    unet, forward, hp = module.unet, module.unet_forward, module.hparams
    torch.set_float32_matmul_precision(hp.float32_matmul_precision)
    if hp.channels_last:
        unet.to(memory_format=torch.channels_last)
    if hp.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if hp.compile and forward.compiled is None:
        forward.compile(hp.compile_mode)
    if hp.compile_blocks:
        compile_blocks(unet, hp.compile_mode, uses_cuda_graphs(hp.compile_mode))
    if hp.cuda_graph_capture and forward.captured is None:
        check_capture(module.trainer)
        forward.captured = CapturedForward()


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
        self.captured: Callable[..., torch.Tensor] | None = None  # model.cuda_graph_capture's (capture.py)

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
