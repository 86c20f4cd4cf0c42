"""Does every shipped config train on this machine? One pass/fail line per step, with seconds and peak memory.

On a GPU machine, from the repository root (under 5 minutes is the aim; see benchmarks/README.md for a machine
whose Python lacks some of the project's packages):

    python benchmarks/gpu_smoke.py                      # the shipped photos, as files in data/heliconius-photos
    python benchmarks/gpu_smoke.py --images DIR         # any folder of images

On a CPU (the tiny UNet at 16 px, a few steps, `--trainer.accelerator cpu`; what tests/test_benchmarks.py runs):

    python benchmarks/gpu_smoke.py --cpu

For each YAML in configs/ (a file `<base>-<name>.yaml` beside `<base>.yaml` is an overlay on it, given after it,
as `-c configs/butterflies.yaml -c configs/butterflies-fast.yaml`), everything through the real command line,
`python -m ddpm_lightning`, each in its own process:

    fit      trains with the config as shipped (precision, optimizer, clipping, compile, data cache, checkpoint
             cadence), only sizes overridden: the tutorial's UNet (configs/butterflies.yaml's) at 128 px (--cpu:
             configs/tiny.yaml's at 16 px, speed.compile and compile_optimizer off), a few dozen steps over a few
             epochs with a short last batch, a grid of few sampling steps. A real SIGTERM is sent once the run has
             passed --signal-step; the run must exit 0 with last.ckpt saved at the step it stopped.
    resume   `--ckpt_path last` continues to --steps, then draws the end-of-run grid and saves the diffusers
             folder (model_index.json); last.ckpt must then hold the final step.
    sample   `ddpm-lightning sample last.ckpt` draws 4 images (DDIM, a few steps) and their grid.png.
    export   `ddpm-lightning export last.ckpt FOLDER` writes a diffusers folder with its model card.

Peak memory is the device's used memory sampled with nvidia-smi every 0.2 s, minus what was in use before the
step (on CUDA); the process's maximum resident set size (os.wait4) everywhere. Exits 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


class StepFile(Callback):
    """Writes the global step to a file after every training step, so that the smoke check knows when to signal."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.path).write_text(str(trainer.global_step))


def shipped_configs() -> dict[str, list[Path]]:
    """{name: the -c files}, for every YAML in configs/; `<base>-<x>.yaml` goes on top of `<base>.yaml`."""
    runs = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        base = CONFIGS / (path.stem.rsplit("-", 1)[0] + ".yaml")
        runs[path.stem] = [base, path] if "-" in path.stem and base.is_file() else [path]
    return runs


def gpu_used_mib() -> float | None:
    """The device's used memory in MiB (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return float(out.stdout.split()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class Step:
    """One child process: its time, its peak memory, its log; a PASS/FAIL line."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log: Path, gpu: bool, timeout: float):
        self.name, self.argv, self.cwd, self.log, self.gpu, self.timeout = name, argv, cwd, log, gpu, timeout
        self.error: str | None = None
        self.note = ""

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        if not self.gpu:  # on a shared CPU, torch's spinning thread pools make every step several times slower
            env.setdefault("OMP_NUM_THREADS", "1")
        self.gpu_before = gpu_used_mib() if self.gpu else None
        self.gpu_peak, self.rss_gib, self.returncode = self.gpu_before, None, None
        self.started = time.perf_counter()
        self.logfile = open(self.log, "w")
        self.logfile.write(" ".join(self.argv) + "\n\n")
        self.logfile.flush()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=self.logfile, stderr=subprocess.STDOUT)
        if self.gpu_before is not None:
            threading.Thread(target=self._poll_gpu, daemon=True).start()

    def _poll_gpu(self) -> None:
        while self.returncode is None:
            used = gpu_used_mib()
            if used is not None:
                self.gpu_peak = max(self.gpu_peak, used)
            time.sleep(0.2)

    def _reap(self, block: bool) -> bool:
        """Collect the process with os.wait4, which gives its own resource usage (max RSS). True once it ended."""
        pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.seconds = time.perf_counter() - self.started
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rss_gib = usage.ru_maxrss / 2**20  # KiB on Linux
        self.logfile.close()
        if self.returncode and not self.error:
            self.error = f"exit status {self.returncode}"
        return True

    def running(self) -> bool:
        """Whether it is still running (killed once past its time limit)."""
        if self.returncode is not None:
            return False
        if time.perf_counter() - self.started > self.timeout:
            self.error = f"still running after {self.timeout:.0f} s: killed"
            self.proc.kill()
            return not self._reap(block=True)
        return not self._reap(block=False)

    def wait(self) -> None:
        while self.running():
            time.sleep(0.05)

    def check(self, ok: bool, why: str) -> None:
        if not ok and self.error is None:
            self.error = why

    def line(self, config: str) -> str:
        memory = f"max RSS {self.rss_gib:.2f} GiB"
        if self.gpu_before is not None:
            memory = f"GPU peak {(self.gpu_peak - self.gpu_before) / 1024:.2f} GiB (nvidia-smi), " + memory
        verdict = "PASS" if self.error is None else "FAIL"
        text = f"{verdict}  {config:<18} {self.name:<8} {self.seconds:7.1f} s  {memory}"
        text += f"  {self.note}" if self.note else ""
        return text + (f"  ({self.error}; log: {self.log})" if self.error else "")


def checkpoint_step(folder: Path) -> int | None:
    """global_step of the last*.ckpt in folder (the newest if several), None if there is none."""
    import torch

    found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    return torch.load(found[-1], map_location="cpu", weights_only=False, mmap=True)["global_step"]


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def smoke(name: str, configs: list[Path], a, work: Path, gpu: bool) -> list[Step]:
    """The four steps for one config; a failed step skips the rest of this config."""
    run = work / name
    run.mkdir(parents=True)
    ckpts, out, step_file = run / "checkpoints", run / "model", run / "step.txt"
    size_config = CONFIGS / ("tiny.yaml" if a.cpu else "butterflies.yaml")
    unet = yaml.safe_load(size_config.read_text())["model"]["unet"]
    cli = [sys.executable, "-m", "ddpm_lightning"]
    fit = [
        *cli, "fit", *[arg for c in configs for arg in ("-c", str(c))],
        # sizes only: the data, the UNet, the image size, the number of steps and the grid's
        "--data.dataset", str(a.images_dir),
        "--data.image_size", str(a.image_size),
        "--model.unet", json.dumps(unet),
        "--trainer.max_epochs", "-1",
        "--trainer.max_steps", str(a.steps),
        "--grid.num_inference_steps", str(a.grid_steps),
        "--output_dir", str(out),
        "--checkpoint.dirpath", str(ckpts),
        "--trainer.callbacks", json.dumps([{"class_path": "benchmarks.gpu_smoke.StepFile",
                                            "init_args": {"path": str(step_file)}}]),
    ]  # fmt: skip
    data = {k: v for c in configs for k, v in (yaml.safe_load(c.read_text()).get("data") or {}).items()}
    if data.get("val_dataset"):  # held-out images as the config has them (it ends with an FID): the same images
        fit += ["--data.val_dataset", str(a.images_dir), "--data.val_split", "train"]
        if a.cpu:
            fit += ["--quality.num_samples", "4", "--quality.num_inference_steps", str(a.grid_steps)]
    if a.cpu:
        # torch.compile of even the tiny UNet takes minutes on a small CPU; tests/ compile the configs on CPU
        fit += ["--trainer.accelerator", "cpu", "--data.train_batch_size", str(a.batch_size),
                "--grid.eval_batch_size", "4", "--speed.compile", "false",
                "--speed.compile_optimizer", "false"]  # fmt: skip
    timeout = a.timeout
    steps: list[Step] = []

    def make(step: str, argv: list[str]) -> Step:
        steps.append(Step(step, argv, run, run / f"{step}.log", gpu, timeout))
        return steps[-1]

    # 1. fit, stopped by a real SIGTERM once it is past --signal-step
    s = make("fit", fit)
    s.start()
    signalled = None
    while s.running():
        done = step_file.read_text().strip() if step_file.is_file() else ""
        if done.isdigit() and int(done) >= a.signal_step:
            s.proc.send_signal(signal.SIGTERM)
            signalled = int(done)
            break
        time.sleep(0.02)
    s.wait()
    stopped = checkpoint_step(ckpts)
    s.note = f"SIGTERM after step {signalled}, last.ckpt at step {stopped}" if signalled else ""
    s.check(signalled is not None, f"ended before step {a.signal_step}, no signal sent")
    s.check(
        stopped is not None and signalled is not None and signalled <= stopped < a.steps,
        f"last.ckpt is at step {stopped}: not saved where the signal stopped the run",
    )
    if s.error:
        return steps

    # 2. resume to the end: the end-of-run grid and the diffusers folder
    s = make("resume", [*fit, "--ckpt_path", "last"])
    s.start()
    s.wait()
    final, grids = checkpoint_step(ckpts), sorted((out / "samples").glob("*.png"))
    s.note = f"to step {final}, {len(grids)} grid(s)"
    s.check(final == a.steps, f"last.ckpt is at step {final}, not {a.steps}")
    s.check(bool(grids), f"no grid in {out / 'samples'}")
    s.check((out / "model_index.json").is_file(), f"no model_index.json in {out}")
    s.check("Restoring states from the checkpoint path" in log_tail(s.log, 10**7), "it did not restore last.ckpt")
    if s.error:
        return steps

    last = max(ckpts.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    # 3. sample from the checkpoint
    s = make("sample", [*cli, "sample", str(last), "--num_images", "4", "--batch_size", "4", "--sampler", "ddim",
                        "--num_inference_steps", str(a.grid_steps), "--output_dir", str(run / "samples")])  # fmt: skip
    s.start()
    s.wait()
    s.check(
        len(list((run / "samples").glob("0*.png"))) == 4 and (run / "samples" / "grid.png").is_file(),
        f"not 4 images and a grid.png in {run / 'samples'}",
    )
    # 4. export it as a diffusers folder
    s = make("export", [*cli, "export", str(last), str(run / "export"), "--samples", str(grids[-1])])
    s.start()
    s.wait()
    s.check(
        all((run / "export" / f).exists() for f in ("model_index.json", "unet", "scheduler", "README.md")),
        f"{run / 'export'} lacks model_index.json, unet/, scheduler/ or README.md",
    )
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--images",
        default=str(ROOT / "data" / "heliconius-photos"),
        help="folder of training images (default: data/heliconius-photos, the shipped photos as files: "
        "benchmarks/README.md)",
    )
    p.add_argument("--cpu", action="store_true", help="on the CPU: tiny UNet, 16 px, batch 4, few steps")
    p.add_argument("--max-images", type=int, help="use the first N images (default 200; --cpu: 10)")
    p.add_argument("--steps", type=int, help="steps of each run (default 40; --cpu: 10)")
    p.add_argument("--signal-step", type=int, help="SIGTERM once past this step (default 15; --cpu: 4)")
    p.add_argument("--configs", help="comma-separated config names to run (default: all in configs/)")
    p.add_argument("--work-dir", help="keep every run's folders and logs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per step")
    a = p.parse_args(argv)
    defaults = dict(max_images=(200, 10), steps=(40, 10), signal_step=(15, 4))
    for key, (full, cpu) in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, cpu if a.cpu else full)
    # 200 images in batches of 16 (--cpu: 10 in 4s): a short last batch every epoch
    a.image_size, a.batch_size, a.grid_steps = (16, 4, 2) if a.cpu else (128, None, 20)

    import torch

    from ddpm_lightning.sources import find_images

    gpu = not a.cpu and torch.cuda.is_available()
    if not a.cpu and not gpu:
        print("No CUDA device: run with --cpu for the CPU check.", file=sys.stderr)
        return 2
    images = find_images(Path(a.images).resolve())[: a.max_images]
    if not images:
        print(f"No images under {a.images}: give --images DIR.", file=sys.stderr)
        return 2
    runs = shipped_configs()
    if a.configs:
        runs = {k: v for k, v in runs.items() if k in a.configs.split(",")}
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(
        f"gpu_smoke on {device}: {len(images)} images from {a.images}, {a.image_size} px, {a.steps} steps, "
        f"configs {', '.join(runs)}"
        + (" (--cpu: tiny UNet, speed.compile and compile_optimizer false)" if a.cpu else ""),
        flush=True,
    )

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="gpu-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    a.images_dir = work / "images"
    shutil.rmtree(a.images_dir, ignore_errors=True)
    a.images_dir.mkdir()
    for i, path in enumerate(images):
        os.symlink(path, a.images_dir / f"{i:05d}{Path(path).suffix}")
    failed, started = 0, time.perf_counter()
    for name, configs in runs.items():
        shutil.rmtree(work / name, ignore_errors=True)
        steps = smoke(name, configs, a, work, gpu)
        for s in steps:
            print(s.line(name), flush=True)
            if s.error:
                failed += 1
                print("    " + log_tail(s.log).replace("\n", "\n    "), flush=True)
        if len(steps) < 4:
            print(f"SKIP  {name:<18} the steps after {steps[-1].name}", flush=True)
    print(f"{'FAIL' if failed else 'PASS'}  all: {failed} failed step(s), {time.perf_counter() - started:.0f} s",
          flush=True)  # fmt: skip
    if not a.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
