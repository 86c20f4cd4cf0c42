"""Another collection for the fine-tuning rows of benchmarks/RESULTS.md: scikit-learn's handwritten digits (1,797
scans of 8x8 pixels, 17 grey levels, shipped in its wheel) written as PNG files, a training folder and a held-out one.

    pip install --target /tmp/sk --no-deps scikit-learn narwhals joblib threadpoolctl   # this script only; numpy
    # and scipy from the project's venv
    PYTHONPATH=/tmp/sk python benchmarks/digits_folder.py DIR --train 748 --held-out 200

DIR/train gets the first `--train` digits and DIR/held the next `--held-out` (the data set cycles through the ten
digits, so both hold all ten), as 8-bit greyscale PNGs, ink light on dark, grey level g written as round(g * 255 / 16);
`fit` makes them RGB and resizes them to `data.image_size` as it does any image folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=748)
    parser.add_argument("--held-out", type=int, default=200)
    a = parser.parse_args()
    digits = load_digits().images  # (1797, 8, 8), grey levels 0..16
    if a.train + a.held_out > len(digits):
        parser.error(f"--train {a.train} + --held-out {a.held_out}: there are {len(digits)} digits")
    pixels = np.round(digits * 255 / 16).astype(np.uint8)
    for name, start, count in (("train", 0, a.train), ("held", a.train, a.held_out)):
        folder = a.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            Image.fromarray(pixels[i]).save(folder / f"digit-{i:04d}.png")
        print(f"{count} digits in {folder}")


if __name__ == "__main__":
    main()
