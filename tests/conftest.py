"""What the tests share: tiny image folders made on the fly, the tests' tiny UNets, `fit_args` for running
`ddpm-lightning fit` through `main([...])` and `run_cli` for running it in a child process, tiny runs trained once
per test file (`trained`, `straight_run`), checkpoint and TensorBoard readers, a counter of host reads, and
callbacks passed by class path. A helper that only one test file uses lives in that file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Under pytest-xdist (`-n 2`) each worker and the processes it starts get one thread, as mutation_check.py's jobs
# do: two workers at torch's default two threads each would oversubscribe the two cores (OpenMP threads then spin
# waiting for a core). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

# huggingface_hub and datasets read these once, when first imported (the test modules import them as they are
# collected, after this file): set before that, or every in-process Hub lookup retries the network for 23 s.
# The _offline fixture sets them again for each test, and its child processes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# The sample data set shipped with the project (tools/make_sample_data.py): 1000 + 200 Heliconius photos at 64 px
HELICONIUS = REPO / "data" / "heliconius"

# The tests' UNets. Their own, not configs/tiny.yaml's: that is a user config, tuned for the quality of its grid,
# and retuning it must not slow down or change the tests.
TINY_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
# Fewer kernels than TINY_UNET for the tests that compile (inductor's CPU compile dominates their time).
MICRO_UNET = {
    "layers_per_block": 1,
    "block_out_channels": [16],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"],
    "add_attention": False,
}

# The data and grid of a run in seconds on 2 CPU cores: 16 px, batch 4, loaded in this process, 4-image grids of
# 2 sampling steps.
TINY_DATA_AND_GRID = [
    "--data.image_size",
    "16",
    "--data.train_batch_size",
    "4",
    "--data.num_workers",
    "0",
    "--grid.eval_batch_size",
    "4",
    "--grid.num_inference_steps",
    "2",
]
# CLI overrides for a run in seconds on 2 CPU cores: TINY_UNET with TINY_DATA_AND_GRID, the tutorial's objective
# (epsilon, uniform weighting) and no validation, whatever configs/tiny.yaml ships (the rest as it sets it).
TINY_RUN_ARGS = [
    "--model.unet",
    json.dumps(TINY_UNET),
    *TINY_DATA_AND_GRID,
    "--model.prediction_type",
    "epsilon",
    "--model.loss_weighting",
    "uniform",
    "--data.val_dataset",  # no validation unless a test asks for it
    "null",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--quality.num_samples",  # no FID/KID at a run's end: the tests that measure them ask for samples
    "0",
    "--trainer.check_val_every_n_epoch",  # Lightning's validation cadence, where tiny.yaml validates at its end
    "1",
    "--trainer.num_sanity_val_steps",
    "2",
]
# A grid and a model folder only at the end of the run (each cadence is longer than any test's run).
NO_SAVES = ["--grid.save_image_epochs", "1000", "--save.save_model_epochs", "1000"]
# EMA on, at a learning rate whose first steps move the weights far enough that their average differs from them.
EMA_AT_A_HIGH_LR = ["--model.use_ema", "true", "--model.learning_rate", "0.01", "--model.lr_warmup_steps", "1"]


def max_steps(n: int) -> list[str]:
    """The arguments of a run of `n` optimizer steps, however many epochs that takes."""
    return ["--trainer.max_steps", str(n), "--trainer.max_epochs", "-1"]


# One optimizer step, no grid or model folder before the end: for what the first batch shows.
ONE_STEP = [*max_steps(1), *NO_SAVES]

# Lightning turns `precision: 16-mixed` into bf16-mixed on a CPU, so the fp16 case names the GPU's plugin itself:
# fp16 autocast and a GradScaler, on the CPU.
FP16_WITH_GRADSCALER = [
    "--trainer.precision",
    "null",
    "--trainer.plugins",
    '{"class_path": "lightning.pytorch.plugins.precision.MixedPrecision", '
    '"init_args": {"precision": "16-mixed", "device": "cpu"}}',
]
PRECISIONS = {
    "16-mixed": FP16_WITH_GRADSCALER,
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "32-true": ["--trainer.precision", "32-true"],
}
# The GPU default (fused AdamW) and the fast config's compiled clip-and-update.
OPTIMIZERS = {"fused": ["--speed.fused_adamw", "true"], "compiled": ["--speed.compile_optimizer", "true"]}


@pytest.fixture(scope="session", autouse=True)
def _no_home_cache(tmp_path_factory):
    """The decoded-image cache (shared_cache.default_dir) of the module and session fixtures' runs: not the user's.
    Each test then has its own (_offline)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test reaches the Hub or the user's caches or token."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))  # the decoded images' cache, this test's own
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # One inductor cache for every test, kept between sessions: set, so no run moves it (compile_cache.py would,
    # into the test's folder, where each compiling test would compile cold).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(default_cache_dir(), "ddpm-lightning-tests"))
    monkeypatch.chdir(tmp_path)  # ./checkpoints and ./ddpm-* land in the test's folder


@pytest.fixture(scope="session")
def heliconius_photos(tmp_path_factory) -> Path:
    """The shipped data set's 1000 training photos as a folder of JPEG files under their own names (many start
    with test_ or val_), for what takes an image folder: the benchmarks and the image-folder loader."""
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("heliconius")
    # read with pyarrow, not datasets: a session fixture runs before _offline, so datasets would cache in ~/.cache
    for image in pq.read_table(HELICONIUS / "train-00000-of-00001.parquet").column("image").to_pylist():
        (folder / image["path"]).write_bytes(image["bytes"])
    return folder


def write_image(path: Path, size=(20, 24), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return path


def write_twelve(folder: Path) -> Path:
    """12 images in `folder`: 3 steps an epoch at batch 4."""
    for i in range(12):
        write_image(folder / f"{i}.png", seed=i)
    return folder


@pytest.fixture
def twelve(tmp_path) -> Path:
    """12 images: 3 steps an epoch at batch 4."""
    return write_twelve(tmp_path / "twelve")


def fit_offline(root: Path, images: str, out: str, *args: str) -> None:
    """`fit` of `args` on 12 images written to root/<images>, into root/<out>, run in `root` with the Hub offline:
    the module-scoped runs' set-up (the autouse `_offline` fixture covers function-scoped tests only)."""
    from ddpm_lightning.cli import main

    write_twelve(root / images)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf_home"))
        mp.delenv("HF_TOKEN", raising=False)
        mp.chdir(root)
        main(fit_args(root / images, root / out, *args))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """12 images: names that `imagefolder` would move to other splits, nested folders, PNG and JPEG."""
    root = tmp_path / "images"
    names = [
        "train_0.jpg",
        "train_1.png",
        "test_2.jpg",
        "test_3.JPG",
        "val_4.png",
        "val_5.jpeg",
        "a/6.png",
        "a/b/7.jpg",
        "a/b/test_8.png",
        "c/val_9.jpg",
        "c/train_10.png",
        "11.png",
    ]
    for i, name in enumerate(names):
        write_image(root / name, seed=i)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size) -> a folder on a file system of `size` bytes (a real tmpfs, so every writer meets a real full
    disk: torch, safetensors, PIL), unmounted after the test; the test is skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fit_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "-c",
        str(TINY_CONFIG),
        "--data.dataset",
        str(dataset),
        "--output_dir",
        str(out),
        *TINY_RUN_ARGS,
        *extra,
    ]


def tiny_module(speed=None, **kwargs):
    """A DDPMModule with TINY_UNET at 16 px, for tests that drive it without the CLI (`speed`: its SpeedSwitches,
    as a trainer's would give it)."""
    from ddpm_lightning.module import DDPMModule

    module = DDPMModule(unet=TINY_UNET, image_size=16, **kwargs)
    if speed is not None:
        module.speed = speed
    return module


def tiny_batches(n: int = 8, batch_size: int = 4):
    """A DataLoader of `n` fixed random images of 16 px in [-1, 1], for a plain `Trainer.fit` without the data."""
    from torch.utils.data import DataLoader

    return DataLoader(
        torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, batch_size=batch_size
    )


def data_module(dataset, **kwargs):
    """An `ImageDataModule` on `dataset` at 16 px, batch 4, loaded in this process, set up for `fit`."""
    from ddpm_lightning.data import ImageDataModule

    dm = ImageDataModule(dataset=str(dataset), image_size=16, train_batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny EMA model for the whole test file (12 images, 1 epoch: 3 steps): root/checkpoints/run/last.ckpt and
    the saved folder root/run."""
    root = tmp_path_factory.mktemp("trained")
    fit_offline(root, "images", "run", "--trainer.max_epochs", "1", "--model.use_ema", "true")
    assert (root / "checkpoints" / "run" / "last.ckpt").is_file() and (root / "run" / "model_index.json").is_file()
    return root


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a run that never crashes: 12 images, 3 steps an epoch, 2 epochs (its checkpoint cadence is
    irrelevant), for the resumed runs that must end with them."""
    tmp = tmp_path_factory.mktemp("straight")
    fit_offline(tmp, "twelve", "straight", *NO_SAVES, "--trainer.max_epochs", "2")
    step, weights = step_and_weights(tmp / "checkpoints" / "straight" / "last.ckpt")
    assert step == 6
    return weights


def step_of(ckpt: Path) -> int:
    """The global step a checkpoint file was saved at."""
    return torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]


def last_step(folder: Path) -> int:
    """The global step of a checkpoint folder's last.ckpt."""
    return step_of(folder / "last.ckpt")


def step_and_weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """A checkpoint's global step and its model weights (`state_dict`)."""
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    return checkpoint["global_step"], checkpoint["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same names, and bitwise the same values."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def unet_weights(unet) -> dict[str, torch.Tensor]:
    """A UNet's weights, detached, by name."""
    return {k: v.detach() for k, v in unet.state_dict().items()}


# ------------------------------------------------------------------------------------------ fine-tuning's sources


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8 images (2 steps an epoch at batch 4), the data the fine-tuning runs train on."""
    root = tmp_path_factory.mktemp("images")
    for i in range(8):
        write_image(root / f"{i}.png", seed=100 + i)
    return root


def google_layout(folder: Path, sample_size: int = 32, in_channels: int = 3, **schedule):
    """A folder as google/ddpm-* ships, written by diffusers itself: model_index.json, unet/, scheduler/. Returns its
    UNet."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(7)
    unet = UNet2DModel(**TINY_UNET, sample_size=sample_size, in_channels=in_channels, out_channels=in_channels)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**schedule)).save_pretrained(folder)
    return unet


class FirstStepWeights(Callback):
    """Saves the UNet's weights (and EMA's) as the first optimizer step gets them, and the LR at step 1, to `path`
    (`--trainer.callbacks+=conftest.FirstStepWeights --trainer.callbacks.path X`)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            ema = pl_module.ema
            record = {
                "unet": {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()},
                "ema": [p.clone() for p in ema.shadow_params] if ema is not None else None,
                "base_lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            }
            torch.save(record, self.path)
        if trainer.global_step == 1 and batch_idx == 1:
            record = torch.load(self.path)
            record["lr_at_step_1"] = trainer.optimizers[0].param_groups[0]["lr"]
            torch.save(record, self.path)


def fine_tune(images: Path, source, out: Path, *extra: str) -> dict:
    """`fit` for 2 steps from `source` (`--model.pretrained`); what the first step started from (FirstStepWeights)."""
    from ddpm_lightning.cli import main

    record = out.parent / f"{out.name}-first-step.pt"
    main(
        fit_args(
            images,
            out,
            "--model.pretrained",
            str(source),
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks+=conftest.FirstStepWeights",
            "--trainer.callbacks.path",
            str(record),
            *extra,
        )
    )
    return torch.load(record)


def tb_events(log_dir: Path, tag: str, kind: str = "scalars") -> list:
    """Every event of a TensorBoard tag (kind "scalars" or "images"), over every events file in log_dir, in
    order, none dropped (a step written twice is there twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={kind: 0})
        acc.Reload()
        if tag in acc.Tags()[kind]:
            events += acc.Scalars(tag) if kind == "scalars" else acc.Images(tag)
    return events


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar (a step written twice keeps its last value)."""
    return {e.step: e.value for e in tb_events(log_dir, tag)}


def child_env() -> dict[str, str]:
    """The environment of a child `python -m ddpm_lightning`: the checkout, and tests/ for the callbacks a test
    passes by class path (`--trainer.callbacks+=conftest.CrashAtStep`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ddpm_lightning *args` in a child process (`child_env()`, plus `env_extra`), its output captured."""
    env = child_env()
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ddpm_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def ddp_fit_command(dataset: Path, out: Path, *extra: str) -> list[str]:
    """`python -m ddpm_lightning` with `fit_args(dataset, out, *extra)` on two CPU processes (DDP); run it with
    `child_env()`."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    return [sys.executable, "-m", "ddpm_lightning", *fit_args(dataset, out, *extra), *ddp]


class StopAtStep(Callback):
    """Stops the run at the end of step `step` exactly as a SIGTERM would (Lightning's signal flag is set there),
    so the preemption save runs. Used by class path: `--trainer.callbacks+=conftest.StopAtStep`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


class SlowSteps(Callback):
    """A second per step, asleep: a signal sent during a step arrives before its end
    (`--trainer.callbacks+=conftest.SlowSteps`)."""

    def on_train_batch_start(self, *args) -> None:
        time.sleep(1.0)


class FirstBatch(Callback):
    """Keeps the first training batch (after the flip and scaling) and the number of training images
    (`--trainer.callbacks+=conftest.FirstBatch`); emptied before each test."""

    batch: torch.Tensor | None = None
    images = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if FirstBatch.batch is None:
            FirstBatch.batch, FirstBatch.images = batch.detach().clone(), len(trainer.datamodule.train_set)


@pytest.fixture(autouse=True)
def _fresh_first_batch():
    FirstBatch.batch, FirstBatch.images = None, 0


class CrashAtStep(Callback):
    """Raises on one rank at a given step (`--trainer.callbacks+=conftest.CrashAtStep`): a crash in one process."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected crash on rank {self.rank} at step {self.step}")


class NaNAtStep(Callback):
    """Fills the UNet's first weight with NaN before step `step` (`--trainer.callbacks+=conftest.NaNAtStep`): that
    step's loss, and every one after it, is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            next(pl_module.unet.parameters()).data.fill_(float("nan"))


def crash_args(step: int, rank: int = 0) -> list[str]:
    """The command-line arguments that add a CrashAtStep(rank, step) to a run."""
    return [
        "--trainer.callbacks+=conftest.CrashAtStep",
        "--trainer.callbacks.rank",
        str(rank),
        "--trainer.callbacks.step",
        str(step),
    ]


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor reads that would wait for a GPU (`.item()`, `bool()`, `float()`, `.tolist()`, `.cpu()`...):
    `total`, and `steps`, {step: reads} by the optimizer step being run ("start" before the first, "end" after
    the last), which `--trainer.callbacks+=conftest.MarkSteps` tells it."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.tolist,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
    }
    step: int | str = "start"  # set by MarkSteps

    def __init__(self):
        super().__init__()
        self.total = 0
        self.steps: dict[int | str, int] = {}
        HostReads.step = "start"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.total += 1
            self.steps[HostReads.step] = self.steps.get(HostReads.step, 0) + 1
        return func(*args, **(kwargs or {}))


class MarkSteps(Callback):
    """Tells HostReads which optimizer step runs (`--trainer.callbacks+=conftest.MarkSteps`)."""

    def on_train_batch_start(self, trainer, *args) -> None:
        HostReads.step = trainer.global_step + 1

    def on_train_end(self, trainer, *args) -> None:
        HostReads.step = "end"


class TinyFeatures(torch.nn.Module):
    """A fixed random conv net as FID/KID's feature extractor (`--quality.feature conftest.TinyFeatures`)."""

    def __init__(self, num_features: int = 16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, num_features, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.zero_()
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(images.float())).mean(dim=(2, 3))


class SignalAtBatch(Callback):
    """Sends this process a real signal (SIGTERM by default) at the end of its `batch`-th training micro-batch
    (counted from 1 over the run): `--trainer.callbacks+=conftest.SignalAtBatch --trainer.callbacks.batch 4`."""

    def __init__(self, batch: int, signum: int = 15):
        self.batch, self.signum, self.seen = batch, signum, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), self.signum)


class SaveEMAPerRank(Callback):
    """At the end of training, every rank saves its EMA state to ./ema_rank{rank}.pt (`--trainer.callbacks+=...`)."""

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(pl_module.ema.state_dict(), f"ema_rank{trainer.global_rank}.pt")


class RecordBatches(Callback):
    """Appends the images of each training batch to ./batches_rank{rank}.jsonl (`--trainer.callbacks+=...`): one
    line per batch, {"step", "images"}, each image named by the sum of its pixels (a flip does not change it)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        names = [round(float(image.double().sum()), 3) for image in batch]
        with open(f"batches_rank{trainer.global_rank}.jsonl", "a") as out:
            out.write(json.dumps({"step": trainer.global_step, "images": names}) + "\n")
