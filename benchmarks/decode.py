"""How long the data cache takes to build: every image decoded and resized once (`data.decode_all`), as `fit` does
before its first step, with the loader workers `fit` would use.

    python benchmarks/decode.py                                  # 20,000 PNGs of 16-32 px, made in a temporary folder
    python benchmarks/decode.py --images DIR --size 64 --crop random --workers 8 --repeats 5

Prints one line per pass and a JSON summary (the fastest pass). The made-up images take a few seconds to write,
outside the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_lightning.data.datamodule import default_num_workers
from ddpm_lightning.data.images import ResizedImages, decode_all
from ddpm_lightning.sources import image_column_of, load_source


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` noise PNGs, each side 16 to 32 px."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = rng.integers(16, 33, 2)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder (or any data.dataset); made up when left out")
    parser.add_argument("--count", type=int, default=20_000, help="how many images to make up")
    parser.add_argument("--size", type=int, default=16, help="data.image_size")
    parser.add_argument("--crop", default="squash", choices=["squash", "center", "random"])
    parser.add_argument("--workers", type=int, default=default_num_workers(), help="as fit's default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        source = args.images or make_images(Path(tmp), args.count)
        rows = load_source(str(source))
        images = ResizedImages(rows, image_column_of(rows, None), args.size, args.crop)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            decode_all(images, args.workers)
            seconds.append(time.perf_counter() - start)
            print(f"{len(images)} images, {args.workers} workers: {seconds[-1]:.2f} s", flush=True)
    best = min(seconds)
    summary = {"images": len(images), "size": args.size, "crop": args.crop, "workers": args.workers}
    summary |= {"best_s": round(best, 3), "images_per_s": round(len(images) / best), "cpus": os.cpu_count()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
