"""The speed switches, which leave the recipe's maths alone: one subsystem, one entry point per object it changes.

- the module: `apply_speed_switches(module)` (switches.py): memory format, gradient checkpointing, matmul
  precision, the compiled UNet forwards (`UNetForward`), per-block compile (blocks.py), CUDA-graph capture
  (capture.py);
- the optimizer: `make_adamw` (optim.py): fused, foreach or compiled (`CompiledAdamW`) AdamW;
- the Trainer: `FusedClipMixedPrecision` (precision.py): gradient clipping with a fused AdamW under mixed precision;
- the run: `keep_compile_cache` (compile_cache.py): inductor's cache beside the checkpoints.
"""

from .compile_cache import keep_compile_cache
from .optim import CompiledAdamW, make_adamw
from .precision import FusedClipMixedPrecision
from .switches import CompileMode, UNetForward, apply_speed_switches, check_one_compiler

__all__ = [
    "CompileMode",
    "CompiledAdamW",
    "FusedClipMixedPrecision",
    "UNetForward",
    "apply_speed_switches",
    "check_one_compiler",
    "keep_compile_cache",
    "make_adamw",
]
