"""The decoded images one machine shares (shared_cache.py): decoded once, by one process, memory-mapped by all; read
again by a later run on the same images, size and crop, and decoded again when any of them changes; kept within
`data.cache_disk_gb`, least recently used first out; left for per-process memory, with one warning, where it cannot
be written. With 2 DDP processes: one decodes, each rank's batches are its own, a resume is exact, and the weights
equal those of a run from per-process memory."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_lightning.data import datamodule as data
from ddpm_lightning.data import shared_cache
from ddpm_lightning.data.images import Strips

from conftest import NO_SAVES, assert_same_weights, child_env, ddp_fit_command, write_image


@pytest.fixture
def decodings(monkeypatch) -> list[int]:
    """The images of each `decode_all` call, in this process."""
    calls: list[int] = []
    real = data.decode_all

    def counted(images, *args, **kwargs):
        calls.append(len(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(data, "decode_all", counted)
    return calls


def data_module(folder: Path, cache_dir: Path, **kwargs) -> data.ImageDataModule:
    """conftest's data_module (16 px, in this process) with its cache in `cache_dir`."""
    settings = {"image_size": 16, "train_batch_size": 4, "num_workers": 0, **kwargs}
    dm = data.ImageDataModule(dataset=str(folder), cache_dir=str(cache_dir), **settings)
    dm.setup("fit")
    return dm


def pixels(dm: data.ImageDataModule) -> list[torch.Tensor]:
    cached = dm.train_set.pixels
    return list(cached) if isinstance(cached, Strips) else [cached]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("crop", ["squash", "random"])
def test_a_second_run_reads_the_cache_and_equals_decoding_into_memory(twelve, tmp_path, decodings, crop):
    """The stored pixels are what decode_all gives a process of its own (`cache_disk_gb` 0), memory-mapped."""
    cache = tmp_path / "cache"
    first = pixels(data_module(twelve, cache, crop=crop))
    assert decodings == [12] and len(list(cache.glob("*.pt"))) == 1
    second = pixels(data_module(twelve, cache, crop=crop))
    assert decodings == [12]  # read, not decoded
    own = pixels(data_module(twelve, cache, crop=crop, cache_disk_gb=0))
    assert decodings == [12, 12] and len(list(cache.glob("*.pt"))) == 1
    assert_same(first, own)
    assert_same(second, own)
    mapped = Path("/proc/self/maps").read_text() if os.path.exists("/proc/self/maps") else ""
    assert str(next(cache.glob("*.pt"))) in mapped or not mapped  # shared through the page cache, not copied


def test_changed_images_size_or_crop_are_decoded_again_never_served_stale(twelve, tmp_path, decodings):
    cache = tmp_path / "cache"
    data_module(twelve, cache)
    data_module(twelve, cache, image_size=32)
    data_module(twelve, cache, crop="center")
    assert decodings == [12, 12, 12]
    write_image(twelve / "3.png", seed=100)  # new content
    changed = pixels(data_module(twelve, cache))
    assert len(decodings) == 4
    assert_same(changed, pixels(data_module(twelve, cache, cache_disk_gb=0)))
    os.utime(twelve / "5.png", ns=(1, 1))  # the same bytes, another modification time: decoded again, to be safe
    data_module(twelve, cache)
    (twelve / "3.png").unlink()  # an image fewer
    data_module(twelve, cache)
    assert decodings == [12, 12, 12, 12, 12, 12, 11]
    assert len(list(cache.glob("*.pt"))) == 6  # (the process that decoded into its own memory stored nothing)


def test_a_run_reading_the_cache_counts_the_unreadable_images_too(twelve, tmp_path, decodings):
    (twelve / "broken.png").write_text("not a PNG")
    with pytest.warns(UserWarning, match=r"Skipped 1 of 13 images .*broken\.png"):
        data_module(twelve, tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"Skipped 1 of 13 images that could not be read"):
        dm = data_module(twelve, tmp_path / "cache")
    assert decodings == [13] and len(dm.train_set) == 12


def test_images_stored_in_the_data_set_are_keyed_by_their_bytes_in_their_order(twelve):
    """Parquet, `save_to_disk` and Hub data sets hold the images' bytes: any changed byte, or another order, is
    another key; the same bytes read from another copy are the same key."""
    images = [(twelve / f"{i}.png").read_bytes() for i in range(4)]

    def key(rows: list[bytes]) -> str:
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in rows]})
        ds = ds.cast_column("image", datasets.Image(decode=False))
        return shared_cache.key(ds, "image", 16, "squash", 2.0)

    same = key(images)
    assert key(list(images)) == same
    assert key([*images[:3], images[3][:-1] + bytes([images[3][-1] ^ 1])]) != same
    assert key(images[::-1]) != same
    assert key(images[:3]) != same


def test_the_cache_keeps_within_cache_disk_gb_dropping_the_least_recently_used(tmp_path, decodings):
    sets = []
    for name in "abc":
        for i in range(12):
            write_image(tmp_path / name / f"{i}.png", seed=ord(name) * 100 + i)
        sets.append(tmp_path / name)
    cache, one_set = tmp_path / "cache", 12 * 3 * 16 * 16
    cap_gb = 3 * one_set / 1e9  # two sets fit (with their files' own few bytes), not three
    a, b, c = sets

    def use(*folders: Path, gb: float = cap_gb) -> None:
        for folder in folders:
            data_module(folder, cache, cache_disk_gb=gb)
            time.sleep(0.01)  # (distinct times of last use)

    use(a, b, a, c)  # a read again after b: b is the least recently used when c comes
    assert decodings == [12, 12, 12] and len(list(cache.glob("*.pt"))) == 2
    use(a, c)
    assert len(decodings) == 3
    use(b)  # a out now
    use(c, b)
    assert len(decodings) == 4
    use(a, gb=0.5 * one_set / 1e9)  # more than the whole cache may take: into memory, nothing stored or deleted
    use(b, c)
    assert len(decodings) == 5 and len(list(cache.glob("*.pt"))) == 2


def test_an_unusable_cache_folder_means_per_process_memory_and_one_warning(twelve, tmp_path, decodings, caplog):
    """The warning is a message on the package's log, not Python's `shared_cache.py:179: UserWarning:` form."""
    (tmp_path / "file").write_text("")
    dm = data_module(twelve, tmp_path / "file" / "cache")
    said = [r for r in caplog.records if r.levelname == "WARNING" and "Cannot keep" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "ddpm_lightning.data.shared_cache"
    assert re.fullmatch(r"Cannot keep the decoded images in .*file/cache .*--data.cache_dir.*", said[0].getMessage())
    assert decodings == [12] and len(dm.train_set) == 12


def test_a_damaged_cache_file_is_decoded_again_never_trained_on(twelve, tmp_path, decodings, caplog):
    """Zeros over part of the stored pixels (a bad disk block, a partial copy), the file still loading: its
    checksum differs, one warning names the file, and the images are decoded again, as a process's own."""
    cache = tmp_path / "cache"
    first = [t.clone() for t in pixels(data_module(twelve, cache))]  # (not the mapped file's pages)
    path = next(cache.glob("*.pt"))
    raw = bytearray(path.read_bytes())
    start = raw.find(first[0][3].numpy().tobytes())  # the fourth image's pixels, where torch stored them
    assert start > 0
    raw[start : start + 256] = bytes(256)
    path.write_bytes(raw)
    assert torch.load(path, mmap=True, weights_only=True)["tensors"][0][3].sum() < first[0][3].sum()  # it loads
    again = pixels(data_module(twelve, cache))
    assert decodings == [12, 12]
    assert_same(again, first)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"The decoded images in {path} are damaged (their checksum differs): decoding them again."]
    pixels(data_module(twelve, cache))
    assert decodings == [12, 12]  # the rebuilt file is read


def test_an_image_rewritten_with_its_size_and_modification_time_put_back_is_decoded_anew(tmp_path, decodings):
    """As `rsync`, `cp --preserve` or `touch -r` leave it: the same path, size and mtime; new pixels."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # uncompressed PNGs: every one of the same size
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png", compress_level=0)
    cache = tmp_path / "cache"
    old = pixels(data_module(folder, cache))
    target = folder / "2.png"
    before = target.stat()
    new = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(new, format="PNG", compress_level=0)
    assert len(new.getvalue()) == before.st_size
    with open(target, "r+b") as f:  # in place: the same inode
        f.write(new.getvalue())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    changed = pixels(data_module(folder, cache))
    assert decodings == [4, 4] and not torch.equal(changed[0][2], old[0][2])
    assert_same(changed, pixels(data_module(folder, cache, cache_disk_gb=0)))


DECODE_COUNTED = """\
import sys
from ddpm_lightning.cli import main
from ddpm_lightning.data import datamodule as data
real = data.decode_all
def counted(images, num_workers, trainer=None):
    print(f"DECODING {len(images)} images on rank {trainer.global_rank}", flush=True)
    return real(images, num_workers, trainer)
data.decode_all = counted
main(sys.argv[1:])
"""


def recorded(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"batches_rank{rank}.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.mark.slow
def test_ddp_ranks_decode_once_resume_exactly_and_train_as_from_per_process_memory(tmp_path):
    """2 processes (gloo), 16 images, batch 4: 2 steps an epoch, 3 epochs. The straight run: one process decodes;
    each rank's batches are its own and together the epoch. Stopped at step 3 (mid-epoch) and resumed: nothing
    decoded, the straight run's batches and its very weights (and no word about other data for another
    `cache_disk_gb`). A run from per-process memory (`cache_disk_gb` 0, as before the shared cache): each rank
    decodes, the same batches and the same weights."""
    for i in range(16):
        write_image(tmp_path / "images" / f"{i}.png", seed=i)
    script = tmp_path / "counted_fit.py"
    script.write_text(DECODE_COUNTED)
    common = [
        *NO_SAVES, "--trainer.max_epochs", "3", "--trainer.callbacks+=conftest.RecordBatches",
        "--data.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip

    def run(folder: str, *extra: str) -> tuple[str, list[list[dict]], tuple[int, dict]]:
        (tmp_path / folder).mkdir(exist_ok=True)
        command = ddp_fit_command(tmp_path / "images", tmp_path / folder / "out", *common, *extra)
        result = subprocess.run(
            [sys.executable, str(script), *command[3:]],
            cwd=tmp_path / folder, env=child_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        batches = [recorded(tmp_path / folder, rank) for rank in (0, 1)]
        return log, batches, weights(tmp_path / folder / "checkpoints" / "out" / "last.ckpt")

    log, straight, (step, straight_weights) = run("straight")
    assert log.count("DECODING 16 images") == 1 and step == 6
    names = sorted(sum((b["images"] for b in straight[0] + straight[1] if b["step"] < 2), []))
    assert len(names) == 16 and len(set(names)) == 16  # (the flip keeps an image's name)
    for epoch in (0, 1, 2):
        ranks = [sum((b["images"] for b in straight[r] if 2 * epoch <= b["step"] < 2 * epoch + 2), []) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 8 and sorted(ranks[0] + ranks[1]) == names

    stop = ["--trainer.callbacks+=conftest.StopAtStep", "--trainer.callbacks.step", "3"]
    log, _, (step, _) = run("resumed", *stop)
    assert "DECODING" not in log and step == 3
    log, resumed, (step, resumed_weights) = run("resumed", "--ckpt_path", "last", "--data.cache_disk_gb", "19")
    assert "DECODING" not in log and "Read 16 decoded images of 16 px from the cache" in log
    assert "Resuming with other data" not in log  # the cache's own settings change no image
    assert step == 6 and resumed == straight
    assert_same_weights(resumed_weights, straight_weights)

    log, own, (_, own_weights) = run("own_memory", "--data.cache_disk_gb", "0")
    assert log.count("DECODING 16 images") == 2 and own == straight
    assert_same_weights(own_weights, straight_weights)
