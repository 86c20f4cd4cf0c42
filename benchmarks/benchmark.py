"""Training and sampling speed of this project against the diffusers tutorial's Accelerate loop, side by side.

On a GPU (the numbers for benchmarks/RESULTS.md), from the repository root:

    python benchmarks/benchmark.py --batch-sizes 16,64 --workers 8 \
        --project-args "" --project-args "-c configs/butterflies-fast.yaml" --out benchmarks/h100.json
    python benchmarks/benchmark.py --end-to-end-only --epochs 20 --max-images 750 --workers 8 \
        --project-args "-c configs/butterflies-fast.yaml"

CPU smoke test (a tiny UNet at 32 px on 20 images; its numbers mean nothing):

    python benchmarks/benchmark.py --tiny [--epochs 1]

For each batch size, in this one process, on the same image files and the same UNet, it trains:
    tutorial nw=N   tutorial_loop.py, the tutorial as written, once per --workers value; the largest is the
                    baseline that every ratio is taken against
    project ARGS    ddpm_lightning.cli.main(["fit", "--config", "configs/butterflies.yaml", ...overrides, *ARGS]),
                    once per --project-args, timed by StepTimer, a callback added through --trainer.callbacks
and reports images/s, ms per step, achieved TFLOP/s and MFU, peak GPU memory, checkpoints written in the window
(the config's own cadence is kept) and the ratio to the baseline. With the first batch size, grids of 16: each
project's DDPMModule.sample with DDPM-1000 and DDIM-50, and the tutorial's DDPMPipeline. With --epochs E, the
end-to-end row (end_to_end.py): the whole recipe for E epochs on each side, from process start to last file.

A run is timed from the end of its last warm-up step to the end of its last measured step, data loading
included, with torch.cuda.synchronize() at those two points only: a sync every step would force on the
project the per-step stall that the tutorial's `loss.item()` causes and the project avoids.
FLOPs are the UNet's forward + backward for one image, counted once with FlopCounterMode; MFU divides the
achieved rate by a large matmul timed on the same device (bf16 on CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
sys.path.insert(0, str(ROOT))  # `benchmarks.benchmark.StepTimer` must import by name for --trainer.callbacks

import accelerate  # noqa: E402
import datasets  # noqa: E402
import diffusers  # noqa: E402
import lightning  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ddpm_lightning import cli  # noqa: E402
from ddpm_lightning.sources import find_images  # noqa: E402

from benchmarks import tutorial_loop  # noqa: E402

# argparse defaults, full run / --tiny; None means "all images".
DEFAULTS = dict(
    image_size=(128, 32), warmup=(10, 2), steps=(50, 4), max_images=(None, 20), grid_steps=(1000, 5), fast_steps=(50, 5)
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
RUNS: list[dict] = []  # StepTimer's results: cli.main returns nothing, so the callback hands them over here


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Times the project's training from inside its own Trainer, the way tutorial_loop times the tutorial;
    after the run, one grid per sampler through DDPMModule.sample, the call SampleGrid makes."""

    def __init__(self, warmup: int, steps: int, grid_steps: int = 0, fast_steps: int = 0):
        self.warmup, self.steps, self.grid_steps, self.fast_steps = warmup, steps, grid_steps, fast_steps
        self.batches, self.images, self.t0, self.first_step_end, self.result = 0, 0, 0.0, 0.0, None
        self.checkpoints = 0  # saves inside the window: the config's own cadence, as users get it

    def on_train_start(self, trainer, pl_module) -> None:
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.batches >= self.warmup and self.result is None:
            self.checkpoints += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches == 1:
            sync()
            self.first_step_end = time.perf_counter()
        if self.batches == self.warmup:
            sync()
            self.t0 = time.perf_counter()
        elif self.batches > self.warmup:
            self.images += len(batch)  # the last batch of an epoch may be short
        if self.batches == self.warmup + self.steps:
            sync()
            self.result = {
                "seconds": time.perf_counter() - self.t0,
                "images": self.images,
                "steps": self.steps,
                "first_step_end": self.first_step_end,
                "checkpoints": self.checkpoints,
            }
            self.result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None

    def on_train_end(self, trainer, pl_module) -> None:
        # Runs after the Trainer's own end-of-run grid and save, so neither is timed here.
        if self.result is None:
            raise RuntimeError(f"Training stopped after {self.batches} batches, short of {self.warmup}+{self.steps}.")
        for sampler, n in (("ddpm", self.grid_steps), ("ddim", self.fast_steps)):
            if n:
                sync()
                t = time.perf_counter()
                pl_module.sample(16, sampler, n, torch.Generator(device="cpu").manual_seed(0))
                sync()
                self.result[f"grid_{sampler}_{n}_seconds"] = time.perf_counter() - t
        RUNS.append(self.result)


def train_flops_per_image(unet: dict, image_size: int) -> int:
    """FLOPs of one forward + backward of the UNet on one image: convolutions, matmuls, attention."""
    model = UNet2DModel(sample_size=image_size, **unet).to(DEVICE)
    x = torch.randn(1, model.config.in_channels, image_size, image_size, device=DEVICE)
    t = torch.randint(0, 1000, (1,), device=DEVICE)
    # The math backend spells attention as matmuls, which FlopCounterMode counts on any device (it has no
    # formula for the CPU flash kernel); the count is the same as for the fused kernels.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, return_dict=False)[0].square().mean().backward()
    return counter.get_total_flops()


def peak_tflops() -> tuple[float, str]:
    """The device's dense matmul rate, measured here: bf16 on CUDA (the same peak as fp16), fp32 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 50) if CUDA else (2048, torch.float32, 5)
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}x{n} matmul"


def run_project(a, project_args: str, batch_size: int, image_dir: str, grids: bool) -> dict:
    grid_steps, fast_steps = (a.grid_steps, a.fast_steps) if grids else (0, 0)
    timer = {
        "class_path": "benchmarks.benchmark.StepTimer",
        "init_args": {"warmup": a.warmup, "steps": a.steps, "grid_steps": grid_steps, "fast_steps": fast_steps},
    }
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "fit", "--config", str(TINY_CONFIG if a.tiny else ROOT / "configs" / "butterflies.yaml"),
            "--model.unet", json.dumps(a.unet),  # the tutorial loop's UNet, whatever the config holds
            "--data.dataset", image_dir,
            "--data.image_size", str(a.image_size),
            "--data.train_batch_size", str(batch_size),
            "--data.val_dataset", "null",  # every image trained, none held out or scored: the tutorial loop's work
            "--trainer.max_steps", str(a.warmup + a.steps),
            "--trainer.max_epochs", "-1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.callbacks", json.dumps([timer]),
            "--output_dir", f"{tmp}/out",
            "--checkpoint.dirpath", f"{tmp}/checkpoints",  # where, not how often: the config's cadence is timed
            # Grids and model saves come every 10 and 30 epochs, which a window of some dozen steps cannot hold in
            # proportion: none inside it. The end-of-run grid is cut to one 1-step image since it is not timed.
            "--grid.save_image_epochs", "1000000",
            "--save.save_model_epochs", "1000000",
            "--grid.eval_batch_size", "1", "--grid.sampler", "ddim", "--grid.num_inference_steps", "1",
        ]  # fmt: skip
        if not CUDA:  # butterflies.yaml's 16-mixed needs a GPU, like the tutorial's fp16
            argv += ["--trainer.precision", "32-true"]
        argv += shlex.split(project_args)  # last, so they override the above
        runs, own_argv, started = len(RUNS), sys.argv, time.perf_counter()
        sys.argv = sys.argv[:1]  # else LightningCLI warns that it sees this script's flags beside args=
        try:
            cli.main(argv)
        finally:
            sys.argv = own_argv
        assert len(RUNS) == runs + 1, "StepTimer did not report: did --project-args replace --trainer.callbacks?"
    result = RUNS[-1]
    result["first_step_s"] = result.pop("first_step_end") - started
    return result


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def markdown(report: dict) -> str:
    def fmt(value, spec: str, suffix: str = "") -> str:
        return "—" if value is None else format(value, spec) + suffix

    lines = [
        f"Device: {report['device']}; peak {report['peak_tflops']:.1f} TFLOP/s ({report['peak_kind']}, measured); "
        f"{report['flops_per_image'] / 1e9:.2f} GFLOP per training image (UNet forward + backward).",
    ]
    if report["training"]:
        lines += [
            "",
            f"| run | batch | images/s | ms/step | TFLOP/s | MFU | peak GiB | 1st step s | ckpts in window | "
            f"÷ {report['baseline']} |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
    for r in report["training"]:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['batch_size']} | {r['error']} | | | | | | | |")
            continue
        cells = [r["run"], r["batch_size"], f"{r['images_per_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['tflops']:.2f}",
                 f"{r['mfu']:.1%}", fmt(r["peak_mem_gib"], ".2f"), f"{r['first_step_s']:.1f}",
                 fmt(r["raw"].get("checkpoints"), "d"), fmt(r.get("vs_baseline"), ".2f", "×")]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if report["grids"]:
        lines += ["", "| grid of 16 | seconds |", "|---|--:|"]
        lines += [f"| {g['grid']} | {g['seconds']:.2f} |" for g in report["grids"]]
    if report.get("end_to_end"):
        lines += ["", report["end_to_end"].get("markdown") or f"End to end: {report['end_to_end']['error']}"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--images",
        default="data/heliconius-photos",
        help="folder of training images, both sides (default: the shipped photos as files: benchmarks/README.md)",
    )
    p.add_argument("--max-images", type=int, help="use only the first N images (default: all; --tiny: 20)")
    p.add_argument("--batch-sizes", default="16", help="comma-separated, e.g. 16,64,128 (the first: end to end)")
    p.add_argument(
        "--workers",
        default="0,8",
        help="DataLoader num_workers of the tutorial variants; the largest is "
        "the baseline of every ratio, and the end-to-end tutorial run",
    )
    p.add_argument("--image-size", type=int, help="default 128 (--tiny: 32)")
    p.add_argument("--warmup", type=int, help="untimed steps per run (default 10, --tiny: 2)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 50, --tiny: 4)")
    p.add_argument("--grid-steps", type=int, help="DDPM steps of the grids, 0 for no grids (default 1000, --tiny: 5)")
    p.add_argument("--fast-steps", type=int, help="DDIM steps of the project's fast grid (default 50, --tiny: 5)")
    p.add_argument(
        "--tutorial-grid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the tutorial's DDPMPipeline grid too (45-57 s on an H100)",
    )
    p.add_argument(
        "--project-args",
        action="append",
        help='project CLI overrides, e.g. "-c configs/butterflies-fast.yaml"; repeat it for several '
        "project runs beside the same tutorial runs (default: one run of configs/butterflies.yaml)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="also the end-to-end row: the whole recipe for this many epochs on both sides (0: not)",
    )
    p.add_argument("--end-to-end-only", action="store_true", help="only the end-to-end row")
    p.add_argument("--seed", type=int, default=0, help="end to end: the seed of both sides")
    p.add_argument(
        "--val-images",
        help="end to end: held-out images; each side's saved model gets this project's val/loss on them after its run",
    )
    p.add_argument("--last-n", type=int, default=100, help="end to end: the last steps whose losses are compared")
    p.add_argument("--out-dir", default="ddpm-end-to-end", help="end to end: grids.png, end_to_end.json, the logs")
    p.add_argument("--keep-runs", action="store_true", help="end to end: keep the runs' folders in OUT_DIR")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny UNet, 32 px, 20 images, a few steps")
    p.add_argument("--out", help="write the report (with its markdown) to this JSON file")
    a = p.parse_args()
    for key, (full, tiny) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, tiny if a.tiny else full)
    a.project_args = a.project_args or [""]
    # --tiny: configs/tiny.yaml's UNet, the one its project side trains anyway (as gpu_smoke.py --cpu reads it)
    a.unet = yaml.safe_load(TINY_CONFIG.read_text())["model"]["unet"] if a.tiny else tutorial_loop.TUTORIAL_UNET
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    workers = [int(w) for w in a.workers.split(",")]

    images = find_images(Path(a.images).resolve())[: a.max_images]
    if not images:
        sys.exit(f"No images under {a.images}: give --images DIR.")
    report = {
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {m.__name__: m.__version__ for m in (torch, lightning, diffusers, accelerate, datasets)},
        "command": shlex.join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(a).items() if k != "out"} | {"images": f"{len(images)} from {a.images}"},
        "flops_per_image": train_flops_per_image(a.unet, a.image_size),
        "baseline": f"tutorial nw={max(workers)}",
    }
    report["peak_tflops"], report["peak_kind"] = peak_tflops()
    free_memory()
    report["training"], report["grids"] = [], []

    def record(name: str, batch_size: int, run, *args) -> dict:
        try:
            r = run(*args)
        except torch.OutOfMemoryError:
            row = {"run": name, "batch_size": batch_size, "error": "out of memory"}
        else:
            ips = r["images"] / r["seconds"]
            tflops = report["flops_per_image"] * ips / 1e12
            row = {"run": name, "batch_size": batch_size, "images_per_s": ips,
                   "step_ms": 1000 * r["seconds"] / r["steps"], "tflops": tflops, "mfu": tflops / report["peak_tflops"],
                   "peak_mem_gib": r["peak_mem_gib"], "first_step_s": r["first_step_s"], "raw": r}  # fmt: skip
        report["training"].append(row)
        free_memory()
        return row

    with tempfile.TemporaryDirectory() as tmp:
        # The project takes a folder: link exactly these files into one, and give the tutorial the same links.
        links = []
        for i, path in enumerate(images):
            links.append(f"{tmp}/{i:05d}{Path(path).suffix}")
            os.symlink(path, links[-1])
        for i, bs in enumerate([] if a.end_to_end_only else batch_sizes):
            grids = i == 0 and a.grid_steps > 0  # grids once, with the first batch size
            rows = []
            for nw in workers:
                grid_steps = a.grid_steps if grids and a.tutorial_grid and nw == workers[0] else 0
                with tempfile.TemporaryDirectory() as logdir:
                    args = (a.unet, links, a.image_size, bs, nw, a.warmup, a.steps, logdir, grid_steps)
                    rows.append(record(f"tutorial nw={nw}", bs, tutorial_loop.run, *args))
                if grid_steps and "raw" in rows[-1]:
                    name = f"tutorial DDPMPipeline, DDPM {a.grid_steps} steps (fp16 on CUDA)"
                    report["grids"].append({"grid": name, "seconds": rows[-1]["raw"]["grid_seconds"]})
            for project_args in a.project_args:
                name = f"project {project_args}".strip()
                rows.append(record(name, bs, run_project, a, project_args, bs, tmp, grids))
                for sampler, n in (("DDPM", a.grid_steps), ("DDIM", a.fast_steps)):
                    seconds = rows[-1].get("raw", {}).get(f"grid_{sampler.lower()}_{n}_seconds") if grids else None
                    if seconds is not None:
                        report["grids"].append({"grid": f"{name}: sample(), {sampler} {n} steps", "seconds": seconds})
            base = next(r for r in rows if r["run"] == report["baseline"])
            for row in rows:
                if "error" not in row and "error" not in base:
                    row["vs_baseline"] = row["images_per_s"] / base["images_per_s"]

    if a.epochs:
        from benchmarks import end_to_end

        try:
            report["end_to_end"] = end_to_end.run(a, images, a.unet, batch_sizes[0], max(workers))
        except RuntimeError as err:  # a side failed: keep the rows measured so far
            report["end_to_end"] = {"error": str(err)}
            print(err, file=sys.stderr)
    report["markdown"] = markdown(report)
    print("\n" + report["markdown"])
    print(f"\n{report['date']}  " + "  ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(f"command: {report['command']}")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")
    if "error" in report.get("end_to_end", {}):
        sys.exit(1)


if __name__ == "__main__":
    # Run as `benchmarks.benchmark`, not `__main__`: the StepTimer that --trainer.callbacks imports by name
    # must be this module's, so that its results land in this module's RUNS.
    from benchmarks.benchmark import main as imported_main

    imported_main()
