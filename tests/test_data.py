"""Images as the model gets them (data/images.py, data/datamodule.py): decoded (EXIF, 16-bit, palette, unreadable
files), resized, cached in memory or on the training device, cropped (squash, center, random) and flipped per batch,
pixel for pixel against torchvision's transforms; random crops resume exactly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import crop, pil_to_tensor

from ddpm_lightning.cli import main
from ddpm_lightning.data import ImageDataModule
from ddpm_lightning.data.images import CachedImages, ResizedImages

from conftest import HELICONIUS, ONE_STEP, FirstBatch, data_module, fit_args, max_steps, write_image


def test_image_folder_loads_every_image_whatever_the_name(image_folder, caplog):
    dm = data_module(image_folder)
    assert len(dm.train_set) == 12  # imagefolder would have split test_* and val_* away
    assert "Found 12 training images" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8  # resized once, augmented on the device
    images = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.float32 and -1.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_augmentation_is_the_tutorials(image_folder, cache):
    """Each augmented image equals the tutorial's Resize/flip/ToTensor/Normalize output, flipped or not."""
    dm = data_module(image_folder, cache=cache)
    path = sorted(image_folder.rglob("*.png"))[0]
    resize = transforms.Resize((16, 16))
    tutorial = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(
        resize(Image.open(path).convert("RGB"))
    )
    index = [
        i
        for i in range(len(dm.train_set))
        if torch.equal(dm.train_set[i], (tutorial * 127.5 + 127.5).round().to(torch.uint8))
    ]
    assert len(index) == 1
    torch.manual_seed(0)
    out = dm.on_after_batch_transfer(torch.stack([dm.train_set[index[0]]] * 2000), 0)
    flipped = torch.tensor([torch.allclose(o, tutorial.flip(-1), atol=1e-6) for o in out])
    plain = torch.tensor([torch.allclose(o, tutorial, atol=1e-6) for o in out])
    assert bool((flipped | plain).all())
    assert 0.45 < flipped.float().mean() < 0.55  # RandomHorizontalFlip's p=0.5


def bad_images(folder):
    write_image(folder / "good_0.png", seed=0)
    write_image(folder / "good_1.jpg", seed=1)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = (folder / "good_1.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.png").write_text("this is not a PNG")
    return folder


def test_unreadable_images_are_skipped_and_counted_when_cached(tmp_path):
    with pytest.warns(UserWarning, match=r"Skipped 3 of 5 images.*empty\.jpg"):
        dm = data_module(bad_images(tmp_path), cache="memory")
    assert len(dm.train_set) == 2


def test_unreadable_image_names_the_file_when_streaming(tmp_path):
    dm = data_module(bad_images(tmp_path), cache="none")
    names = {Path(dm.train_set.rows[i]["image"]["path"]).name: i for i in range(5)}
    with pytest.raises(ValueError, match="Could not read image .*text.png.*remove or fix it"):
        dm.train_set[names["text.png"]]


def test_16_bit_images_scale_instead_of_clipping(tmp_path):
    Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # mid-grey
    pixels = data_module(tmp_path).train_set[0]
    assert pixels.shape == (3, 16, 16) and int(pixels.float().mean()) == 128


def test_small_images_are_upscaled_and_counted(tmp_path, caplog):
    write_image(tmp_path / "small.png", size=(8, 8))
    write_image(tmp_path / "big.png", size=(32, 32))
    dm = data_module(tmp_path)
    assert "1 of 2 images are smaller than 16 px" in caplog.text
    assert dm.train_set[0].shape == (3, 16, 16)


def test_converts_grayscale_rgba_and_palette_images(tmp_path):
    """At 16 px (no resizing), the pixels themselves: grey v -> (v, v, v); RGBA -> its RGB (alpha dropped, as
    PIL's convert does); palette index i -> palette colour i."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "a_gray.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_rgba.png")
    indexed = Image.fromarray(index, "L").convert("P")
    indexed.putpalette(palette.flatten().tolist())
    indexed.save(tmp_path / "c_palette.png")
    dm = data_module(tmp_path, cache="none")  # the files in name order
    expected = [np.stack([gray] * 3, -1), rgba[..., :3], palette[index]]
    assert len(dm.train_set) == 3
    for i, want in enumerate(expected):
        assert dm.train_set[i].shape == (3, 16, 16)
        np.testing.assert_array_equal(dm.train_set[i].permute(1, 2, 0).numpy(), want, err_msg=str(i))


def sideways_photo(path: Path) -> Path:
    """A JPEG stored left half red, right half blue, with EXIF orientation 6 (rotate 90° clockwise to view):
    seen the right way up, red is on top and blue below."""
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def assert_upright(images: torch.Tensor) -> None:
    """(N, 3, H, W), any scale: red above, blue below (a horizontal flip changes neither)."""
    images = images.float()
    top, bottom = images[..., : images.shape[-2] // 2, :], images[..., images.shape[-2] // 2 :, :]
    assert (top[:, 0] > top[:, 2]).float().mean() > 0.9, "the top half is not red: EXIF orientation ignored"
    assert (bottom[:, 2] > bottom[:, 0]).float().mean() > 0.9, "the bottom half is not blue"


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_exif_orientation_is_applied_when_training(tmp_path, cache):
    photos = tmp_path / "photos"
    for i in range(4):
        sideways_photo(photos / f"{i}.jpg")
    main(
        fit_args(photos, tmp_path / "run", *ONE_STEP, "--data.cache", cache, "--trainer.callbacks+=conftest.FirstBatch")
    )
    assert FirstBatch.batch is not None and FirstBatch.batch.shape[0] == 4
    assert_upright(FirstBatch.batch)


def test_exif_orientation_is_applied_to_validation_images(tmp_path):
    for i in range(2):
        sideways_photo(tmp_path / "val" / f"{i}.jpg")
        write_image(tmp_path / "train" / f"{i}.png", seed=i)
    data = ImageDataModule(
        str(tmp_path / "train"), image_size=16, num_workers=0, val_dataset=str(tmp_path / "val"), cache="none"
    )
    data.setup("fit")
    assert_upright(torch.stack([data.val_set[i][1] for i in range(2)]))


def test_val_batch_size_batches_the_held_out_images_and_leaves_the_loss_as_it_was(image_folder):
    """Left out, validation batches are training-sized; set, they are its size; val/loss is the same either way
    (a mean weighted by batch size, with noise fixed per image)."""
    from conftest import tiny_module

    losses = []
    for val_batch_size, sizes in ((None, [4, 4, 4]), (12, [12])):
        dm = data_module(image_folder, val_dataset=str(image_folder), val_batch_size=val_batch_size)
        assert [len(images) for _, images in dm.val_dataloader()] == sizes
        torch.manual_seed(0)
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        losses.append(trainer.validate(tiny_module(), datamodule=dm, verbose=False)[0]["val/loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] > 0


def test_cache_auto_keeps_small_data_in_memory_and_streams_above_cache_max_gb(image_folder):
    assert isinstance(data_module(image_folder).train_set, CachedImages)  # 12 x 3 x 16 x 16 bytes
    streamed = data_module(image_folder, cache_max_gb=12 * 3 * 16 * 16 / 1e9 / 2)  # half of what they take
    assert isinstance(streamed.train_set, ResizedImages) and len(streamed.train_set) == 12


def test_cache_on_gpu_puts_the_cached_pixels_on_the_training_device(image_folder):
    """The "meta" device stands in for a GPU (no GPU here): the pixels go to the trainer's root device when asked,
    and stay in CPU memory by default when that device is not CUDA."""
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), progress_bar_callback=None)
    dm = ImageDataModule(dataset=str(image_folder), image_size=16, num_workers=0, cache_on_gpu=True)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.train_set.pixels.device.type == "meta" and dm.train_set.pixels.shape == (12, 3, 16, 16)
    default = ImageDataModule(dataset=str(image_folder), image_size=16, num_workers=0)
    default.trainer = trainer
    default.setup("fit")
    assert default.train_set.pixels.device.type == "cpu"


def test_cache_on_gpu_and_pin_memory_in_their_gpu_values_give_the_same_batches(image_folder, monkeypatch):
    """The GPU branches of the data path on a CPU: the cache moved to the training device (here the CPU device,
    through the same code), and a loader that pins memory (torch.cuda.is_available() faked for its creation;
    without a GPU the DataLoader pins nothing). Both deliver exactly the default loader's batches."""
    from ddpm_lightning.data import ImageDataModule

    trainer = Trainer(accelerator="cpu", logger=False)

    def loader(**kwargs):
        data = ImageDataModule(
            dataset=str(image_folder), image_size=16, train_batch_size=4, num_workers=0, cache="memory", **kwargs
        )
        data.trainer = trainer
        data.setup("fit")
        return data.train_dataloader()

    plain = list(loader(cache_on_gpu=False))
    assert [len(b) for b in plain] == [4, 4, 4]
    on_device = list(loader(cache_on_gpu=True))
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        pinning = loader(cache_on_gpu=False)
    assert pinning.pin_memory
    for batches in (on_device, list(pinning)):
        assert all(
            torch.equal(a, b) and b.device == trainer.strategy.root_device for a, b in zip(plain, batches, strict=True)
        )


# (width, height): landscape and portrait at several aspect ratios; 40 x 16 is wider than 2:1 (trimmed for random).
SIZES = [(24, 16), (16, 30), (40, 16), (20, 28), (33, 18), (18, 18), (16, 21), (27, 19)]


SEEN: list[torch.Tensor] = []


class KeepBatches(Callback):
    """Keeps every training batch as the model gets it, back in uint8 (`--trainer.callbacks+=test_data.KeepBatches`)."""

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
            "--trainer.callbacks+=test_data.KeepBatches",
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


def test_held_out_images_tied_to_another_data_set_give_way_to_a_share_of_the_one_trained(image_folder, twelve):
    """configs/tiny.yaml holds out the shipped photos' validation split for those photos only (val_dataset_of):
    trained on another folder, its held-out images are a seeded 10% of that folder, and the reference says so;
    held-out images named apart from the tie are used as given."""
    tied = {"val_dataset": str(HELICONIUS), "val_split": "validation", "val_dataset_of": str(HELICONIUS)}
    dm = data_module(image_folder, **tied)
    assert len(dm.val_set) == 2 and len(dm.train_set) == 10  # 10% of 12, rounded up by datasets
    assert dm.reference_name() == f"2 held-out images: a seeded 10% of {image_folder} (split 'train')"
    again = data_module(image_folder, **tied)
    assert torch.equal(
        torch.stack([dm.val_set[i][1] for i in range(2)]), torch.stack([again.val_set[i][1] for i in range(2)])
    )
    named = data_module(image_folder, **{**tied, "val_dataset": str(twelve)})  # the user's own held-out folder
    assert len(named.val_set) == 12 and len(named.train_set) == 12
    assert named.reference_name() == f"12 held-out images: {twelve} (split 'validation')"


def test_the_same_data_set_however_written_keeps_its_held_out_images(image_folder, tmp_path, monkeypatch):
    """`./images` and the absolute path name the same folder: its tied held-out images stay."""
    monkeypatch.chdir(image_folder.parent)
    tied = {"val_dataset": str(image_folder), "val_dataset_of": f"./{image_folder.name}/"}
    dm = data_module(image_folder, **tied)
    assert len(dm.val_set) == len(dm.train_set) == 12
