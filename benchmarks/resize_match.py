"""Which resize made the 224 px Kermany train copies, and does pneumoscan's preprocessing resize originals the same way?

The train split is only available as 224 px copies; validation, test and every user's X-ray arrive at original
resolution and are squashed to 224 px by ``Preprocessing.resize``. A different filter would be a shift between
training and use. This compares high-frequency statistics of the train copies with the official 16-image val split
(originals; never the test split) resized by several filters and then saved the way the copies were: RGB JPEG,
quality 75, 4:2:0 (the copies' quantisation tables are libjpeg's quality-75 ones, Pillow's default).

Statistics per image, averaged (closer to the train copies is a better match):
  lap/std   mean |Laplacian| over the intensity standard deviation (edge energy)
  high      share of spectral energy above 0.25 cycles/pixel, x1000 (aliasing and fine detail)
  mid       share between 0.1 and 0.25 cycles/pixel, x1000

Usage: python benchmarks/resize_match.py [--data ../shared/data/chest_xray] [--train-every 15]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SIZE = 224


def statistics(image: np.ndarray) -> tuple[float, float, float]:
    a = image.astype(np.float64)
    lap = np.abs(cv2.Laplacian(a, cv2.CV_64F)).mean() / (a.std() + 1e-9)
    power = np.abs(np.fft.fftshift(np.fft.fft2(a - a.mean()))) ** 2
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    radius = np.hypot(yy - a.shape[0] // 2, xx - a.shape[1] // 2) / a.shape[0]
    total = power[radius > 0.02].sum()
    return lap, 1e3 * power[radius > 0.25].sum() / total, 1e3 * power[(radius > 0.1) & (radius <= 0.25)].sum() / total


def as_train_copy(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG")  # Pillow's defaults: quality 75, 4:2:0, as the copies were saved
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("L"))


def _cv2(interpolation: int):
    return lambda im: Image.fromarray(cv2.resize(np.asarray(im), (SIZE, SIZE), interpolation=interpolation))


FILTERS = {
    "Pillow bilinear, antialiased (pneumoscan)": lambda im: im.resize((SIZE, SIZE), Image.Resampling.BILINEAR),
    "Pillow bicubic, antialiased": lambda im: im.resize((SIZE, SIZE), Image.Resampling.BICUBIC),
    "Pillow Lanczos, antialiased": lambda im: im.resize((SIZE, SIZE), Image.Resampling.LANCZOS),
    "Pillow box": lambda im: im.resize((SIZE, SIZE), Image.Resampling.BOX),
    "Pillow nearest (Keras load_img default)": lambda im: im.resize((SIZE, SIZE), Image.Resampling.NEAREST),
    "OpenCV area": _cv2(cv2.INTER_AREA),
    "OpenCV linear (no antialiasing)": _cv2(cv2.INTER_LINEAR),
    "OpenCV cubic (no antialiasing)": _cv2(cv2.INTER_CUBIC),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    parser.add_argument("--train-every", type=int, default=15, help="use every n-th train copy")
    args = parser.parse_args()

    train = sorted((args.data / "train").glob("*/*.jpeg"))[:: args.train_every]
    originals = sorted((args.data / "val").glob("*/*.jpeg"))
    rows = [(f"train copies ({len(train)} images)", np.array([statistics(np.asarray(Image.open(p).convert("L")))
                                                              for p in train]).mean(axis=0))]
    for name, resize in FILTERS.items():
        stats = [statistics(as_train_copy(resize(Image.open(p).convert("L")))) for p in originals]
        rows.append((f"val originals ({len(originals)}): {name}", np.array(stats).mean(axis=0)))
    print(f"{'source':<62} {'lap/std':>8} {'high':>8} {'mid':>8}")
    for name, (lap, high, mid) in rows:
        print(f"{name:<62} {lap:8.4f} {high:8.1f} {mid:8.1f}")


if __name__ == "__main__":
    main()
