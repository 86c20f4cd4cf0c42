"""`ddpm-lightning sample`, `export` and `prepare`: the commands outside of training.

`ddpm-lightning sample` and `ddpm-lightning export` use a trained model outside of training. `ddpm-lightning
prepare` resizes a data set once into shards to stream (shards.py).

    # 64 images: samples/000000.png ... samples/000063.png and samples/grid.png
    ddpm-lightning sample checkpoints/ddpm-butterflies-128/last.ckpt --num_images 64 --sampler ddim
    ddpm-lightning sample ddpm-butterflies-128 --seed 1 --output_dir more         # a saved diffusers folder
    ddpm-lightning sample google/ddpm-cifar10-32                                  # a Hub model id
    ddpm-lightning sample run/last.ckpt --num_images 1000 --sampler ddim --reference data/heliconius  # + FID/KID
    ddpm-lightning export checkpoints/ddpm-butterflies-128/last.ckpt my-model --samples run/samples/0049.png
    ddpm-lightning prepare ./photos s3://bucket/photos-128 --image_size 128 --crop squash  # then --data.dataset s3://...

Both take every model source `fit --model.pretrained` takes (model_source.py): a checkpoint (its EMA weights
whenever it has them, as the saved folders do), a saved diffusers folder, a bare UNet folder or a Hub model id.
Image `i` has its own generator (see `sample`). Sampling itself is sampling.py's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from . import posthoc_ema
from .data import shards
from .data.datamodule import default_num_workers
from .data.images import Crop, ResizedImages
from .files import FID_REFERENCE, NEAREST, why_not_written, write_whole
from .model_source import POSITIONAL, ModelSource, ModelSourceError, load_model
from .publish import ModelWriteError, save_pipeline, write_model_card
from .reporting.grids import grid_shape, save_grid
from .sampling import SAMPLERS, Sampler, denoise, make_sampler
from .sources import image_column_of, load_source

log = logging.getLogger(__name__)

COMMANDS = ("sample", "export", "prepare")


class CommandError(RuntimeError):
    """A problem the user can fix (its message names the fix); the command line shows it as one line."""


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def image_generator(seed: int, index: int) -> torch.Generator:
    """Image `index`'s own CPU generator: independent streams for every (seed, index), no overlap between seeds."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) tensor with 1, 3 or 4 channels as a PIL image (L, RGB or RGBA)."""
    if image.shape[0] not in (1, 3, 4):
        raise CommandError(f"Cannot write images with {image.shape[0]} channels as PNG (1, 3 or 4 can be written).")
    return to_pil_image(image)


def sample(
    model: str,
    num_images: int = 16,
    sampler: Sampler = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    output_dir: str = "samples",
    device: str | None = None,
    revision: str | None = None,
    reference: str | None = None,
    reference_split: str = "train",
    training_images: str | None = None,
    training_split: str = "train",
) -> list[Path]:
    """Draw images from a trained model into output_dir/000000.png, 000001.png, ... and output_dir/grid.png.

    Image i is drawn from its own generator seeded from (seed, i): the same seed gives the same images whatever
    batch_size is (up to floating-point rounding), and more images keep the first ones.

    Args:
        model: a Lightning checkpoint (.ckpt) of `ddpm-lightning fit` (its EMA weights when it has them), a
            folder saved by `fit` or `export` (model_index.json, unet/, scheduler/), a UNet folder (config.json
            and weights) or a Hub model id.
        num_images: how many images to draw.
        sampler: ddpm (the training schedule's sampler), ddim or dpmsolver++ (good images in ~50 steps).
        num_inference_steps: denoising steps; 1000 for ddpm and 50 for the others when left out.
        seed: the images' seed.
        batch_size: images denoised at once (memory, not the result).
        output_dir: where the PNGs go (created if missing; files of the same names are replaced). Each is
            written whole or not at all: a full disk stops the command, and the images before it stay.
        device: cuda, cuda:1, cpu, ...; cuda when available, else cpu.
        revision: the branch, tag or commit of a Hub model id (its main branch when left out).
        reference: score the images drawn against these real ones: FID and KID (`metrics.SampleQuality`'s default
            network), logged and written to output_dir/quality.json. Any source `data.dataset` takes (an image
            folder, a data set folder or file, a cached Hub id); its images are resized to the samples' size as
            training resizes them (squash). Their features are cached in output_dir/fid_reference/.
        reference_split: the split of `reference`, for data sets that have splits.
        training_images: with `reference`, the images the model was trained on (any source `data.dataset` takes):
            the copy check of training (`metrics.copied_share`, `reference` giving the scale: new images of the same
            kind), in quality.json and the log, and output_dir/nearest.png. A model does not record its training
            images, so they are named here.
        training_split: the split of `training_images`.

    Returns:
        The paths of the images written (grid.png, the grid of all of them, is written beside them).
    """
    steps = (1000 if sampler == "ddpm" else 50) if num_inference_steps is None else num_inference_steps
    check_sample_options(num_images, batch_size, sampler, steps, output_dir, reference, training_images)
    device = sampling_device(device)
    found = load_model(model, revision, POSITIONAL)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, images = draw(
        found.unet.to(device), found.scheduler_config, sampler, steps, seed, num_images, batch_size, out
    )
    write_image(out / "grid.png", lambda path: save_grid(images, path), paths)
    rows, cols = grid_shape(num_images)
    log.info(f"Wrote {num_images} images and grid.png ({rows} x {cols}) to {out}")
    if reference is not None:
        training = (training_images, training_split) if training_images is not None else None
        score(images, reference, reference_split, out, device, training)
    return paths


def check_sample_options(
    num_images: int,
    batch_size: int,
    sampler: str,
    steps: int,
    output_dir: str,
    reference: str | None,
    training_images: str | None,
) -> None:
    """`sample`'s options, checked before any model is loaded: each mistake is one CommandError naming the fix."""
    if num_images < 1 or batch_size < 1:
        raise CommandError(f"num_images ({num_images}) and batch_size ({batch_size}) must be positive.")
    if training_images is not None and reference is None:
        raise CommandError("--training_images needs --reference: new real images give the copy check its scale.")
    if sampler not in SAMPLERS:
        raise CommandError(f"Unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}.")
    if steps < 1:
        raise CommandError(f"num_inference_steps must be at least 1, not {steps} (leave it out for the default).")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise CommandError(f"--output_dir {output_dir} is a file: give a folder for the images (created if missing).")


def sampling_device(device: str | None) -> str:
    """`device`, or cuda when a GPU is visible, else cpu; a CUDA device without a GPU is a CommandError."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA GPU is visible here. Use --device cpu, or leave --device out.")
    return device


def draw(
    unet: torch.nn.Module,
    schedule: dict,
    sampler: Sampler,
    steps: int,
    seed: int,
    num_images: int,
    batch_size: int,
    out: Path,
) -> tuple[list[Path], torch.Tensor]:
    """Draw `num_images`, `batch_size` at a time, each from its own generator; write each as out/<index>.png.

    Returns:
        The paths written and the images, uint8 (N, C, H, W) as written.
    """
    paths: list[Path] = []
    images: list[torch.Tensor] = []
    batches = math.ceil(num_images / batch_size)
    title = f"Sampling {num_images} images ({sampler}, {steps} steps)"
    with tqdm(total=batches * steps, desc=title, unit="step", dynamic_ncols=True) as progress:
        for start in range(0, num_images, batch_size):
            indices = range(start, min(start + batch_size, num_images))
            fresh = make_sampler(schedule, sampler)  # per batch: multistep solvers keep state
            generators = [image_generator(seed, i) for i in indices]
            batch = denoise(unet, fresh, steps, generators, len(indices), progress.update)
            batch = batch.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).cpu()  # as torchvision's save_image rounds
            for i, image in zip(indices, batch):
                paths.append(write_image(out / f"{i:06d}.png", to_pil(image).save, paths))
            images.append(batch)
    return paths, torch.cat(images)


def read_images(source: str, split: str, size: int, option: str) -> torch.Tensor:
    """The images of `source` as uint8 (N, 3, size, size), resized as training resizes them (squash)."""
    try:
        rows = load_source(source, split)
        real = ResizedImages(rows, image_column_of(rows, None), size, "squash")
        if len(real) < 2:
            raise ValueError(f"it holds {len(real)} image(s); FID/KID need at least 2")
        return torch.stack([real[i] for i in tqdm(range(len(real)), desc=f"Reading {option}", unit="image")])
    except (ValueError, OSError) as err:
        raise CommandError(f"--{option} {source}: {err}") from err


def score(
    samples: torch.Tensor,
    reference: str,
    split: str,
    out: Path,
    device: str,
    training: tuple[str, str] | None = None,
) -> dict:
    """KID and FID of `samples` (uint8, as written) against the `reference` images, and the copy check.

    They are logged and written to out/quality.json; the reference features are cached in out/fid_reference/
    (`metrics.add_real_images`). With `training` (source, split), the share of samples that copy a training image
    (`metrics.copied_share`) and out/nearest.png.
    """
    from .metrics import InceptionWeightsUnavailable, SampleQuality, add_real_images, copies_said, headline

    if samples.shape[1] != 3 or len(samples) < 2:
        raise CommandError(
            f"FID/KID need at least 2 RGB images: drawn {len(samples)} with {samples.shape[1]} channels."
        )
    reals = read_images(reference, split, samples.shape[-1], "reference")
    try:
        quality = SampleQuality().to(device)
    except InceptionWeightsUnavailable as err:
        raise CommandError(f"--reference {reference}: {err}") from err
    with tqdm(total=len(reals), desc="FID: features of the reference", unit="image", dynamic_ncols=True) as bar:
        cached = add_real_images(quality, reals, out / FID_REFERENCE, bar.update)
    with tqdm(total=len(samples), desc="FID: features of the samples", unit="image", dynamic_ncols=True) as bar:
        quality.update_fake(samples, bar.update)
    scores = quality.compute()
    report: dict[str, Any] = {**scores, "num_samples": len(samples), "num_reference": len(reals)}
    report.update(reference=reference, network=quality.network)
    if training is not None:
        report.update(copy_check(samples, reals, training, out))
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    from_cache = f", reference features from {cached}" if cached is not None else ""
    copies = ""
    if training is not None:
        copies = f"; {copies_said(report['copied_share'], f'an image of {training[0]}')}, nearest.png"
    log.info(
        f"{headline(report)} against {reference} ({quality.network}{from_cache}){copies}; in {out / 'quality.json'}"
    )
    return report


def copy_check(samples: torch.Tensor, reals: torch.Tensor, training: tuple[str, str], out: Path) -> dict:
    """The copy check of `samples` against the `training` (source, split) images; writes out/nearest.png.

    The reference images `reals` (new images of the same kind) are its scale.
    """
    from . import metrics

    images = read_images(*training, samples.shape[-1], "training_images")
    copies, nearest = metrics.copy_check(samples, images, reals)
    pairs = [image for i, j in nearest for image in (samples[i], images[j])]
    write_image(out / NEAREST, lambda path: save_grid(torch.stack(pairs), path, len(nearest)), [])
    warning = metrics.copy_warning(copies["copied_share"], out / NEAREST, f"an image of {training[0]}")
    if warning is not None:
        log.warning(warning)
    return {**copies, "training_images": training[0], "num_training": len(images)}


def write_image(path: Path, save: Callable[[Path], object], written: list[Path]) -> Path:
    """`save(path)`, whole or not at all; a failure (a full disk) is one line saying what was written before it."""
    try:
        write_whole(path, save)
    except OSError as err:
        kept = f"{written[0].name} to {written[-1].name} are whole there" if written else "no image was written"
        raise CommandError(
            f"Cannot write {path} ({why_not_written(path.parent, err)}): {kept}. Free some space (or choose "
            "another --output_dir) and run again."
        ) from err
    return path


# ----------------------------------------------------------------------------------------------------------------
# Export


def export(
    model: str,
    out: str,
    samples: str | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    ema_length: float | list[float] | str | None = None,
    reference: str | None = None,
    reference_split: str = "train",
    num_images: int = 64,
    sampler: Sampler = "dpmsolver++",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | None = None,
) -> Path:
    """Write a model as a diffusers folder (a checkpoint's EMA weights when it has them) with a model card.

    The folder (model_index.json, unet/, scheduler/, README.md) loads with `DDPMPipeline.from_pretrained(out)`.
    With `ema_length`, the weights are a post-hoc EMA's, reconstructed from a run's `posthoc_ema` profiles.

    Args:
        model: a Lightning checkpoint (.ckpt) of `ddpm-lightning fit`, or any other model source `sample` takes.
        out: the folder to write (created if missing; the files it writes are replaced, each whole or not at
            all). A write that fails (a full disk) leaves no folder that was not there before.
        samples: an image to show in the model card, copied in as samples.png (e.g. a grid from
            <output_dir>/samples or the grid.png of `ddpm-lightning sample`); none when left out.
        repo_id: the Hub repo the folder is meant for, used in the card's usage snippet (else the folder).
        revision: the branch, tag or commit of a Hub model id (its main branch when left out).
        ema_length: with a checkpoint of a run trained with `--posthoc_ema.enabled true`: the EMA length (EDM2's
            sigma_rel, e.g. 0.1) to reconstruct from its profiles and the snapshots beside it (posthoc_ema.py).
            Several (0.05,0.1,0.2) sweep them with `reference`: the length whose samples have the lowest KID is
            written.
        reference: the sweep's real images (any source `data.dataset` takes: held-out or training images), resized
            to the model's size as training resizes them.
        reference_split: the split of `reference`.
        num_images: the sweep's samples per length (the same seeds for each length).
        sampler: the sweep's sampler (`sample`'s); the end-of-run measurement's (`quality.sampler`) by default.
        num_inference_steps: the sweep's denoising steps; when left out 20 for dpmsolver++ (as `quality`
            measures), 50 for ddim and 1000 for ddpm.
        seed: the sweep's seed.
        batch_size: the sweep's images denoised at once.
        device: where the sweep samples and scores (`sample`'s).

    Returns:
        The folder.
    """
    if samples is not None and not Path(samples).is_file():
        raise CommandError(f"--samples {samples}: no such image.")
    lengths = ema_lengths(ema_length)
    if len(lengths) > 1 and reference is None:
        raise CommandError(
            f"--ema_length {','.join(map(str, lengths))}: a sweep needs --reference (the real images that score each "
            "length); or give one length."
        )
    if reference is not None and len(lengths) < 2:
        raise CommandError("--reference scores an --ema_length sweep: give several lengths, e.g. 0.05,0.1,0.2.")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{out} is a file: give a folder to write the model into (created if missing).")
    found = load_model(model, revision, POSITIONAL)
    chosen = None
    if lengths:
        steps = SWEEP_STEPS.get(sampler, 50) if num_inference_steps is None else num_inference_steps
        check_sample_options(num_images, batch_size, sampler, steps, str(folder), reference, None)
        sweep = None
        if reference is not None:
            sweep = Sweep(reference, reference_split, num_images, sampler, steps, seed, batch_size, device)
        chosen = posthoc_weights(found, model, lengths, sweep)
    checkpoint = found.checkpoint or {}
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    hparams = checkpoint.get("hyper_parameters")
    config = {**({"model": hparams} if hparams else {}), **({"data": data} if data else {})}  # card: no "_" keys
    if chosen is not None:  # the card says which EMA the weights are
        config["posthoc_ema"] = {"ema_length": chosen}
    new = not folder.exists()
    try:
        save_pipeline(found.unet, found.noise_scheduler(), folder)
        write_model_card(
            folder,
            config=config or None,
            dataset=data.get("dataset"),
            steps=checkpoint.get("global_step"),
            grid_path=Path(samples) if samples else None,
            repo_id=repo_id,
            base_model=checkpoint.get("base_model") if found.checkpoint else found.base_model,
        )
    except OSError as err:
        reason = (
            str(err) if isinstance(err, ModelWriteError) else f"Cannot write {out} ({why_not_written(folder, err)})"
        )
        if new:  # a model folder with files missing is no model: nothing of it stays
            shutil.rmtree(folder, ignore_errors=True)
        left = "nothing was left there" if new else "each file there is whole, old or new"
        raise CommandError(f"{reason}: {left}. Free some space (or choose another folder) and run again.") from err
    log.info(f"Exported {model} to {folder}")
    return folder


def ema_lengths(value: float | Sequence[float] | str | None) -> list[float]:
    """`--ema_length` as a list: one length, a list, or lengths separated by commas ("0.05,0.1,0.2")."""
    if value is None:
        return []
    try:
        if isinstance(value, (int, float)):
            lengths = [float(value)]
        else:
            lengths = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except ValueError as err:
        raise CommandError(f"--ema_length {value}: give numbers separated by commas, e.g. 0.05,0.1,0.2.") from err
    try:
        posthoc_ema.check_lengths(lengths, "--ema_length")
    except ValueError as err:
        raise CommandError(str(err)) from err
    return lengths


SWEEP_STEPS = {"dpmsolver++": 20, "ddim": 50, "ddpm": 1000}  # the sweep's denoising steps per sampler, by default


@dataclass
class Sweep:
    """How `export` scores each EMA length: `num_images` samples' KID against the `reference` images."""

    reference: str
    split: str
    num_images: int
    sampler: Sampler
    steps: int
    seed: int
    batch_size: int
    device: str | None


def posthoc_weights(found: ModelSource, model: str, lengths: list[float], sweep: Sweep | None) -> float:
    """Put into `found.unet` the post-hoc EMA of the one length, or of the sweep's best; return that length."""
    state = posthoc_ema.checkpoint_state(found.checkpoint or {})
    if state is None:
        raise CommandError(
            f"--ema_length: {model} holds no post-hoc EMA profiles. Give the checkpoint of a run trained with "
            "--posthoc_ema.enabled true."
        )
    step = int((found.checkpoint or {}).get("global_step", 0))
    if step < 1:
        raise CommandError(f"--ema_length: {model} was saved before the first optimizer step: no EMA to reconstruct.")
    folder = Path(model).parent / posthoc_ema.SNAPSHOTS
    if not any(at < step for _, at in posthoc_ema.snapshots(folder)):
        log.warning(
            f"--ema_length: no snapshots before step {step} in {folder}: reconstructing from the checkpoint's "
            f"{len(state['sigma_rels'])} profiles alone (export the checkpoint where its run wrote it)."
        )
    template = copy.deepcopy(found.unet).cpu()  # (the reconstruction's shape; its weights are not read)

    def weights(length: float) -> dict[str, torch.Tensor]:
        return posthoc_ema.reconstruct(template, folder, state, step, length)

    if sweep is None:
        found.unet.load_state_dict(weights(lengths[0]))
        log.info(f"EMA length {lengths[0]} reconstructed at step {step} from the profiles {state['sigma_rels']}")
        return lengths[0]
    from .metrics import InceptionWeightsUnavailable, SampleQuality, headline

    device = sampling_device(sweep.device)
    reals = read_images(sweep.reference, sweep.split, found.unet.config.sample_size, "reference")
    try:
        quality = SampleQuality().to(device)
    except InceptionWeightsUnavailable as err:
        raise CommandError(f"--reference {sweep.reference}: {err}") from err
    quality.update_real(reals)
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for length in lengths:
        candidate = weights(length)
        found.unet.load_state_dict(candidate)
        with tempfile.TemporaryDirectory() as tmp:
            unet = found.unet.to(device)
            args = (sweep.sampler, sweep.steps, sweep.seed, sweep.num_images, sweep.batch_size, Path(tmp))
            _, images = draw(unet, found.scheduler_config, *args)
        quality.reset_fake()
        quality.update_fake(images)
        scores = {**quality.compute(), "num_samples": len(images), "num_reference": len(reals)}
        log.info(f"EMA length {length}: {headline(scores)}, {sweep.sampler}, {sweep.steps} steps")
        if best is None or scores["kid_mean"] < best[1]:
            best = (length, scores["kid_mean"], candidate)
    assert best is not None
    found.unet.load_state_dict(best[2])
    log.info(f"EMA length {best[0]} has the lowest KID against {sweep.reference}: writing it")
    return best[0]


# ----------------------------------------------------------------------------------------------------------------
# Prepare


def prepare(
    source: str,
    out: str,
    image_size: int = 128,
    crop: Crop = "squash",
    split: str = "train",
    image_column: str | None = None,
    num_workers: int | None = None,
    chunk_mb: float = 64,
) -> dict:
    """Decode and resize a data set once into shards that `fit --data.dataset OUT` streams.

    That is for a data set too large to cache, or one in an object store. The pixels are those the cached path
    trains on.

    Args:
        source: anything `--data.dataset` takes: a folder of images, a Hub-format data set, a Hub id.
        out: a new folder, or an s3:// or gs:// URL (credentials and endpoint as boto3 or google-cloud-storage
            find them, e.g. AWS_ENDPOINT_URL; each request to it gives up after DDPM_LIGHTNING_STORAGE_TIMEOUT
            seconds, 10 by default, and 3 tries). A training run must use the same image_size and crop.
        image_size: the side of the training images (`--data.image_size`).
        crop: squash, center or random (`--data.crop`).
        split: the split of `source` to prepare (`--data.split`).
        image_column: the column holding the images; found from the features when left out.
        num_workers: decoding processes; one per available core, at most 8, by default.
        chunk_mb: the size of one shard (LitData's chunk): a streaming rank holds a few at a time, and the
            shuffle moves whole shards, then the images inside each.

    Returns:
        The settings recorded beside the shards (ddpm_prepared.json): image_size, crop, images, source.
    """
    if image_size < 1 or chunk_mb <= 0:
        raise CommandError(f"image_size ({image_size}) and chunk_mb ({chunk_mb}) must be positive.")
    try:
        shards.litdata()
        shards.check_new_output(out)  # (an object store: its bucket, keys and endpoint, in seconds)
        rows = load_source(source, split)
        column = image_column_of(rows, image_column)
    except (ValueError, OSError, RuntimeError) as err:
        raise CommandError(str(err)) from err
    images = ResizedImages(rows, column, image_size, crop)
    log.info(f"Preparing {len(images)} images of {source} at {image_size} px ({crop}) into {out}")
    workers = default_num_workers() if num_workers is None else num_workers
    try:
        settings = shards.write(images, out, {"source": source, "split": split}, workers, chunk_mb)
    except shards.StorageError as err:
        raise CommandError(str(err)) from err
    log.info(
        f"Prepared {settings['images']} images in {out}: train with --data.dataset {out} --data.image_size "
        f"{image_size} --data.crop {crop}"
    )
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Command line


def is_command(args: Sequence[str] | dict | None = None) -> bool:
    """Whether `ddpm-lightning` was asked for one of these commands (the first argument is one of COMMANDS)."""
    argv = sys.argv[1:] if args is None else args
    return isinstance(argv, (list, tuple)) and len(argv) > 0 and argv[0] in COMMANDS


def run(args: Sequence[str] | None = None) -> list[Path] | Path | dict:
    """Parse `sample ...` / `export ...` / `prepare ...` with jsonargparse and run it; return what it returns.

    A CommandError or a model source that cannot be used exits with its one line.
    """
    from jsonargparse import CLI

    argv = list(sys.argv[1:] if args is None else args)
    try:
        return CLI([sample, export, prepare], args=argv, prog="ddpm-lightning", as_positional=True)
    except (CommandError, ModelSourceError) as err:
        raise SystemExit(f"ddpm-lightning {argv[0]}: error: {err}") from err
