"""The decoding pass that fills the cache: any number of images with loader workers, past the process's open-file
limit; the same pixels, in the same order, as decoding in this process; one line when a resource limit stops it.
And benchmarks/decode.py, which times it."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.cli import main, raised_by_this_package
from ddpm_lightning.data import images as data
from ddpm_lightning.data.images import ResizedImages, Strips, decode_all, limit_hit
from ddpm_lightning.sources import load_source

from conftest import REPO, fit_args, max_steps, write_image

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def open_file_limit(limit: int, seconds: int = 120):
    """This process (and the loader workers it starts) may open `limit` files at most, until the block ends. A
    block still running after `seconds` fails: a worker that cannot send its batch leaves this process waiting."""

    def hang(*_) -> None:
        raise TimeoutError(f"still running after {seconds} s at an open-file limit of {limit}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    previous = signal.signal(signal.SIGALRM, hang)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_fit_with_loader_workers_caches_more_images_than_the_open_file_limit(tmp_path):
    """Each image coming back from a worker as a shared-memory tensor of its own, kept until all are stacked, would
    hold one open file per image: this run would stop at its limit."""
    limit = open_files() + 100
    for i in range(limit + 50):
        write_image(tmp_path / "many" / f"{i}.png", size=(16, 16), seed=i)
    with open_file_limit(limit):
        main(fit_args(tmp_path / "many", tmp_path / "run", "--data.num_workers", "2", *max_steps(1)))
    assert (tmp_path / "run" / "model_index.json").is_file()


def parquet_of_photos(path, count: int):
    """A parquet file of `count` PNGs of many shapes (wide, tall, over 2:1, smaller than 16 px) and one row that
    is no image."""
    rng = np.random.default_rng(0)
    sizes = [(24, 16), (16, 30), (40, 16), (20, 28), (33, 18), (18, 18), (12, 9), (27, 19)]
    rows = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(png, "PNG")
        rows.append({"bytes": b"not an image" if i == count // 2 else png.getvalue(), "path": None})
    features = datasets.Features({"img": datasets.Image()})
    datasets.Dataset.from_dict({"img": rows}, features=features).to_parquet(str(path))
    return path


@pytest.mark.parametrize("crop", ["squash", "center", "random"])
def test_decoding_past_the_open_file_limit_in_workers_gives_the_pixels_of_decoding_here(tmp_path, crop):
    """A parquet source of more images than the process may open files, decoded by 2 workers: every readable
    image, in order, bit for bit what decoding them one by one in this process gives (collated as one batch)."""
    limit = open_files() + 48
    images = ResizedImages(load_source(str(parquet_of_photos(tmp_path / "p.parquet", limit + 50))), "img", 16, crop)
    with pytest.warns(UserWarning, match="Skipped 1 of"), open_file_limit(limit):
        in_workers = decode_all(images, num_workers=2)
    with pytest.warns(UserWarning, match="Skipped 1 of"):
        here = decode_all(images, num_workers=0)  # no shared memory
    one_by_one = [images[i] for i in range(len(images)) if i != len(images) // 2]
    expected = Strips.collate(one_by_one) if crop == "random" else torch.stack(one_by_one)
    for got in in_workers, here:
        assert type(got) is type(expected)
        for part, want in zip(tensors(got), tensors(expected), strict=True):
            assert part.dtype == want.dtype and torch.equal(part, want)


def tensors(pixels: torch.Tensor | Strips) -> list[torch.Tensor]:
    return list(pixels) if isinstance(pixels, Strips) else [pixels]


def assert_one_line_naming(err: BaseException, *words: str) -> None:
    message = str(err)
    assert "\n" not in message and raised_by_this_package(err), message
    for word in words:
        assert word in message, message


def test_a_limit_hit_in_the_loader_workers_is_one_line_naming_it_and_the_fix(tmp_path):
    write_image(tmp_path / "a.png")
    images = ResizedImages(load_source(str(tmp_path)), "image", 16)
    with open_file_limit(open_files() + 2):  # too few to start the workers
        with pytest.raises(RuntimeError) as caught:
            decode_all(images, num_workers=2)
        with open(tmp_path / "a.png", "rb"):  # what the loader had opened is closed: the run can clean up
            pass
    assert_one_line_naming(caught.value, "open-file limit", "ulimit -n", "--data.num_workers 0")


def test_an_image_the_open_file_limit_keeps_shut_is_not_counted_as_unreadable(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png")
    images = ResizedImages(load_source(str(tmp_path)), "image", 16)

    def too_many(source):
        raise OSError(errno.EMFILE, "Too many open files", str(source))

    monkeypatch.setattr(data, "open_image", too_many)
    with pytest.raises(RuntimeError) as caught:
        decode_all(images, num_workers=0)
    assert_one_line_naming(caught.value, "open-file limit", "ulimit -n")


@pytest.mark.parametrize(
    "failure",
    [  # as torch reports them from a worker, or a worker's death
        RuntimeError(
            "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "RuntimeError: unable to write to file </torch_1_2_3>: No space left on device (28)"
        ),
        RuntimeError(
            "DataLoader worker (pid 123) is killed by signal: Bus error. It is possible that dataloader's workers "
            "are out of shared memory. Please try to raise your shared memory limit."
        ),
    ],
)
def test_shared_memory_running_out_is_named_with_the_fix(failure):
    message = limit_hit(failure, num_workers=2)
    assert message is not None and "\n" not in message
    assert "/dev/shm" in message and "--shm-size" in message and "--data.num_workers 0" in message


def test_other_loader_failures_are_not_blamed_on_a_limit():
    assert limit_hit(RuntimeError("Caught ZeroDivisionError in DataLoader worker process 0."), 2) is None


@pytest.mark.slow
def test_the_decoding_benchmark_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "benchmarks/decode.py", "--count", "40", "--workers", "1", "--repeats", "1"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["images"] == 40 and summary["images_per_s"] > 0
