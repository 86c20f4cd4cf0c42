"""The end-to-end row of benchmark.py: the shortened tutorial recipe, whole, in the tutorial's Accelerate loop and
in this project, each in a fresh Python process: wall time, and whether both learn the same.

Run through benchmark.py (`--epochs E`; see benchmarks/README.md); this file's own command line is only the
`--child SPEC` entry that each side runs in.

What runs, one after the other, on the same image files, with the same UNet, seed and number of epochs E:

    tutorial nw=8   tutorial_loop.train_loop: the tutorial's train_loop and evaluate as written, with the largest
                    of benchmark.py's --workers, seeded with accelerate's set_seed; one grid (DDPMPipeline,
                    --grid-steps steps, 16 images, generator seeded) and one save_pretrained, at the end.
    project ARGS    `ddpm-lightning fit -c configs/butterflies.yaml` (through cli.main) with E epochs, the seed, one
                    grid (--grid-steps) and one save at the end, then ARGS (each --project-args: they come last and
                    so override anything above, e.g. `-c configs/butterflies-fast.yaml`). Everything else is the
                    config's, the default checkpointing included (the tutorial writes none). Every step's loss is
                    kept on the device by StepLosses (step_losses.py) and read once at the end.

Wall time: from starting the side's process to its last file written (imports, data set-up, training with its
checkpoints, the grid, the save), split as imports / set-up to the first step / training / finish. Before either
side starts, every image file is read once, so both find them in the page cache. Ratio: tutorial wall / project.

Same learning: a step's loss is the MSE over one batch at random timesteps, so it is noisy and the two sides cannot
be compared step for step (they draw their noise differently). Over the last N steps (--last-n, 100) the model
changes slowly next to that noise; the two means are compared with Welch's t-test (scipy.stats.ttest_ind,
equal_var=False): **within noise when the two-sided p > 0.01**. Passing says no difference is visible at this N,
not that the two are equal; the report gives the 99% interval of the difference. Without scipy the means and
standard deviations are reported and the test is left out (the JSON keeps every loss). The lag-1
autocorrelation of each side's losses and their step-for-step correlation are reported to check independence.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "lightning", "diffusers", "accelerate", "datasets", "jsonargparse")
ALPHA = 0.01

# ----------------------------------------------------------------------------------------------------------------
# The child processes: one side each, reporting to a JSON file.


def child(spec_path: str) -> None:
    """Run one side as `spec` says and write its record to spec["result"]."""
    started = time.monotonic()
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(ROOT))
    record: dict = {"started": started}
    if spec["side"] == "tutorial":
        import torch

        from benchmarks import tutorial_loop

        record["imported"] = time.monotonic()
        losses, marks = [], {}
        written = tutorial_loop.train_loop(
            spec["unet"], spec["image_paths"], spec["image_size"], spec["output_dir"], num_epochs=spec["epochs"],
            train_batch_size=spec["batch_size"], num_workers=spec["num_workers"],
            save_image_epochs=spec["epochs"], save_model_epochs=spec["epochs"],
            num_inference_steps=spec["grid_steps"], seed=spec["seed"], seed_training=True, losses=losses, marks=marks,
        )  # fmt: skip
        record["files_written"] = time.monotonic()
        record |= {"losses": losses, "marks": marks, "written": written}
    else:
        import logging

        import torch

        from ddpm_lightning import cli

        from benchmarks import step_losses

        record["imported"] = time.monotonic()
        argv = list(spec["argv"])
        if not torch.cuda.is_available():  # butterflies.yaml's 16-mixed needs a GPU, like the tutorial's fp16
            argv += ["--trainer.precision", "32-true"]
        argv += shlex.split(spec["project_args"])  # last, so they override the above
        record["argv"] = argv

        class Count(logging.Handler):  # SampleGrid and SaveModel say each grid and save in one INFO line
            def __init__(self):
                super().__init__(logging.INFO)
                self.written = {"grids": 0, "saves": 0}

            def emit(self, rec):
                message = rec.getMessage()
                self.written["grids"] += "Saved a grid" in message
                self.written["saves"] += "Saved the model" in message

        counter = Count()
        logging.getLogger("ddpm_lightning.callbacks").addHandler(counter)
        sys.argv = sys.argv[:1]  # else LightningCLI warns that it sees this script's flags beside args=
        cli.main(argv)
        record["files_written"] = time.monotonic()
        if len(step_losses.RUNS) != 1:
            raise RuntimeError("StepLosses did not report: did --project-args replace --trainer.callbacks?")
        record |= step_losses.RUNS[0] | {"written": counter.written}
    if spec.get("val_dir"):  # after the wall time stops: the same measure for both sides, from the saved model
        record["held_out_loss"] = held_out_loss(spec["output_dir"], spec["val_dir"], spec["image_size"])
    cuda = torch.cuda.is_available()
    record["device"] = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    Path(spec["result"]).write_text(json.dumps(record))


def held_out_loss(model_dir: str, val_dir: str, image_size: int) -> float:
    """`val/loss` of the pipeline saved in `model_dir` over the images in `val_dir`: this project's validation loss
    (`DDPMModule.validation_step`: fixed timesteps, noise fixed per image, float32), through `trainer.validate` on
    the model loaded as a fine-tune's start (`model.pretrained`), so a tutorial's folder is measured as a project's."""
    import lightning

    from ddpm_lightning.data import ImageDataModule
    from ddpm_lightning.module import DDPMModule

    model = DDPMModule(pretrained=model_dir, image_size=image_size, stop_on_nan=False)
    data = ImageDataModule(dataset=val_dir, val_dataset=val_dir, image_size=image_size, num_workers=0)
    trainer = lightning.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, precision="32-true"
    )
    [metrics] = trainer.validate(model, datamodule=data, verbose=False)
    return float(metrics["val/loss"])


# ----------------------------------------------------------------------------------------------------------------
# Statistics: Welch's t-test from scipy when it is installed (it is not a dependency of the project).


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    lag1 = statistics.correlation(values[:-1], values[1:]) if n > 2 and len(set(values)) > 1 else None
    return {"n": n, "mean": mean, "sd": statistics.stdev(values) if n > 1 else None, "lag1_autocorrelation": lag1}


def correlation(x: list[float], y: list[float]) -> float | None:
    """Pearson's r of the two runs' last losses, step for step (None under 20 points: mostly noise)."""
    n = min(len(x), len(y))
    if n < 20 or len(set(x[-n:])) < 2 or len(set(y[-n:])) < 2:
        return None
    return statistics.correlation(x[-n:], y[-n:])


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(b) - mean(a), with the within-noise verdict (see the module docstring)."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    out = {"difference": diff, "relative_difference": diff / statistics.fmean(a)}
    if len(a) < 2 or len(b) < 2:
        return out | {"within_noise": None, "why": "fewer than 2 steps on a side: no test"}
    try:
        from scipy import stats
    except ImportError:
        return out | {"within_noise": None, "why": "scipy is not installed: no test"}
    test = stats.ttest_ind(b, a, equal_var=False)
    low, high = test.confidence_interval(1 - ALPHA)
    return out | {"t": float(test.statistic), "df": float(test.df), "p": float(test.pvalue), "alpha": ALPHA,
                  "ci99": [float(low), float(high)], "within_noise": bool(test.pvalue > ALPHA)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The parent: set-up, the sides, the report.


def run_side(name: str, spec: dict, work: Path, log_path: Path) -> dict:
    """One side in its own process; its files are named after its log (`project-0`, not the run's name, which
    holds the user's arguments: `-c configs/x.yaml` has a slash)."""
    spec_path = work / f"{log_path.stem}.spec.json"
    spec["result"] = str(work / f"{log_path.stem}.result.json")
    spec_path.write_text(json.dumps(spec))
    print(f"running {name} (log: {log_path}) ...", flush=True)
    with open(log_path, "w") as log:
        spawned = time.monotonic()
        code = subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        exited = time.monotonic()
    if code != 0:
        tail = log_path.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"{name} failed (exit {code}); the end of {log_path}:\n{tail}")
    r = json.loads(Path(spec["result"]).read_text())
    marks = r["marks"]
    if not spawned <= r["started"] <= r["files_written"] <= exited:
        raise RuntimeError("time.monotonic() is not one clock across processes here: the wall times would be wrong.")
    losses = r["losses"]
    run = {
        "run": name,
        "wall_s": r["files_written"] - spawned,
        "imports_s": r["imported"] - spawned,
        "setup_s": marks["first_step"] - spawned,
        "train_s": marks["last_step"] - marks["first_step"],
        "finish_s": r["files_written"] - marks["last_step"],
        "exit_s": exited - spawned,
        "steps": len(losses),
        "written": r["written"],
        "device": r["device"],
        "peak_mem_gib": r["peak_mem_gib"],
        "log": str(log_path),
        "file_name": log_path.stem,
        "losses": losses,
    }
    if "argv" in r:
        run["argv"] = r["argv"]
    if "held_out_loss" in r:
        run["held_out_loss"] = r["held_out_loss"]
    if r["written"] != {"grids": 1, "saves": 1}:
        raise RuntimeError(f"{name} wrote {r['written']}, not exactly one grid and one save: see {log_path}.")
    from ddpm_lightning.files import MODEL_INDEX, RunFolder  # the tutorial's loop writes the same layout

    grids = RunFolder(spec["output_dir"]).grids()  # epoch grids; data.png is the data
    if len(grids) != 1 or not Path(spec["output_dir"], MODEL_INDEX).is_file():
        raise RuntimeError(
            f"{name}: expected one grid in {spec['output_dir']}/samples and a saved pipeline, found {grids}."
        )
    run["grid"] = str(grids[0])
    return run


def side_by_side(runs: list[dict], path: Path) -> None:
    """The grids in one PNG, left to right, each under its run's name."""
    from PIL import Image, ImageDraw

    grids = [Image.open(r["grid"]).convert("RGB") for r in runs]
    label, gap = 14, 8
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, label + max(g.height for g in grids)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for run, grid in zip(runs, grids):
        canvas.paste(grid, (x, label))
        draw.text((x + 2, 1), run["run"], fill="black")
        x += grid.width + gap
    canvas.save(path)


def markdown(report: dict) -> str:
    st, n = report["settings"], report["settings"]["last_n"]
    lines = [
        f"End to end: {st['epochs']} epochs of {st['images']}, batch {st['batch_size']}, {st['image_size']} px, one "
        f"grid of 16 (DDPM {st['grid_steps']} steps unless the project's args change it) and one save per run, the "
        "project's default checkpointing on.",
        "",
        f"| run | wall s | imports s | setup s | train s | finish s | steps | loss, last {n} steps (mean ± sd) | "
        "held-out val/loss | tutorial ÷ this, wall |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["runs"]:
        s = r["last_n_loss"]
        sd = "—" if s["sd"] is None else f"{s['sd']:.4f}"
        speedup = r.get("project_speedup")
        cells = [r["run"], f"{r['wall_s']:.1f}", f"{r['imports_s']:.1f}", f"{r['setup_s']:.1f}", f"{r['train_s']:.1f}",
                 f"{r['finish_s']:.1f}", r["steps"], f"{s['mean']:.4f} ± {sd} (n={s['n']})",
                 f"{r['held_out_loss']:.4f}" if "held_out_loss" in r else "—",
                 "—" if speedup is None else f"{speedup:.2f}×"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    if len({r["steps"] for r in report["runs"]}) > 1:
        lines.append("- The runs took different numbers of steps: their losses are not comparable step for step.")
    for c in report["comparisons"]:
        if c.get("held_out_ratio") is not None:
            lines.append(
                f"- {c['project']} vs {c['tutorial']}: held-out val/loss {c['held_out_ratio']:.3f}× the tutorial's "
                f"({st['val_images']}); the goal is at most 1.05×."
            )
        w = c["loss_test"]
        if w["within_noise"] is None:
            lines.append(f"- {c['project']} vs {c['tutorial']}: loss difference {w['difference']:+.4f}, {w['why']}.")
            continue
        verdict = "within noise" if w["within_noise"] else "NOT within noise"
        lines.append(
            f"- {c['project']} vs {c['tutorial']}: loss difference {w['difference']:+.4f} "
            f"({w['relative_difference']:+.1%}), 99% CI [{w['ci99'][0]:+.4f}, {w['ci99'][1]:+.4f}], Welch t = "
            f"{w['t']:.2f}, df = {w['df']:.0f}, p = {w['p']:.3f}: **{verdict}** (p > {w['alpha']})."
        )
        if c["step_for_step_r"] is not None and c["step_for_step_r"] > 0.5:
            lines.append(
                f"  The two runs' losses are correlated step for step (r = {c['step_for_step_r']:.2f}): they "
                "drew much the same noise and timesteps, so this test is conservative here."
            )
    return "\n".join(lines)


def epoch_means(losses: list[float], steps_per_epoch: int) -> list[float]:
    chunks = [losses[i : i + steps_per_epoch] for i in range(0, len(losses), steps_per_epoch)]
    return [sum(c) / len(c) for c in chunks if c]


def run(a, images: list[str], unet: dict, batch_size: int, workers: int) -> dict:
    """The tutorial with `workers` loader workers, then the project once per a.project_args; the report (with its
    markdown), grids.png and each side's log in a.out_dir. `a` is benchmark.py's parsed arguments."""
    out = Path(a.out_dir).resolve()
    work = out / "end-to-end-runs"  # emptied first, removed at the end (unless --keep-runs)
    if work.exists():
        shutil.rmtree(work)
    (work / "images").mkdir(parents=True)
    links = []  # the project takes a folder: link exactly these files into one, and give the tutorial the same links
    for i, path in enumerate(images):
        links.append(str(work / "images" / f"{i:05d}{Path(path).suffix}"))
        os.symlink(path, links[-1])
        Path(path).read_bytes()  # into the page cache, for both sides alike

    val_dir, val_note = None, None
    if a.val_images:  # held-out photos, linked like the training ones (the project's loader takes a folder)
        val_dir = work / "val"
        from ddpm_lightning.sources import find_images

        val = find_images(Path(a.val_images).resolve())
        if not val:
            raise RuntimeError(f"No images under --val-images {a.val_images}.")
        val_dir.mkdir()
        for i, path in enumerate(val):
            os.symlink(path, val_dir / f"{i:05d}{Path(path).suffix}")
        val_note = f"{len(val)} held-out images from {a.val_images}"

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "python": platform.python_version(),
        "settings": {"epochs": a.epochs, "images": f"{len(images)} images from {a.images}", "batch_size": batch_size,
                     "image_size": a.image_size, "grid_steps": a.grid_steps, "seed": a.seed, "last_n": a.last_n,
                     "tutorial_workers": workers, "project_args": a.project_args, "unet": unet,
                     "within_noise": f"Welch p > {ALPHA}", "val_images": val_note},
        "runs": [],
    }  # fmt: skip
    common = dict(unet=unet, image_size=a.image_size, epochs=a.epochs, batch_size=batch_size, seed=a.seed,
                  grid_steps=a.grid_steps, val_dir=str(val_dir) if val_dir else None)  # fmt: skip
    tutorial = f"tutorial nw={workers}"
    spec = common | {"side": "tutorial", "image_paths": links, "num_workers": workers,
                     "output_dir": str(work / f"tutorial-nw{workers}")}  # fmt: skip
    report["runs"].append(run_side(tutorial, spec, work, out / f"tutorial-nw{workers}.log"))
    for i, project_args in enumerate(a.project_args):
        name = f"project {project_args}".strip()
        project_dir = work / f"project-{i}"
        argv = [
            "fit", "--config", "configs/butterflies.yaml",
            "--model.unet", json.dumps(unet),  # the tutorial loop's UNet, whatever the config holds
            "--data.dataset", str(work / "images"),
            "--data.image_size", str(a.image_size),
            "--data.train_batch_size", str(batch_size),
            "--seed_everything", str(a.seed),
            "--trainer.max_epochs", str(a.epochs),
            "--trainer.callbacks", json.dumps([{"class_path": "benchmarks.step_losses.StepLosses"}]),
            "--output_dir", str(project_dir),
            # where, not how often: the cadence is the config's
            "--checkpoint.dirpath", str(project_dir / "checkpoints"),
            "--grid.save_image_epochs", str(a.epochs),
            "--grid.num_inference_steps", str(a.grid_steps),
            "--save.save_model_epochs", str(a.epochs),
        ]  # fmt: skip
        spec = common | {"side": "project", "argv": argv, "project_args": project_args, "output_dir": str(project_dir)}
        report["runs"].append(run_side(name, spec, work, out / f"project-{i}.log"))

    report["device"] = report["runs"][0]["device"]
    steps_per_epoch = math.ceil(len(images) / batch_size)
    for r in report["runs"]:
        r["last_n_loss"] = summary(r["losses"][-a.last_n :])
        r["epoch_mean_loss"] = epoch_means(r["losses"], steps_per_epoch)
    base, report["comparisons"] = report["runs"][0], []
    for r in report["runs"][1:]:
        r["project_speedup"] = base["wall_s"] / r["wall_s"]
        report["comparisons"].append({
            "tutorial": base["run"], "project": r["run"], "project_speedup": r["project_speedup"],
            "loss_test": welch(base["losses"][-a.last_n :], r["losses"][-a.last_n :]),
            "step_for_step_r": correlation(base["losses"][-a.last_n :], r["losses"][-a.last_n :]),
            "held_out_ratio": r["held_out_loss"] / base["held_out_loss"] if "held_out_loss" in r else None,
        })  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    side_by_side(report["runs"], out / "grids.png")
    report["grids_png"] = str(out / "grids.png")
    if not a.keep_runs:
        for r in report["runs"]:
            r["grid"] = str(shutil.copy(r["grid"], out / f"grid-{r['file_name']}.png"))
        shutil.rmtree(work)
    report["markdown"] = markdown(report)
    (out / "end_to_end.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":  # each side's process: `end_to_end.py --child SPEC`
    if sys.argv[1:2] != ["--child"] or len(sys.argv) != 3:
        sys.exit("This is the child entry of benchmark.py's end-to-end row: run benchmarks/benchmark.py --epochs E.")
    child(sys.argv[2])
