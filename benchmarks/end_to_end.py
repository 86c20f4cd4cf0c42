"""The shortened tutorial recipe end to end, in the tutorial's Accelerate loop and in this project: time and learning.

Wall time of each, and whether both learn the same, from one invocation.

On a GPU (from the repository root):

    python benchmarks/end_to_end.py --out-dir benchmarks/end-to-end-h100
    python benchmarks/end_to_end.py --workers 0,8 --project-args "--config configs/butterflies-fast.yaml"

CPU smoke test (a tiny UNet at 32 px, 2 epochs on 32 images; a minute or two on 2 cores; its numbers mean nothing):

    python benchmarks/end_to_end.py --tiny --max-images 32

What runs, each side in a fresh Python process (one after the other, tutorial first), on the same image files, with
the same UNet, the same seed (0) and the same number of epochs E (default 10):

    tutorial nw=8   tutorial_loop.train_loop: the tutorial's train_loop and evaluate as written (DataLoader with
                    num_workers=8; `--workers 0,8` adds the tutorial's own num_workers=0), seeded with
                    accelerate's set_seed, save_image_epochs = save_model_epochs = E: one grid (DDPMPipeline,
                    1000 steps, 16 images, generator seeded 0) and one save_pretrained, at the end.
    project         ddpm_lightning.cli.main(["fit", "--config", "configs/butterflies.yaml", ...]) with
                    --trainer.max_epochs E, --seed_everything 0, --grid.save_image_epochs E and
                    --save.save_model_epochs E (one grid, DDPM 1000 steps, 16 images, seed 0, and one save, at
                    the end), then --project-args, which come last and so override anything above. Everything
                    else is the config's: the progress bar, the data cache, and a checkpoint (last.ckpt) at
                    every epoch end, which the tutorial does not write ("--checkpoint.every_n_epochs 0" in
                    --project-args turns it off). Every step's loss is kept on the device by the StepLosses
                    callback (step_losses.py) and read once at the end, so the project is not made to wait for
                    the GPU every step.

Both grids start from the same noise (a CPU generator seeded 0, as DDPMPipeline and the project's SampleGrid both
draw it), so they can be compared image by image; they are written side by side into <out-dir>/grids.png.

Wall time: from starting the side's Python process to the end of its last file write (training, the grid, the save
and, for the project, the checkpoints), so it includes the interpreter and library imports (reported separately
as imports_s), data set-up (the tutorial's dataset and loader, the project's decoding cache) and the first steps'
warm-up. setup_s ends with the first training step, train_s runs from there to the end of the last one, finish_s
from there to the last file. Before either side starts, every image file is read once, so both find them in the
page cache. Ratio: project_speedup = tutorial wall time / project wall time.

Same learning, and what "within noise" means here. A step's loss is the MSE of the predicted noise over one batch
at timesteps drawn uniformly from 0..999, and the loss at small timesteps is many times that at large ones, so
which timesteps a batch happened to draw moves the step's loss far more than the model's progress does between
nearby steps. The two sides do not in general draw the same noise and timesteps (they consume their random streams
differently: on a GPU the tutorial flips images with the CPU's generator and the project with the GPU's), so they
can only be compared statistically. Over the last N steps (N = 100, or all steps if fewer) the model changes
slowly next to that noise, so each side's losses are close to independent draws (the lag-1 autocorrelation is
reported to check this), and a downward trend that both sides share moves both means alike. The two means are
compared with Welch's t-test (unequal variances, as fp16 and bf16 runs may have; with N = 100 the mean is close to
normal even though per-step losses are skewed):

    within noise  <=>  two-sided Welch p > 0.01

that is, the difference of the means is less than t(0.995, df) standard errors of the difference (about 2.6): its
99% confidence interval holds 0. Two runs of one recipe, independent step for step, fail this 1 time in 100.
Passing it does not prove the two equal: it says that no difference is visible at this N, and the report states
the smallest difference that would have been caught (the "resolution", t(0.995, df) standard errors of the
difference, also as a fraction of the tutorial's mean).
With N = 100 and a per-step standard deviation s on both sides it is about 2.6 * sqrt(2 / 100) * s = 0.37 s. The
test does not cover the difference between two training runs' final weights (another seed gives other weights);
on one pair of runs that is part of what it compares, so a failure says "look closer" (run other seeds, compare
the curves: the JSON holds every step's loss and each epoch's mean), not "the project learns worse".
Where the streams do line up (on a CPU with num_workers=0 they nearly do, step for step), the two sides' losses
are correlated and the test, which assumes independent samples, is conservative: the correlation of the two runs'
last-N losses, step for step, is reported (from 20 steps on), with a note when it exceeds 0.5.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# argparse defaults, full run / --tiny; None means "all images". The UNets are tutorial_loop's.
DEFAULTS = dict(epochs=(10, 2), image_size=(128, 32), max_images=(None, 32), grid_steps=(1000, 5))
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
        from benchmarks import tutorial_loop

        import torch

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

        from benchmarks import step_losses
        from ddpm_lightning import cli

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
    cuda = torch.cuda.is_available()
    record["device"] = torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    Path(spec["result"]).write_text(json.dumps(record))


# ----------------------------------------------------------------------------------------------------------------
# Statistics, without scipy: Student's t distribution through the regularized incomplete beta function.


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(p: float, df: float) -> float:
    """The t with P(|T| >= t) = p (bisection)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return (lo + hi) / 2


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    ss = sum((v - mean) ** 2 for v in values)
    lag1 = sum((a - mean) * (b - mean) for a, b in zip(values, values[1:])) / ss if n > 2 and ss > 0 else None
    return {"n": n, "mean": mean, "sd": math.sqrt(var) if n > 1 else None, "lag1_autocorrelation": lag1}


def correlation(x: list[float], y: list[float]) -> float | None:
    """Pearson's r of two equally long series (None when undefined, or with under 20 points: mostly noise)."""
    n = min(len(x), len(y))
    if n < 20:
        return None
    x, y = x[-n:], y[-n:]
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def welch(a: dict, b: dict) -> dict:
    """Welch's t-test of mean(b) - mean(a), with the within-noise verdict (see the module docstring)."""
    diff = b["mean"] - a["mean"]
    out = {"difference": diff, "relative_difference": diff / a["mean"] if a["mean"] else None}
    if a["n"] < 2 or b["n"] < 2:
        return out | {"within_noise": None, "why": "fewer than 2 steps on a side: no test"}
    va, vb = a["sd"] ** 2 / a["n"], b["sd"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return out | {"within_noise": diff == 0, "why": "no variance"}
    df = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    t = diff / se
    p = t_two_sided_p(t, df)
    resolution = t_critical(ALPHA, df) * se
    return out | {
        "t": t, "df": df, "p": p, "se": se, "alpha": ALPHA,
        "ci99": [diff - resolution, diff + resolution],
        "resolution": resolution, "relative_resolution": resolution / a["mean"] if a["mean"] else None,
        "within_noise": p > ALPHA,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The parent: set-up, the two sides, the report.


def find_images(folder: Path) -> list[str]:
    """ddpm_lightning.data.find_images, without importing it here (the same files the project would find)."""
    from PIL import Image

    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def run_side(name: str, spec: dict, work: Path, log_path: Path) -> dict:
    spec_path = work / f"{name}.spec.json"
    spec["result"] = str(work / f"{name}.result.json")
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
        sys.exit(f"{name} failed (exit {code}); the end of {log_path}:\n{tail}")
    r = json.loads(Path(spec["result"]).read_text())
    marks = r["marks"]
    if not spawned <= r["started"] <= r["files_written"] <= exited:
        sys.exit("time.monotonic() is not one clock across processes here: the wall times would be wrong.")
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
        "losses": losses,
    }
    if "argv" in r:
        run["argv"] = r["argv"]
    if r["written"] != {"grids": 1, "saves": 1}:
        sys.exit(f"{name} wrote {r['written']}, not exactly one grid and one save: see {log_path}.")
    grids = sorted(Path(spec["output_dir"], "samples").glob("*.png"))
    if len(grids) != 1 or not Path(spec["output_dir"], "model_index.json").is_file():
        sys.exit(f"{name}: expected one grid in {spec['output_dir']}/samples and a saved pipeline, found {grids}.")
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
    n = report["settings"]["last_n"]
    lines = [
        f"Device: {report['device']}; {report['settings']['epochs']} epochs of {report['settings']['images']}, "
        f"batch {report['settings']['batch_size']}, {report['settings']['image_size']} px; one grid of 16 with DDPM "
        f"{report['settings']['grid_steps']} steps and one save per run (the project's grid: unless --project-args "
        f"changes it); project args: `{report['settings']['project_args'] or '(none)'}`.",
        "",
        f"| run | wall s | imports s | setup s | train s | finish s | steps | loss, last {n} steps (mean ± sd) | "
        "tutorial ÷ project wall |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["runs"]:
        s = r["last_n_loss"]
        sd = "—" if s["sd"] is None else f"{s['sd']:.4f}"
        speedup = r.get("project_speedup")
        cells = [r["run"], f"{r['wall_s']:.1f}", f"{r['imports_s']:.1f}", f"{r['setup_s']:.1f}", f"{r['train_s']:.1f}",
                 f"{r['finish_s']:.1f}", r["steps"], f"{s['mean']:.4f} ± {sd} (n={s['n']})",
                 "—" if speedup is None else f"{speedup:.2f}×"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    if len({r["steps"] for r in report["runs"]}) > 1:
        lines.append("- The runs took different numbers of steps: their losses are not comparable step for step.")
    for c in report["comparisons"]:
        w = c["loss_test"]
        if w["within_noise"] is None or "p" not in w:
            lines.append(f"- {c['project']} vs {c['tutorial']}: loss difference {w['difference']:+.4f}, {w['why']}.")
            continue
        verdict = "within noise" if w["within_noise"] else "NOT within noise"
        lines.append(
            f"- {c['project']} vs {c['tutorial']}: wall time ratio {c['wall_ratio']:.3f} (project ÷ tutorial); "
            f"loss difference {w['difference']:+.4f} ({w['relative_difference']:+.1%}), 99% CI "
            f"[{w['ci99'][0]:+.4f}, {w['ci99'][1]:+.4f}], Welch t = {w['t']:.2f}, df = {w['df']:.0f}, "
            f"p = {w['p']:.3f}: **{verdict}** (p > {w['alpha']}; resolution ±{w['resolution']:.4f}, "
            f"{w['relative_resolution']:.1%} of the tutorial's mean)."
        )
        if c["step_for_step_r"] is not None and c["step_for_step_r"] > 0.5:
            lines.append(f"  The two runs' losses are correlated step for step (r = {c['step_for_step_r']:.2f}): they "
                         "drew much the same noise and timesteps, so this test is conservative here.")
    return "\n".join(lines)


def epoch_means(losses: list[float], steps_per_epoch: int) -> list[float]:
    chunks = [losses[i : i + steps_per_epoch] for i in range(0, len(losses), steps_per_epoch)]
    return [sum(c) / len(c) for c in chunks if c]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default="../shared/data/heliconius/train", help="folder of training images (both sides)")
    p.add_argument("--max-images", type=int, help="use only the first N images (default: all; --tiny: 32)")
    p.add_argument("--epochs", type=int, help="epochs of each run (default 10, --tiny: 2)")
    p.add_argument("--image-size", type=int, help="default 128 (--tiny: 32)")
    p.add_argument("--batch-size", type=int, default=16, help="the tutorial's 16")
    p.add_argument("--grid-steps", type=int, help="DDPM steps of the one grid (default 1000, --tiny: 5)")
    p.add_argument("--workers", default="8", help="DataLoader num_workers of the tutorial runs, e.g. 0,8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--last-n", type=int, default=100, help="steps at the end whose losses are compared")
    p.add_argument("--project-args", default="",
                   help='project CLI overrides, applied last, e.g. "--config configs/butterflies-fast.yaml"')
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny UNet, 32 px, 2 epochs, 5-step grids")
    p.add_argument("--out-dir", default="ddpm-end-to-end", help="where grids.png, end_to_end.json and the logs go")
    p.add_argument("--keep-runs", action="store_true", help="keep the runs' folders (models, checkpoints, logs) in "
                   "out-dir/end-to-end-runs")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child)
        return
    for key, (full, tiny) in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, tiny if a.tiny else full)
    sys.path.insert(0, str(ROOT))
    from benchmarks.tutorial_loop import TINY_UNET, TUTORIAL_UNET  # (this process trains nothing)

    unet = TINY_UNET if a.tiny else TUTORIAL_UNET

    images = find_images(Path(a.images).resolve())[: a.max_images]
    if not images:
        sys.exit(f"No images under {a.images}: give --images DIR.")
    out = Path(a.out_dir).resolve()
    work = out / "end-to-end-runs"  # this script's own folder: emptied first, removed at the end (unless --keep-runs)
    if work.exists():
        shutil.rmtree(work)
    (work / "images").mkdir(parents=True)
    links = []  # the project takes a folder: link exactly these files into one, and give the tutorial the same links
    for i, path in enumerate(images):
        links.append(str(work / "images" / f"{i:05d}{Path(path).suffix}"))
        os.symlink(path, links[-1])
        Path(path).read_bytes()  # into the page cache, for both sides alike

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
        "command": shlex.join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(a).items() if k != "child"}
        | {"images": f"{len(images)} images from {a.images}", "unet": unet, "within_noise": f"Welch p > {ALPHA}"},
        "runs": [],
    }
    common = dict(unet=unet, image_size=a.image_size, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed,
                  grid_steps=a.grid_steps)  # fmt: skip
    for nw in (int(w) for w in a.workers.split(",")):
        name = f"tutorial nw={nw}"
        spec = common | {"side": "tutorial", "image_paths": links, "num_workers": nw,
                         "output_dir": str(work / f"tutorial-nw{nw}")}  # fmt: skip
        report["runs"].append(run_side(name, spec, work, out / f"tutorial-nw{nw}.log"))
    project_dir = work / "project"
    argv = [
        "fit", "--config", "configs/butterflies.yaml",
        "--model.unet", json.dumps(unet),  # the tutorial loop's UNet, whatever the config holds
        "--data.dataset", str(work / "images"),
        "--data.image_size", str(a.image_size),
        "--data.train_batch_size", str(a.batch_size),
        "--seed_everything", str(a.seed),
        "--trainer.max_epochs", str(a.epochs),
        "--trainer.callbacks", json.dumps([{"class_path": "benchmarks.step_losses.StepLosses"}]),
        "--output_dir", str(project_dir),
        "--checkpoint.dirpath", str(project_dir / "checkpoints"),
        "--grid.save_image_epochs", str(a.epochs),
        "--grid.num_inference_steps", str(a.grid_steps),
        "--save.save_model_epochs", str(a.epochs),
    ]  # fmt: skip
    spec = common | {"side": "project", "argv": argv, "project_args": a.project_args, "output_dir": str(project_dir)}
    report["runs"].append(run_side("project", spec, work, out / "project.log"))

    report["device"] = report["runs"][0]["device"]
    steps_per_epoch = math.ceil(len(images) / a.batch_size)
    for r in report["runs"]:
        r["last_n_loss"] = summary(r["losses"][-a.last_n :])
        r["epoch_mean_loss"] = epoch_means(r["losses"], steps_per_epoch)
    project = report["runs"][-1]
    report["comparisons"] = []
    for r in report["runs"][:-1]:
        r["project_speedup"] = r["wall_s"] / project["wall_s"]
        report["comparisons"].append({
            "tutorial": r["run"], "project": "project", "wall_ratio": project["wall_s"] / r["wall_s"],
            "project_speedup": r["project_speedup"], "loss_test": welch(r["last_n_loss"], project["last_n_loss"]),
            "step_for_step_r": correlation(r["losses"][-a.last_n :], project["losses"][-a.last_n :]),
        })  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    side_by_side(report["runs"], out / "grids.png")
    report["grids_png"] = str(out / "grids.png")
    if not a.keep_runs:
        for r in report["runs"]:
            r["grid"] = str(shutil.copy(r["grid"], out / f"grid-{r['run'].replace(' ', '-').replace('=', '')}.png"))
        shutil.rmtree(work)
    report["markdown"] = markdown(report)
    (out / "end_to_end.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + report["markdown"])
    print(f"\n{report['date']}  python {report['python']}  " + "  ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"command: {report['command']}")
    print(f"wrote {out / 'grids.png'} and {out / 'end_to_end.json'}")


if __name__ == "__main__":
    main()
