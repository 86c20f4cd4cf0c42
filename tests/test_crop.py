"""data.crop (squash | center | random) and data.random_flip through `ddpm-lightning fit`, pixel for pixel
against torchvision's transforms on non-square photos; the cached batch as one indexing op."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import crop, pil_to_tensor

from ddpm_lightning.cli import main
from ddpm_lightning.data import CachedImages

from conftest import fit_args, max_steps, write_image

# (width, height): landscape and portrait at several aspect ratios; 40 x 16 is wider than 2:1 (trimmed for random).
SIZES = [(24, 16), (16, 30), (40, 16), (20, 28), (33, 18), (18, 18), (16, 21), (27, 19)]
SEEN: list[torch.Tensor] = []


class KeepBatches(Callback):
    """Keeps every training batch as the model gets it, back in uint8 (`--trainer.callbacks+=test_crop.KeepBatches`)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        SEEN.extend(((batch.detach().cpu() + 1) * 127.5).round().to(torch.uint8))


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return [write_image(tmp_path / "photos" / f"{i}.png", size=size, seed=i) for i, size in enumerate(SIZES)]


def fit_and_keep(photos: list[Path], tmp_path: Path, *extra: str) -> list[torch.Tensor]:
    SEEN.clear()
    main(
        fit_args(
            photos[0].parent,
            tmp_path / "run",
            "--trainer.callbacks+=test_crop.KeepBatches",
            "--data.random_flip",
            "false",
            "--grid.save_image_epochs",
            "1000",
            *extra,
        )
    )
    return list(SEEN)


def tv(transform, path: Path) -> torch.Tensor:
    return pil_to_tensor(transform(Image.open(path).convert("RGB")))


def same_set(seen: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return {bytes(t.numpy()) for t in seen} == {bytes(t.numpy()) for t in expected}


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "none"])
@pytest.mark.parametrize("crop", ["squash", "center"])
def test_squash_and_center_equal_torchvision(photos, tmp_path, crop, cache):
    seen = fit_and_keep(photos, tmp_path, "--trainer.max_epochs", "1", "--data.crop", crop, "--data.cache", cache)
    transform = {
        "squash": transforms.Resize((16, 16)),
        "center": transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16)]),
    }[crop]
    assert len(seen) == len(photos) and same_set(seen, [tv(transform, p) for p in photos])


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_random_crop_is_a_torchvision_random_crop_new_each_epoch(photos, tmp_path, cache):
    seen = fit_and_keep(photos, tmp_path, "--trainer.max_epochs", "6", "--data.crop", "random", "--data.cache", cache)
    assert len(seen) == 6 * len(photos)
    # Every crop torchvision's Resize(16) + RandomCrop(16) can give, per photo.
    choices = {}
    for i, path in enumerate(photos):
        resized = transforms.Resize(16)(Image.open(path).convert("RGB"))
        w, h = resized.size
        choices[i] = {
            bytes(pil_to_tensor(crop(resized, top, left, 16, 16)).numpy())
            for top in range(h - 15)
            for left in range(w - 15)
        }
    origin = []
    for image in seen:
        owners = [i for i, crops in choices.items() if bytes(image.numpy()) in crops]
        assert len(owners) == 1  # a crop of exactly one photo, as torchvision would cut it
        origin.append(owners[0])
    assert sorted(origin) == sorted(list(range(len(photos))) * 6)  # every photo once an epoch
    per_photo = {i: {bytes(s.numpy()) for s, o in zip(seen, origin) if o == i} for i in choices}
    assert len(per_photo[5]) == 1  # the square photo has one crop
    assert all(len(per_photo[i]) > 1 for i in (1, 2, 4))  # long photos get other crops in other epochs
    # 40 x 16 is trimmed to its middle 32 x 16 first: its crops stay within it.
    assert per_photo[2] <= {
        bytes(pil_to_tensor(crop(transforms.Resize(16)(Image.open(photos[2]).convert("RGB")), 0, left, 16, 16)).numpy())
        for left in range(4, 21)
    }


@pytest.mark.slow
def test_random_flip_flips_about_half(photos, tmp_path):
    center = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16)])
    expected = [tv(center, p) for p in photos]
    seen = fit_and_keep(
        photos, tmp_path, "--trainer.max_epochs", "4", "--data.crop", "center", "--data.random_flip", "true"
    )
    plain = {bytes(t.numpy()) for t in expected}
    flipped = {bytes(t.flip(-1).numpy()) for t in expected}
    assert all(bytes(s.numpy()) in plain | flipped for s in seen)
    assert 0.25 < sum(bytes(s.numpy()) in flipped for s in seen) / len(seen) < 0.75


@pytest.mark.slow
def test_cached_batch_is_one_indexing_op(photos, tmp_path, monkeypatch):
    """The loader hands CachedImages a whole batch of indices: no per-image item access, no collate."""
    calls = []
    real = CachedImages.__getitems__
    monkeypatch.setattr(CachedImages, "__getitems__", lambda self, idx: calls.append(list(idx)) or real(self, idx))
    monkeypatch.setattr(CachedImages, "__getitem__", lambda self, i: pytest.fail("one image at a time"))
    seen = fit_and_keep(
        photos, tmp_path, "--trainer.max_epochs", "1", "--data.crop", "random", "--data.cache", "memory"
    )
    assert len(seen) == len(photos)
    assert [len(c) for c in calls[1:]] == [4, 4]  # calls[0] is data.png's first 16 (here all 8)


@pytest.mark.slow
def test_random_crops_resume_exactly(photos, tmp_path):
    """A run stopped mid-epoch and resumed gets the same crops and flips (device RNG restored) as one that was not."""
    common = [
        *max_steps(5),
        "--data.crop",
        "random",
        "--data.random_flip",
        "true",
    ]
    straight = fit_and_keep(photos, tmp_path / "a", *common, "--checkpoint.dirpath", str(tmp_path / "a_ckpt"))
    with pytest.raises(SystemExit):
        fit_and_keep(
            photos,
            tmp_path / "b",
            *common,
            "--checkpoint.dirpath",
            str(tmp_path / "b_ckpt"),
            "--trainer.callbacks+=conftest.StopAtStep",
            "--trainer.callbacks.step",
            "3",
        )
    first = list(SEEN)
    resumed = fit_and_keep(
        photos, tmp_path / "b", *common, "--checkpoint.dirpath", str(tmp_path / "b_ckpt"), "--ckpt_path", "last"
    )
    assert len(straight) == 20 and len(first) == 12 and len(resumed) == 8  # 2 batches of 4 an epoch
    assert all(torch.equal(x, y) for x, y in zip(straight, first + resumed))
