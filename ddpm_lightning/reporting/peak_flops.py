"""The dense bf16 peak of the GPUs people train on, for `train/mfu` when `--throughput.peak_flops` is not given.

Lightning's table (`lightning.fabric.utilities.throughput`) finds no H200 by the name CUDA gives it ("NVIDIA H200":
it matches "sxm1"/"nvl1" only), lists its H200 and H100 NVL figures with 2:4 sparsity (twice the dense peak), and
reads an L40S as an L4. So these cards are looked up here first; any other card falls back to Lightning's table.

    >>> import unittest.mock
    >>> with unittest.mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H200"):
    ...     peak_bf16_flops(torch.device("cuda", 0))
    989500000000000.0
"""

from __future__ import annotations

import re

import torch
from lightning.fabric.utilities.throughput import get_available_flops

# (pattern on the lower-cased `torch.cuda.get_device_name`, dense bf16 FLOP/s), first match wins. NVIDIA's
# datasheets give the Tensor Core figures "with sparsity" (marked *); the dense peak is half of that. fp16's dense
# peak equals bf16's on every card here, and train/mfu is measured against bf16 whatever the precision.
DENSE_BF16_FLOPS: list[tuple[str, float]] = [
    (r"gh200", 989.5e12),  # NVIDIA GH200 Grace Hopper Superchip datasheet: BF16 1,979 TFLOPS*
    (r"h200 nvl", 835.5e12),  # NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: BF16 1,671 TFLOPS*
    (r"h200", 989.5e12),  # the same datasheet, H200 SXM ("NVIDIA H200"): BF16 1,979 TFLOPS*
    (r"h100 nvl", 835.5e12),  # NVIDIA H100 Tensor Core GPU datasheet, H100 NVL: BF16 1,671 TFLOPS*
    (r"h100 pcie", 756.5e12),  # the same datasheet, H100 PCIe: BF16 1,513 TFLOPS*
    (r"h100", 989.5e12),  # the same datasheet, H100 SXM ("NVIDIA H100 80GB HBM3"): BF16 1,979 TFLOPS*
    (r"a100", 312e12),  # NVIDIA A100 Tensor Core GPU datasheet, SXM and PCIe alike: BF16 312 | 624* TFLOPS
    (r"l40s", 362.05e12),  # NVIDIA L40S datasheet: BF16 362.05 | 733* TFLOPS
    (r"l40\b", 181.05e12),  # NVIDIA L40 datasheet: BF16 181.05 | 362.1* TFLOPS
    (r"\bl4\b", 121e12),  # NVIDIA L4 Tensor Core GPU datasheet: BF16 242* TFLOPS
    (r"\ba10\b", 125e12),  # NVIDIA A10 Tensor Core GPU datasheet: BF16 125 | 250* TFLOPS
]


def peak_bf16_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s: this table's figure, else Lightning's, else None.

    None is for a CPU, or a GPU neither knows; `--throughput.peak_flops` then gives it.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for pattern, flops in DENSE_BF16_FLOPS:
            if re.search(pattern, name):
                return flops
    return get_available_flops(device, torch.bfloat16)
