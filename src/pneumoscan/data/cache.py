"""Decode a list of images once into a compact uint8 array at the network's input size.

Training epochs then read memory instead of decoding JPEGs again: on a 2-core CPU decoding would otherwise
cost as much as the network. Corrupt images are reported and left out, never silently trained on.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..preprocess import Preprocessing
from .images import ImageReadError, decode
from .layout import Sample


def decode_file(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """One image file as the uint8 (size, size) network input every cache and check holds, decoded as prediction
    decodes it; raises ImageReadError."""
    return prep.to_uint8(decode(path).data)  # as Model.prepare: no float copy of an 8-bit image


def _decode(sample: Sample, prep: Preprocessing) -> np.ndarray | str:
    try:
        return decode_file(sample.path, prep)
    except ImageReadError as exc:
        return str(exc)


def decode_cache(samples: list[Sample], prep: Preprocessing, *, workers: int = 2, desc: str = "decode",
                 progress: bool = True) -> tuple[np.ndarray, list[Sample], list[str]]:
    """(uint8 array (N, size, size), the samples kept in the same order, one message per skipped file)."""
    images: list[np.ndarray] = []
    kept: list[Sample] = []
    skipped: list[str] = []
    # PIL releases the GIL while decoding, so threads overlap decoding without copying arrays between processes.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda s: _decode(s, prep), samples)
        for sample, result in tqdm(zip(samples, results, strict=True), total=len(samples), desc=desc,
                                   disable=not progress, leave=False):
            if isinstance(result, str):
                skipped.append(result)
                print(f"pneumoscan: skipped unreadable image: {result}", file=sys.stderr)
            else:
                images.append(result)
                kept.append(sample)
    array = np.stack(images) if images else np.zeros((0, prep.size, prep.size), np.uint8)
    return array, kept, skipped
