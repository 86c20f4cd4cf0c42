"""What `--data.dataset` names (sources.py): image folders (linked folders, other files), Hub-format parquet folders,
single parquet files, save_to_disk folders and their splits, Hub ids, the validation images, the shipped data set,
and the one-line errors of what is none of these."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from ddpm_lightning.cli import main
from ddpm_lightning.sources import is_hub_id, load_source

from conftest import (
    HELICONIUS,
    ONE_STEP,
    FirstBatch,
    data_module,
    fit_args,
    write_image,
)


@pytest.mark.parametrize(
    "dataset, hub",
    [
        ("huggan/smithsonian_butterflies_subset", True),
        ("mnist", True),
        ("./data/heliconius", False),
        ("/data/photos", False),
        ("a/b/c", False),
        ("bad id!", False),
        (None, False),
        ("", False),
    ],
)
def test_hub_dataset_ids_are_told_from_paths(dataset, hub):
    assert is_hub_id(dataset) is hub


@pytest.mark.slow
def test_linked_folders_are_followed_once_and_other_files_are_counted(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    write_image(photos / "0.png")
    for i in range(5):
        write_image(elsewhere / f"{i}.png", seed=i)
    (photos / "more").symlink_to(elsewhere, target_is_directory=True)
    (photos / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice: counted once
    (elsewhere / "loop").symlink_to(photos, target_is_directory=True)  # a cycle
    (photos / "IMG_1.HEIC").write_bytes(b"not supported")
    (photos / "notes.txt").write_text("x")
    (photos / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"Skipped 2 file\(s\) .*IMG_1.HEIC, notes.txt"):
        main(fit_args(photos, tmp_path / "run", *ONE_STEP, "--trainer.callbacks+=conftest.FirstBatch"))
    assert FirstBatch.images == 6


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
    dm = data_module(root)
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
    assert len(data_module(tmp_path / "dd").train_set) == 5
    assert len(data_module(tmp_path / "dd", split="test").train_set) == 2
    with pytest.raises(ValueError, match="--data.split"):
        data_module(tmp_path / "dd", split="validation")


def coloured(n: int, red: int = 0) -> datasets.Dataset:
    """n images of 16 px, each one flat colour (red, i, 0): told apart by their pixels."""
    images = [Image.new("RGB", (16, 16), (red, i, 0)) for i in range(n)]
    return datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()}))


def test_val_dataset_and_val_split_name_the_validation_images(tmp_path):
    datasets.DatasetDict({"train": coloured(5), "test": coloured(3, red=200)}).save_to_disk(str(tmp_path / "dd"))
    dm = data_module(tmp_path / "dd", val_dataset=str(tmp_path / "dd"), val_split="test")
    assert len(dm.train_set) == 5
    assert [int(dm.val_set[i][1][0, 0, 0]) for i in range(len(dm.val_set))] == [200, 200, 200]  # the test split
    assert [int(dm.val_set[i][1][1, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert [dm.val_set[i][0] for i in range(3)] == [0, 1, 2]  # (index, image): noise seeded by the index


def test_a_single_parquet_file_is_a_data_set(tmp_path):
    coloured(6).to_parquet(str(tmp_path / "one.parquet"))
    dm = data_module(tmp_path / "one.parquet")
    assert [int(dm.train_set[i][1, 0, 0]) for i in range(len(dm.train_set))] == [0, 1, 2, 3, 4, 5]


def test_clear_errors_for_bad_sources(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(str(tmp_path / "missing" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No image files"):
        load_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--data.image_column"):
        data_module(image_folder, image_column="pixels")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["photo.JPG", "img.webp", "archive.zip"])
def test_a_single_file_as_dataset_names_what_to_pass(tmp_path, name):
    path = tmp_path / "data" / name
    if name == "archive.zip":
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.png", write_image(tmp_path / "a.png").read_bytes())
    else:
        write_image(path)
    with pytest.raises(ValueError, match=f"{name} is .*give the folder holding the images"):
        main(fit_args(path, tmp_path / "run", *ONE_STEP))


@pytest.mark.slow
def test_a_column_without_images_is_named(tmp_path):
    import datasets

    rows = datasets.Dataset.from_dict({"image": [str(write_image(tmp_path / "a.png"))], "label": [3]})
    rows.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="Column 'label' holds int64, not images"):
        main(fit_args(tmp_path / "saved", tmp_path / "run", "--data.image_column", "label"))


@pytest.mark.slow
def test_a_folder_with_only_an_empty_csv_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("")
    with pytest.raises(ValueError, match="holds no images and no usable data files"):
        main(fit_args(tmp_path / "data", tmp_path / "run"))


@pytest.mark.parametrize("training", ["folder", "shards"])
def test_an_empty_held_out_folder_is_named_as_the_val_dataset(tmp_path, training):
    """The training images from a folder or prepared shards, the held-out folder empty: the error names
    --data.val_dataset, the option to fix, not --data.dataset."""
    for i in range(8):
        write_image(tmp_path / "photos" / f"{i}.png", seed=i)
    dataset = tmp_path / "photos"
    if training == "shards":
        dataset = tmp_path / "shards"
        main(["prepare", str(tmp_path / "photos"), str(dataset), "--image_size", "16", "--num_workers", "1"])
    (tmp_path / "held_out").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No image files found under \S+held_out .*point --data.val_dataset"):
        data_module(dataset, val_dataset=str(tmp_path / "held_out"))
