"""Where images come from: image folders, Hub-format local data sets, save_to_disk folders, Hub ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ddpm_lightning.data import CachedImages, ImageDataModule, ResizedImages
from ddpm_lightning.sources import load_source

from conftest import HELICONIUS, write_image


def setup_module_for(dataset, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(dataset=str(dataset), image_size=16, train_batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_image_folder_loads_every_image_whatever_the_name(image_folder, caplog):
    dm = setup_module_for(image_folder)
    assert len(dm.train_set) == 12  # imagefolder would have split test_* and val_* away
    assert "Found 12 training images" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.uint8  # resized once, augmented on the device
    images = dm.on_after_batch_transfer(batch, 0)
    assert images.dtype == torch.float32 and -1.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_augmentation_is_the_tutorials(image_folder, cache):
    """Each augmented image equals the tutorial's Resize/flip/ToTensor/Normalize output, flipped or not."""
    dm = setup_module_for(image_folder, cache=cache)
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
        dm = setup_module_for(bad_images(tmp_path), cache="memory")
    assert len(dm.train_set) == 2


def test_unreadable_image_names_the_file_when_streaming(tmp_path):
    dm = setup_module_for(bad_images(tmp_path), cache="none")
    names = {Path(dm.train_set.rows[i]["image"]["path"]).name: i for i in range(5)}
    with pytest.raises(ValueError, match="Could not read image .*text.png.*remove or fix it"):
        dm.train_set[names["text.png"]]


def test_16_bit_images_scale_instead_of_clipping(tmp_path):
    Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")  # mid-grey
    pixels = setup_module_for(tmp_path).train_set[0]
    assert pixels.shape == (3, 16, 16) and int(pixels.float().mean()) == 128


def test_small_images_are_upscaled_and_counted(tmp_path, caplog):
    write_image(tmp_path / "small.png", size=(8, 8))
    write_image(tmp_path / "big.png", size=(32, 32))
    dm = setup_module_for(tmp_path)
    assert "1 of 2 images are smaller than 16 px" in caplog.text
    assert dm.train_set[0].shape == (3, 16, 16)


def test_all_1000_heliconius_photos_train(heliconius_photos):
    """A folder of the real photos: the file names that `imagefolder` moves to other splits all train."""
    names = [p.name for p in heliconius_photos.iterdir()]
    assert any(n.startswith("test_") for n in names) and any(n.startswith("val_") for n in names)
    assert len(load_source(str(heliconius_photos))) == len(names) == 1000


def test_the_shipped_data_set_has_1000_training_and_200_validation_photos_at_64_px():
    train, val = load_source(str(HELICONIUS)), load_source(str(HELICONIUS), "validation")
    assert (len(train), len(val)) == (1000, 200)
    assert train.features["image"] == datasets.Image() and train[0]["image"].size == (64, 64)
    assert (HELICONIUS / "ATTRIBUTION.md").is_file()
    assert sum(p.stat().st_size for p in HELICONIUS.glob("*.parquet")) < 3e6  # docs/data.md: under 3 MB


def test_make_sample_data_rebuilds_a_hub_format_data_set(tmp_path):
    """tools/make_sample_data.py on a folder laid out as the originals are: both splits at --size px, each image
    under its file name, the attribution kept beside them."""
    source = tmp_path / "source"
    for i in range(3):
        write_image(source / "train" / f"test_{i}.JPG", size=(40, 30), seed=i)
    write_image(source / "val" / "val_0.jpg", size=(40, 30))
    (source / "ATTRIBUTION.md").write_text("CC BY 4.0, by the photographers")
    out = tmp_path / "heliconius"
    script = Path(__file__).parents[1] / "tools" / "make_sample_data.py"
    args = [sys.executable, str(script), "--source", str(source), "--out", str(out), "--size", "16"]
    subprocess.run(args, check=True, capture_output=True)
    train, val = load_source(str(out)), load_source(str(out), "validation")
    assert (len(train), len(val)) == (3, 1) and train[0]["image"].size == (16, 16)
    names = train.cast_column("image", datasets.Image(decode=False))["image"]
    assert [n["path"] for n in names] == ["test_0.JPG", "test_1.JPG", "test_2.JPG"]
    assert "CC BY 4.0, by the photographers" in (out / "ATTRIBUTION.md").read_text()


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
    dm = setup_module_for(tmp_path, cache="none")  # the files in name order
    expected = [np.stack([gray] * 3, -1), rgba[..., :3], palette[index]]
    assert len(dm.train_set) == 3
    for i, want in enumerate(expected):
        assert dm.train_set[i].shape == (3, 16, 16)
        np.testing.assert_array_equal(dm.train_set[i].permute(1, 2, 0).numpy(), want, err_msg=str(i))


def hub_layout_parquet(root, n=6):
    """A data set laid out as the butterflies repo on the Hub: data/train-*.parquet, an image column and others."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"name": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"name": [f"b{i}" for i in range(n)], "image": images}, features=features)
    (root / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def test_parquet_in_hub_layout_goes_through_load_dataset(tmp_path, monkeypatch):
    root = hub_layout_parquet(tmp_path / "butterflies")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    dm = setup_module_for(root)
    assert calls == [((str(root),), {"split": "train"})]  # the call a Hub id makes, with a local path
    assert len(dm.train_set) == 6 and dm.train_set[0].shape == (3, 16, 16)


@pytest.mark.slow
def test_hub_id_goes_through_load_dataset_and_offline_error_says_what_to_do(monkeypatch):
    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or datasets.Dataset.from_dict({"image": []})
    )
    load_source("huggan/smithsonian_butterflies_subset")
    assert calls == [(("huggan/smithsonian_butterflies_subset",), {"split": "train"})]
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="smithsonian_butterflies_subset.*point --data.dataset at a local folder"):
        load_source("huggan/smithsonian_butterflies_subset")


def test_save_to_disk_folder_and_its_splits(tmp_path):
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert len(setup_module_for(tmp_path / "dd").train_set) == 5
    assert len(setup_module_for(tmp_path / "dd", split="test").train_set) == 2
    with pytest.raises(ValueError, match="--data.split"):
        setup_module_for(tmp_path / "dd", split="validation")


def test_clear_errors_for_bad_sources(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No image files"):
        load_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--data.image_column"):
        setup_module_for(image_folder, image_column="pixels")


def coloured(n: int, red: int = 0) -> datasets.Dataset:
    """n images of 16 px, each one flat colour (red, i, 0): told apart by their pixels."""
    images = [Image.new("RGB", (16, 16), (red, i, 0)) for i in range(n)]
    return datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))


def data_module(dataset, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(dataset=str(dataset), image_size=16, train_batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_val_dataset_and_val_split_name_the_validation_images(tmp_path):
    datasets.DatasetDict({"train": coloured(5), "test": coloured(3, red=200)}).save_to_disk(str(tmp_path / "dd"))
    dm = data_module(tmp_path / "dd", val_dataset=str(tmp_path / "dd"), val_split="test")
    assert len(dm.train_set) == 5
    assert [int(dm.val_set[i][1][0, 0, 0]) for i in range(len(dm.val_set))] == [200, 200, 200]  # the test split
    assert [int(dm.val_set[i][1][1, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert [dm.val_set[i][0] for i in range(3)] == [0, 1, 2]  # (index, image): noise seeded by the index


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


def test_a_single_parquet_file_is_a_data_set(tmp_path):
    coloured(6).to_parquet(str(tmp_path / "one.parquet"))
    dm = data_module(tmp_path / "one.parquet")
    assert [int(dm.train_set[i][1, 0, 0]) for i in range(len(dm.train_set))] == [0, 1, 2, 3, 4, 5]
