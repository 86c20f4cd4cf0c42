"""train/mfu's peak on the GPUs people train on: the lookup by CUDA's device name (mocked: no GPU here), and
ImagesThroughput using it on a CUDA device without Lightning's "FLOPs not found" warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Trainer

from ddpm_lightning.reporting.monitor import ImagesThroughput
from ddpm_lightning.reporting.peak_flops import peak_bf16_flops

CUDA = torch.device("cuda", 0)


# Names as torch.cuda.get_device_name reports them, and the datasheet's dense bf16 TFLOP/s.
CARDS = [
    ("NVIDIA H200", 989.5),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L4", 121),
    ("NVIDIA L40", 181.05),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA A10", 125),
]


@pytest.mark.parametrize("name, tflops", CARDS)
def test_each_card_gets_its_dense_bf16_peak(name, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_bf16_flops(CUDA) == pytest.approx(tflops * 1e12)


def test_lightning_lacks_or_doubles_the_cards_looked_up_here(monkeypatch):
    """Why the table exists: Lightning finds no "NVIDIA H200", and reads an L40S as an L4."""
    for name, expected in (("NVIDIA H200", None), ("NVIDIA L40S", 121e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert get_available_flops(CUDA, torch.bfloat16) == expected
        assert peak_bf16_flops(CUDA) != expected


def test_other_cards_fall_back_to_lightnings_table_and_a_cpu_has_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert peak_bf16_flops(CUDA) == get_available_flops(CUDA, torch.bfloat16) == pytest.approx(82.6e12)
    assert peak_bf16_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("given, expected", [(None, 989.5e12), (5e14, 5e14)])
def test_the_throughput_monitor_takes_the_looked_up_peak_unless_given_one(given, expected, monkeypatch):
    """On a (mocked) H200: the table's peak without a warning, or `--throughput.peak_flops` when given."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    monkeypatch.setattr(type(trainer.strategy), "root_device", property(lambda self: CUDA))
    monitor = ImagesThroughput(peak_flops=given)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "FLOPs not found for 'NVIDIA H200'" would fail here
        monitor.setup(trainer, None, "fit")
    assert monitor.throughput is not None and monitor.throughput.available_flops == pytest.approx(expected)
