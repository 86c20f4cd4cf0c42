"""Every YAML in configs/ trains: `fit` for a few steps on the CPU with only the sizes overridden.

Picked up by glob, so a new config is tested without editing this file. A config without `model.unet` is an
overlay, meant to be layered on configs/butterflies.yaml with a second -c (as configs/butterflies-fast.yaml
says in its header); it is run that way. Overridden: the data (a tiny local image folder instead of the Hub
id, 16 px, batch 4, no loader processes), the UNet (tiny), the grid (4 images, 2 steps), the length (3 steps),
the accelerator (CPU) and the output folders. Precision, clipping, compile, channels_last, the cache and the
other data settings stay as shipped, and the optimizer is the one a GPU gets: fused AdamW (its default there), or
the compiled clip-and-update where the config sets `speed.compile_optimizer`. `16-mixed`, which
Lightning would turn into bf16 on a CPU, runs as it does on a GPU: fp16 autocast with a GradScaler.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from ddpm_lightning.callbacks import MeasureQuality
from ddpm_lightning.cli import main
from ddpm_lightning.metrics import FID_MIN_IMAGES
from ddpm_lightning.sources import load_source
from ddpm_lightning.speed.optim import CompiledAdamW

from conftest import MICRO_UNET, REPO, TINY_CONFIG, TINY_DATA_AND_GRID

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
BASE = REPO / "configs" / "butterflies.yaml"


def is_overlay(config: Path) -> bool:
    return "unet" not in (yaml.safe_load(config.read_text()).get("model") or {})


def shipped(config: Path) -> dict:
    """The config's values as the CLI merges them (an overlay over butterflies.yaml)."""
    merged: dict = {}
    for path in ([BASE] if is_overlay(config) else []) + [config]:
        for section, values in yaml.safe_load(path.read_text()).items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(values)
            else:
                merged[section] = values
    return merged


class RecordSettings(Callback):
    """What the run really used (`--trainer.callbacks+=test_configs.RecordSettings`)."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        plugin = trainer.precision_plugin
        RecordSettings.seen = {
            "precision": trainer.precision,
            "scaler": getattr(plugin, "scaler", None) is not None,
            "gradient_clip_val": trainer.gradient_clip_val,
            "fused": bool(trainer.optimizers[0].defaults["fused"]),
            "compiled_step": isinstance(trainer.optimizers[0], CompiledAdamW),
            "compile": pl_module.unet_forward.compiled is not None,
            "channels_last": pl_module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last),
            "steps": trainer.global_step,
            "prediction_type": pl_module.noise_scheduler.config.prediction_type,
            "loss_weighting": pl_module.hparams.loss_weighting,
            "learning_rate": trainer.lr_scheduler_configs[0].scheduler.base_lrs[0],  # the peak AdamW and schedule use
        }


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_trains_as_shipped_on_cpu(config, image_folder, tmp_path, monkeypatch):
    values = shipped(config)
    model, speed = values.get("model", {}), values.get("speed", {})
    precision = values.get("trainer", {}).get("precision", "32-true")
    if precision == "16-mixed":  # as on a GPU: fp16 autocast and a GradScaler (plus the CLI's checkpoint IO)
        precision_args = [
            "--trainer.precision",
            "null",
            "--trainer.plugins",
            json.dumps(
                [
                    {
                        "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
                        "init_args": {"precision": "16-mixed", "device": "cpu"},
                    },
                    {"class_path": "ddpm_lightning.checkpointing.AtomicCheckpointIO"},
                ]
            ),
        ]
    else:
        precision_args = []
    layers = ["-c", str(BASE)] if is_overlay(config) else []
    # held-out images where the config has them (it names them relative to the checkout): this test's, so that
    # the run validates and ends with its FID as shipped
    data = values.get("data", {})
    held_out = ["--data.val_dataset", str(image_folder)] if data.get("val_dataset") else []
    compile_optimizer = speed.get("compile_optimizer", False)
    torch._dynamo.reset()  # (the compiled step guards on its optimizer: another test's would count as a recompile)
    # Configs that compile compile once. (config.patch, not monkeypatch: its undo deletes a dynamo config entry.)
    with torch._dynamo.config.patch(error_on_recompile=True):
        main(
            [
                "fit",
                *layers,
                "-c",
                str(config),
                "--data.dataset",
                str(image_folder),
                *TINY_DATA_AND_GRID,
                "--model.unet",
                json.dumps(MICRO_UNET),
                "--speed.fused_adamw",
                str(not compile_optimizer).lower(),
                "--trainer.max_steps",
                "3",
                "--trainer.accelerator",
                "cpu",
                "--output_dir",
                str(tmp_path / "out"),
                "--checkpoint.dirpath",
                str(tmp_path / "checkpoints"),
                "--trainer.callbacks+=test_configs.RecordSettings",
                *precision_args,
                *held_out,
                "--quality.num_samples",  # a size: the shipped counts and samplers are test_the_quality_defaults'
                "4",
            ]
        )
    seen = RecordSettings.seen
    assert seen["prediction_type"] == (model.get("prediction_type") or "epsilon")  # null: the default
    assert seen["loss_weighting"] == model.get("loss_weighting", "uniform")
    rate = model.get("learning_rate", 1e-4) * model.get("learning_rate_scale", 1.0)  # an overlay's scale, on its base's
    assert seen["learning_rate"] == pytest.approx(rate, rel=1e-9)
    if config.name == "fine-tune.yaml":  # a fifth of butterflies.yaml's 1e-4
        assert seen["learning_rate"] == pytest.approx(2e-5, rel=1e-9)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert (summary["fid"] is not None) == bool(held_out), summary
    assert seen["steps"] == 3
    assert seen["precision"] == precision
    assert seen["scaler"] == (precision == "16-mixed")
    assert seen["gradient_clip_val"] == values.get("trainer", {}).get("gradient_clip_val")
    assert seen["fused"] is (not compile_optimizer)
    assert seen["compiled_step"] == compile_optimizer
    assert seen["compile"] == speed.get("compile", False)
    assert seen["channels_last"] == speed.get("channels_last", False)
    assert (tmp_path / "out" / "model_index.json").exists()


def test_the_quick_start_is_315_steps_on_the_shipped_photos_and_ends_with_grid_0004():
    """README's quick start: configs/tiny.yaml trains on the shipped data/heliconius (run from the repository root)
    for 315 optimizer steps (5 epochs of 1000 photos in batches of 16), and its last grid is samples/0004.png; it
    holds out the 200 validation photos, so it ends with a KID and FID of its quality.num_samples against them, and
    checks copies against all its training photos (quality.memorisation_images, by default 2,000)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    photos = len(load_source(str(REPO / config["data"]["dataset"])))
    held_out = len(load_source(str(REPO / config["data"]["val_dataset"]), config["data"]["val_split"]))
    samples = config["quality"]["num_samples"]
    assert held_out == 200
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{samples} samples against the {held_out} held-out photos" in readme
    assert f"one of its {photos} training photos" in readme
    default = inspect.signature(MeasureQuality).parameters["memorisation_images"].default
    assert config["quality"].get("memorisation_images", default) >= photos
    epochs, batch = config["trainer"]["max_epochs"], config["data"]["train_batch_size"]
    steps = epochs * math.ceil(photos / batch)
    assert (photos, epochs, batch, steps) == (1000, 5, 16, 315)
    assert epochs % config["grid"]["save_image_epochs"] == 0  # so the last epoch's grid is the last one
    readme = (REPO / "README.md").read_text()
    assert f"{steps} optimizer steps" in readme and f"{config['output_dir']}/samples/{epochs - 1:04d}.png" in readme


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_the_quality_defaults_are_2048_dpm_solver_samples_on_a_gpu_and_a_few_for_kid_on_a_cpu(config):
    """A GPU config (butterflies.yaml and the overlays on it) measures at its end with at least 2,048 samples
    (FID's feature size) drawn by DPM-Solver++ in 20 steps, and not during the run; the CPU config (tiny.yaml)
    draws a few, where KID leads, with the same sampler."""
    defaults = {name: p.default for name, p in inspect.signature(MeasureQuality).parameters.items()}
    values = {**defaults, **shipped(config).get("quality", {})}
    assert (values["sampler"], values["num_inference_steps"]) == ("dpmsolver++", 20)
    if config == TINY_CONFIG:
        assert values["num_samples"] < FID_MIN_IMAGES
    else:
        assert values["num_samples"] >= FID_MIN_IMAGES and values["measure_quality_epochs"] == 0


@pytest.mark.slow  # (7 s on the shared 2-core machine: building the tutorial's UNet twice)
def test_the_gpu_configs_end_of_run_measurement_is_27_percent_of_its_training_flops():
    """docs/configuration.md's figures, counted on the meta device: one pass of butterflies.yaml's UNet at 128 px
    is 124 GFLOP and a training image 372, so its 2,048 x 20 sampling passes are 27% of 50 epochs of the tutorial's
    1,000 images: more than the training at every 10 epochs (its grid's cadence), hence at the end only."""
    from diffusers import UNet2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_lightning.reporting.monitor import training_flops_per_image

    values = shipped(BASE)
    size, quality = values["data"]["image_size"], values["quality"]
    with torch.device("meta"):
        unet = UNet2DModel(sample_size=size, **values["model"]["unet"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 3, size, size, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    forward, training = counter.get_total_flops(), training_flops_per_image(unet)
    sampling = quality["num_samples"] * quality["num_inference_steps"] * forward
    share = sampling / (values["trainer"]["max_epochs"] * 1000 * training)
    assert (round(forward / 1e9), round(training / 1e9), round(share, 2)) == (124, 372, 0.27)
    measurements = values["trainer"]["max_epochs"] // values["grid"]["save_image_epochs"]
    assert measurements * share > 1  # measured at the grid's cadence, it would cost more than the training
    docs = " ".join((REPO / "docs" / "configuration.md").read_text().split())
    assert "is 124 GFLOP and one training image 372" in docs and "are 27% of the FLOPs of its 50 epochs" in docs
