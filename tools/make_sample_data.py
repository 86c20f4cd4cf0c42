"""Rebuild data/heliconius/, the sample data set the quick start and the tests train on, from the 224 px
Heliconius photos (CC BY 4.0, see ATTRIBUTION.md): each photo resized to 64 px and stored as JPEG in one parquet
file per split, in the Hub's own layout (an `image` column of the `datasets.Image` feature, files named
`{split}-00000-of-00001.parquet`), so it loads through the same `datasets.load_dataset` call as a Hub data set.

    python tools/make_sample_data.py --source DIR                    # DIR: train/, val/, ATTRIBUTION.md
    python tools/make_sample_data.py --source DIR --size 64 --quality 90

Each row keeps its photo's file name as the image's `path` (the specimen id); its bytes are the resized JPEG.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import datasets
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": "train", "val": "validation"}  # source folder -> split name


def shrink(path: Path, size: int, quality: int) -> dict:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return {"bytes": buffer.getvalue(), "path": path.name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source",
        type=Path,
        required=True,
        help="the 224 px photos: a folder with train/, val/ and ATTRIBUTION.md (they are not in the repository)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "data" / "heliconius")
    p.add_argument("--size", type=int, default=64, help="side of the square photos, in pixels")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image()})
    for folder, split in SPLITS.items():
        rows = [shrink(path, a.size, a.quality) for path in sorted((a.source / folder).iterdir())]
        target = a.out / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(target))
        print(f"{split}: {len(rows)} photos, {target.stat().st_size / 1e6:.2f} MB in {target}")
    attribution = (a.source / "ATTRIBUTION.md").read_text().rstrip()
    (a.out / "ATTRIBUTION.md").write_text(
        f"{attribution}\n\n## This copy\n\nThe same photos (`train/` -> split `train`, `val/` -> split `validation`), "
        f"resized to {a.size} x {a.size} and stored as JPEG (quality {a.quality}) in parquet files by "
        "`tools/make_sample_data.py`. Each image keeps its photo's file name as its `path`. Every photo here is a "
        "training photo: the `test_` / `val_` / `train_` prefixes are the splits of the repository they came from.\n"
    )


if __name__ == "__main__":
    main()
