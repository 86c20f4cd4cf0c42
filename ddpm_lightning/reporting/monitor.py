"""What a user sees while a run trains: the data it learns from, how fast it goes, and what it did.

- `RunReport`: at the start of a new run, the first 16 training images as the model gets them (after the
  resize/crop, before the flip) in `<output_dir>/samples/data.png` and TensorBoard's `data/images`; at the end,
  one summary block in the log and `<output_dir>/run_summary.json`.
- `ImagesThroughput`: Lightning's Throughput counter (images/s, steps/s, MFU from a FLOP count of the UNet),
  plus peak GPU memory, measured only on the Trainer's `log_every_n_steps` cadence: no host sync per step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..files import MODEL_INDEX, RunFolder
from ..metrics import copies_said
from .grids import save_grid
from .peak_flops import peak_bf16_flops

log = logging.getLogger(__name__)


def training_flops_per_image(unet: UNet2DModel) -> int:
    """FLOPs of one image's forward and backward pass, counted by torch.utils.flop_counter.

    They are counted on a copy of the UNet on the meta device (shapes only: instant, no memory). Attention is
    counted as the math backend's matmuls, which is what the fused kernels compute too.
    """
    with torch.device("meta"):
        copy = UNet2DModel.from_config(unet.config)
    size = copy.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, copy.config.in_channels, height, width, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        copy(x, t, return_dict=False)[0].float().square().mean().backward()
    return counter.get_total_flops()


def images_per_sec(mean: float | None) -> str:
    """The summary's words for the mean training speed (None: no batch after the first, which is start-up)."""
    if mean is None:
        return "images/s while training: not measured (no batch after the first, which counts as start-up)"
    return f"mean {mean} images/s while training"


class ImagesThroughput(Callback):
    """Logs images/s, steps/s, MFU and peak GPU memory through Lightning's `Throughput`, without a sync per step.

    It logs train/images_per_sec, train/steps_per_sec (optimizer steps), train/mfu (against the device's dense bf16
    peak, where peak_flops.py or Lightning knows it, or `peak_flops`) and train/peak_memory_gb (CUDA) to the
    loggers, and images/s to the progress bar, through Lightning's `Throughput` (the counter behind
    ThroughputMonitor).

    ThroughputMonitor waits for the GPU after every batch to time it; here batches are only counted (sizes
    are known on the host) and the clock is read, after one wait, on log steps, over the last `window` of them.
    """

    def __init__(self, window: int = 2, peak_flops: float | None = None) -> None:
        self.window = window
        self.peak_flops = peak_flops
        self.flops_per_image: int | None = None
        self.throughput: Throughput | None = None
        self.samples = self.batches = self.samples_at_update = 0
        self.started_at: float | None = None  # the clock's start, moved on by the time validation took
        self.paused_at = 0.0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Build the counter, with the device's peak FLOP/s."""
        # MFU against the bf16 peak whatever the training precision (the figure people compare across runs).
        peak = self.peak_flops or peak_bf16_flops(trainer.strategy.root_device)
        self.throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count the UNet's FLOPs per image and start the clock (rank 0)."""
        if trainer.is_global_zero and self.throughput is not None:
            unet = getattr(pl_module, "unet", None)
            self.flops_per_image = training_flops_per_image(unet) if isinstance(unet, UNet2DModel) else None
            self.samples = self.batches = self.samples_at_update = 0
            self.started_at = time.perf_counter()
            self.throughput.reset()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Count the batch; on a log step, read the clock and log the rates."""
        if not trainer.is_global_zero or self.throughput is None or self.started_at is None:
            return
        self.samples += len(batch)  # a shape, known on the host
        self.batches += 1
        # (the two private names ThroughputMonitor itself reads: see tests/test_private_names.py)
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # once per log step: the clock then covers the work queued before it
        done, self.samples_at_update = self.samples_at_update, self.samples
        flops = None if self.flops_per_image is None else self.flops_per_image * (self.samples - done)
        seconds = time.perf_counter() - self.started_at
        self.throughput.update(time=seconds, batches=self.batches, samples=self.samples, flops=flops)
        computed = self.throughput.compute()
        if "device/samples_per_sec" not in computed:
            return  # the window is not full yet
        world = trainer.world_size
        metrics = {
            "train/images_per_sec": computed["device/samples_per_sec"] * world,
            "train/steps_per_sec": computed["device/batches_per_sec"] / trainer.accumulate_grad_batches,
        }
        if "device/mfu" in computed:
            metrics["train/mfu"] = computed["device/mfu"]
        if trainer.strategy.root_device.type == "cuda":
            metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 1e9
        trainer._logger_connector.log_metrics(metrics, step=trainer.global_step)
        rate = round(metrics["train/images_per_sec"], 1)
        pl_module.log("img/s", rate, logger=False, rank_zero_only=True)  # for progress.py (prog_bar: read every step)

    # Validation pauses the clock (as ThroughputMonitor does) and is not itself timed.
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Pause the clock."""
        self.paused_at = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resume the clock."""
        if self.started_at is not None:
            self.started_at += time.perf_counter() - self.paused_at


class RunReport(Callback):
    """data.png at the start of a new run (not on resume), a summary at the end; both on rank 0.

    The summary's wall time runs from this callback's creation (before the data is loaded) and splits into
    start-up (data, sanity check and the first step, which includes any compile), training,
    validation, and epoch ends (grids, model saves, checkpoints). The start-up splits into set-up (data, model,
    sanity check: to `on_train_start`) and the first step (its batch, and any compile or capture, which happen in
    the first forward). It is registered before the grid and save callbacks so that its epoch-end hook starts that
    clock before they run.
    """

    def __init__(self, output_dir: str = "ddpm-butterflies-128", preview_images: int = 16) -> None:
        self.output_dir = output_dir
        self.preview_images = preview_images
        self.created = time.perf_counter()
        self.seconds = {"start-up": 0.0, "training": 0.0, "validation": 0.0, "epoch ends": 0.0}
        self.images = self.steps = 0
        self.training_images = 0  # those of the batches timed as training: all but the first (start-up)
        self.mark: float | None = None
        self.first_step_done = False
        self.train_started: float | None = None
        self.first_step: float | None = None  # seconds from on_train_start to the first batch's end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write data.png for a new run (rank 0)."""
        self.train_started = time.perf_counter()
        if trainer.is_global_zero and trainer.ckpt_path is None and hasattr(trainer.datamodule, "preview"):
            self.write_preview(trainer)

    def write_preview(self, trainer: Trainer) -> Path:
        """Save the data module's preview images as samples/data.png and to the loggers."""
        images = trainer.datamodule.preview(self.preview_images)
        path = save_grid(
            images, RunFolder(self.output_dir).data_preview, None, trainer.loggers, "data/images", trainer.global_step
        )
        log.info(f"Saved the first {len(images)} training images, as the model gets them, to {path}")
        return path

    # The clock: each hook closes the interval since the previous one and names it.
    def lap(self, phase: str) -> float:
        """Add the time since the previous lap to `phase`; return the clock's reading."""
        now = time.perf_counter()
        self.seconds[phase] += now - (self.mark if self.mark is not None else self.created)
        self.mark = now
        return now

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: torch.Tensor,
        batch_idx: int,
    ) -> None:
        """Count the batch's images; the time since the last lap was training (or start-up, before the first)."""
        self.images += len(batch) * trainer.world_size  # a shape, known on the host: no wait for the GPU
        self.steps += 1
        if self.first_step_done:
            self.training_images += len(batch) * trainer.world_size
        now = self.lap("training" if self.first_step_done else "start-up")
        if not self.first_step_done and self.train_started is not None:
            self.first_step = now - self.train_started
        self.first_step_done = True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the training (or start-up) lap."""
        self.lap("training" if self.first_step_done else "start-up")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the validation lap (the sanity check's is start-up)."""
        self.lap("validation" if self.first_step_done and not trainer.sanity_checking else "start-up")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the training lap; the epoch-end hooks after this one are timed as epoch ends."""
        self.lap("training")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the previous epoch's epoch-ends lap."""
        if self.mark is not None and self.first_step_done:
            self.lap("epoch ends")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the last lap and write the summary (rank 0)."""
        self.lap("epoch ends" if self.first_step_done else "start-up")
        if trainer.is_global_zero:
            self.write_summary(trainer)

    def write_summary(self, trainer: Trainer) -> dict:
        """Write run_summary.json and log the summary block; return the summary."""
        folder = RunFolder(self.output_dir)
        out = folder.root
        metrics = trainer.callback_metrics
        grids = folder.grids()
        checkpoint = trainer.checkpoint_callback
        training = self.seconds["training"]
        split = {}  # the start-up less its first step is the set-up (data, sanity check)
        if self.first_step is not None:
            split = {"set-up": self.seconds["start-up"] - self.first_step, "first step": self.first_step}
        summary = {
            "images_seen": self.images,
            "optimizer_steps": trainer.global_step,
            "batches_this_run": self.steps,
            "wall_seconds": {
                "total": round(sum(self.seconds.values()), 2),
                **{k: round(v, 2) for k, v in self.seconds.items()},
            },
            "start_up_seconds": {k: round(v, 2) for k, v in split.items()},
            # over the batches after the first (whose time is start-up): None when this run trained no other
            "mean_images_per_sec": round(self.training_images / training, 2) if self.training_images else None,
            "final_train_loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
            "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else None,
            **quality_fields(trainer),
            "model": str(out) if (out / MODEL_INDEX).exists() else None,
            "last_grid": str(grids[-1]) if grids else None,
            "logs": trainer.logger.log_dir if trainer.logger is not None else None,
            "last_checkpoint": checkpoint and (checkpoint.last_model_path or checkpoint.best_model_path) or None,
            "base_model": getattr(trainer.lightning_module, "base_model", None),  # what it was fine-tuned from
        }
        folder.summary.write_text(json.dumps(summary, indent=2) + "\n")
        wall, split = summary["wall_seconds"], summary["start_up_seconds"]  # the block shows the file's numbers
        start_up = "data, sanity check, first step"
        if split:
            start_up = f"set-up {split['set-up']:.1f} s: data, sanity check; first step {split['first step']:.1f} s"
        lines = [
            f"Run summary ({folder.summary})",
            f"  {self.images} images seen in {self.steps} batches this run; {trainer.global_step} optimizer steps in "
            "all",
            f"  wall time {wall['total']:.1f} s: start-up {wall['start-up']:.1f} s ({start_up}), training "
            f"{wall['training']:.1f} s, validation {wall['validation']:.1f} s, epoch ends {wall['epoch ends']:.1f} s "
            "(grids, saves, checkpoints)",
            f"  {images_per_sec(summary['mean_images_per_sec'])}; final train/loss "
            f"{summary['final_train_loss']}"
            + (f", val/loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""),
        ]
        lines += quality_lines(summary)
        names = {"model": "model", "last_grid": "last grid", "logs": "logs", "last_checkpoint": "last checkpoint"}
        lines += [f"  {name}: {summary[key]}" for key, name in names.items() if summary[key]]
        log.info("\n".join(lines))
        return summary


def quality_fields(trainer: Trainer) -> dict[str, Any]:
    """The summary's quality fields: the held-out images, the last KID/FID with N and M, the copy check, the best.

    The held-out images are the reference; the rest is the quality callback's `quality_summary`.
    """
    datamodule = getattr(trainer, "datamodule", None)
    name = getattr(datamodule, "reference_name", None)
    fields: dict[str, Any] = {"reference": name() if callable(name) else None}
    quality = next(
        (cb.quality_summary() for cb in trainer.callbacks if callable(getattr(cb, "quality_summary", None))), None
    )
    keys = ("kid_mean", "kid_std", "fid", "num_samples", "num_reference", "copied_share", "copy_threshold")
    fields.update({key: quality.get(key) if quality else None for key in keys})
    fields["quality"] = quality
    return fields


def quality_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary block's lines on the held-out images and the quality measured against them."""
    lines = [f"  held-out images: {summary['reference']}"] if summary.get("reference") else []
    quality = summary.get("quality")
    if not quality:
        return lines
    lines.append(f"  last quality (step {quality['step']}): {quality['headline']}")
    if quality.get("copied_share") is not None:
        lines.append(f"  copies: {copies_said(quality['copied_share'])}, samples/nearest.png")
    if quality["measurements"] > 1:
        best = quality["best"]
        still = "still improving" if quality["still_improving"] else "not improving on the best"
        lines.append(
            f"  best of {quality['measurements']} measurements: step {best['step']}, KID {best['kid_mean']:.4f} ± "
            f"{best['kid_std']:.4f}, FID {best['fid']:.2f} (by {quality['ranked_by']}); the last was {still}"
        )
    return lines
