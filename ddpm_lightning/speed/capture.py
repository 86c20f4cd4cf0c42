"""`speed.cuda_graph_capture`: the UNet's training forward and backward captured as CUDA graphs, without compile.

The capture is `torch.cuda.make_graphed_callables`': CUDA graphs in a capture of seconds instead of a compile of
minutes. At a batch size of 16 the step is launch-bound, and most of what `compile_mode: reduce-overhead` gains
there is the graphs: a stand-alone probe of the tutorial's step on one H100 (torch 2.11, 2026-11-25) ran 120-138
images/s eager, 166-178 compiled and 408 compiled with CUDA graphs. Not yet run on a GPU.

How it follows PyTorch's CUDA-graph notes (docs/source/notes/cuda.rst, `make_graphed_callables`' docstring):
- captured at the first training step, on that batch's shape, dtype and memory format (a static batch), from copies of
  its inputs; make_graphed_callables warms up on a side stream (3 iterations, `torch.autograd.grad`, so no `.grad` is
  written) before it captures;
- inside the Trainer's autocast, whose cache Lightning disables (`cache_enabled=False`, which capture requires);
- everything else runs eagerly: the loss, clipping and the AdamW step after the graphs; an epoch's short last batch,
  validation and sampling (no gradients);
- the gradients are the backward graph's static buffers, adopted as `.grad` and overwritten by the next replay: the
  optimizer reads them before that, and DDPMModule frees them after each step. Accumulating them over micro-batches
  would add a buffer to itself (pytorch#181723), so gradient accumulation is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from diffusers import UNet2DModel
from lightning.pytorch import Trainer


class UNetTrainCall(torch.nn.Module):
    """The UNet's prediction as a module: make_graphed_callables treats a module's parameters as the graph's."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's output tensor."""
        return self.unet(sample, timesteps, return_dict=False)[0]


class CapturedForward:
    """The training forward: the captured graphs for the batch they were captured on, else eager."""

    def __init__(self) -> None:
        self.graphed: Callable[..., torch.Tensor] | None = None
        self.layout: tuple | None = None  # shape, strides and dtype of the captured batch

    def __call__(self, unet: UNet2DModel, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's output: captured at the first training step, replayed for batches of its layout."""
        layout = (sample.shape, sample.stride(), sample.dtype, timesteps.shape)
        if not torch.is_grad_enabled() or self.layout not in (None, layout):
            return unet(sample, timesteps, return_dict=False)[0]
        if self.graphed is None:
            inputs = (sample.detach().clone(), timesteps.clone())  # the graphs' own input buffers
            self.graphed = cast(
                Callable[..., torch.Tensor], torch.cuda.make_graphed_callables(UNetTrainCall(unet), inputs)
            )
            self.layout = layout
        return self.graphed(sample, timesteps)


def check_capture(trainer: Trainer) -> None:
    """The refusals, each in one line: before any training."""
    if trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"speed.cuda_graph_capture cannot accumulate gradients (trainer.accumulate_grad_batches "
            f"{trainer.accumulate_grad_batches}): the captured backward writes every micro-batch's gradients into the "
            "same buffers. Set trainer.accumulate_grad_batches 1, or speed.cuda_graph_capture false."
        )
    if trainer.strategy.root_device.type != "cuda":
        raise ValueError(
            f"speed.cuda_graph_capture needs a CUDA GPU; this run trains on {trainer.strategy.root_device.type}: "
            "set speed.cuda_graph_capture false (or trainer.accelerator gpu on a machine with one)."
        )
