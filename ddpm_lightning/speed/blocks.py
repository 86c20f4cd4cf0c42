"""Regional compile (`speed.compile_blocks`): torch.compile each of the UNet's blocks on its own.

Each of the down, mid and up blocks is compiled on its own, instead of the UNet's whole forward, for a shorter
compile at start-up.

diffusers' `compile_repeated_blocks` raises for UNet2DModel (it declares no `_repeated_blocks`), so each block's
`forward` is replaced (an instance attribute: the weights, their names and the saved folders do not change) by one
that runs its compiled version in training, at the batch size of the first training step. Everything else runs the
block eagerly: an epoch's short last batch, validation and sampling (no gradients). Blocks of one class share their
`forward`'s code object, which dynamo compiles once per instance and shape and at most `recompile_limit` (8) times:
the tutorial UNet has 4 DownBlock2D and 5 UpBlock2D, so one more shape per block would already pass that limit and
fall back to eager.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from diffusers import UNet2DModel


class CompiledBlocks:
    """The state the blocks share: the compiled batch size, and whether each training step starts a CUDA graph."""

    def __init__(self, unet: UNet2DModel, mode: str, cuda_graphs: bool) -> None:
        self.batch = 0
        self.cuda_graphs = cuda_graphs
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        self.first = blocks[0]
        for block in blocks:
            if block is not None:
                compiled = torch.compile(block.forward, mode=mode, dynamic=False)
                block.forward = partial(self.forward, block, block.forward, compiled)

    def forward(
        self,
        block: torch.nn.Module,
        eager: Callable[..., Any],
        compiled: Callable[..., Any],
        hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """The block's output (whatever its class returns): compiled in a training step of the compiled size."""
        if not torch.is_grad_enabled() or len(hidden_states) < self.batch:
            return eager(hidden_states, *args, **kwargs)
        self.batch = len(hidden_states)
        if self.cuda_graphs and block is self.first:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: last step's outputs are done with
        return compiled(hidden_states, *args, **kwargs)


def compile_blocks(unet: UNet2DModel, mode: str, cuda_graphs: bool) -> CompiledBlocks:
    """Compile `unet`'s blocks in place, once (a second call returns the first one's state)."""
    if not hasattr(unet, "compiled_blocks"):
        unet.compiled_blocks = CompiledBlocks(unet, mode, cuda_graphs)
    return unet.compiled_blocks
