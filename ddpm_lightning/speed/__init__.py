"""The speed switches, which leave the recipe's maths alone: one subsystem, one entry point per object it changes.

- the run's `speed` group: `SpeedSwitches` (switches.py), a callback `DDPMModule` asks to apply itself: memory
  format, gradient checkpointing, matmul precision, the compiled UNet forwards (`UNetForward`), per-block compile
  (blocks.py), CUDA-graph capture (capture.py), and AdamW (optim.py: fused, foreach or compiled, `CompiledAdamW`);
- the Trainer: `FusedClipMixedPrecision` (precision.py): gradient clipping with a fused AdamW under mixed precision;
- the run: `keep_compile_cache` (compile_cache.py): inductor's cache beside the checkpoints.
"""

from .compile_cache import keep_compile_cache
from .optim import CompiledAdamW
from .precision import FusedClipMixedPrecision
from .switches import COMPILING, RENAMED, CompileMode, SpeedSwitches, UNetForward

__all__ = [
    "COMPILING",
    "RENAMED",
    "CompileMode",
    "CompiledAdamW",
    "FusedClipMixedPrecision",
    "SpeedSwitches",
    "UNetForward",
    "keep_compile_cache",
]
