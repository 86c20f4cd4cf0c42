"""Where images come from: image folders, Hub-format local data sets, save_to_disk folders, Hub ids."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import HELICONIUS, write_image
from ddpm_lightning.data import ImageDataModule, load_source


def setup_module_for(dataset, **kwargs) -> ImageDataModule:
    dm = ImageDataModule(dataset=str(dataset), image_size=16, train_batch_size=4, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def test_image_folder_loads_every_image_whatever_the_name(image_folder, caplog):
    dm = setup_module_for(image_folder)
    assert len(dm.train_set) == 12  # imagefolder would have split test_* and val_* away
    assert "Found 12 training images" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0


@pytest.mark.skipif(not HELICONIUS.is_dir(), reason="../shared/data/heliconius is not beside the checkout")
def test_all_1000_heliconius_photos_train():
    names = [p.name for p in HELICONIUS.iterdir()]
    assert any(n.startswith("test_") for n in names) and any(n.startswith("val_") for n in names)
    assert len(load_source(str(HELICONIUS))) == len(names) == 1000


def test_converts_grayscale_rgba_and_palette_images(tmp_path):
    write_image(tmp_path / "gray.png", mode="L")
    write_image(tmp_path / "rgba.png", mode="RGBA")
    Image.open(write_image(tmp_path / "rgb.png")).convert("P").save(tmp_path / "palette.png")
    dm = setup_module_for(tmp_path)
    assert len(dm.train_set) == 4
    assert all(dm.train_set[i].shape == (3, 16, 16) for i in range(4))


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


def test_hub_id_goes_through_load_dataset_and_offline_error_says_what_to_do(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or datasets.Dataset.from_dict({"image": []}))
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
