"""Read JPEG / PNG / DICOM into the one array type the rest of pneumoscan understands.

Contract: ``read_image(source) -> np.ndarray`` float32, shape (H, W), values in [0, 1], 0 = black (air on a
frontal X-ray), whatever the file's bit depth, colour mode or photometric interpretation. Everything that can go
wrong raises ``ImageReadError`` whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import PneumoscanError

# A 2752 px test image is 7.6 MP; 50 MP leaves room for any real radiograph while refusing decompression bombs
# before they are decoded into gigabytes.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024

Source = str | Path | bytes


class ImageReadError(PneumoscanError):
    """An input image that cannot be used; ``str(error)`` is a one-line message naming the file."""


def _name(source: Source, name: str | None) -> str:
    if name:
        return name
    return "<bytes>" if isinstance(source, bytes | bytearray) else str(source)


def _load_bytes(source: Source, name: str) -> bytes:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageReadError(f"{name}: file not found")
        if not path.is_file():
            raise ImageReadError(f"{name}: not a file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageReadError(f"{name}: file is larger than {MAX_FILE_BYTES // 2**20} MiB")
        data = path.read_bytes()
    if not data:
        raise ImageReadError(f"{name}: empty file")
    return data


def is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def read_image(source: Source, *, name: str | None = None, reduce_to: int | None = None,
               info: dict | None = None) -> np.ndarray:
    """Decode ``source`` (a path or the file's bytes) to a float32 grayscale array in [0, 1].

    ``reduce_to``: for JPEG, let the decoder scale by 1/2, 1/4 or 1/8 in the DCT domain while both sides stay
    >= reduce_to (PIL draft mode). That is several times faster for the 2000 px originals, and the subsequent
    antialiased resize to the network size gives practically the same pixels.

    ``info``: a dict that receives what the gray array no longer shows, for the cheap not-an-X-ray checks:
    ``width`` and ``height`` of the stored image (before any draft reduction) and ``colourfulness``
    (Hasler & Suesstrunk 2003, 0..255 scale; 0 for gray images).
    """
    label = _name(source, name)
    data = _load_bytes(source, label)
    info = {} if info is None else info
    if is_dicom(data):
        return _read_dicom(data, label, info)
    return _read_pil(data, label, reduce_to, info)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk colourfulness of a uint8 (H, W, 3) image: ~0 for gray, > 15 for "slightly colourful"."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _colour_of(image: Image.Image) -> float:
    if image.mode in ("L", "LA", "1", "I", "F") or image.mode.startswith("I;"):
        return 0.0
    small = image.copy()
    small.thumbnail((128, 128))  # the statistic needs no detail; keep it cheap on 2000 px originals
    if small.mode in ("RGBA", "LA", "PA") or (small.mode == "P" and "transparency" in small.info):
        rgba = small.convert("RGBA")
        small = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return colourfulness(np.asarray(small.convert("RGB")))


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"{name}: image is {width}x{height} pixels, above the {MAX_PIXELS // 1_000_000} MP limit "
            "(refused as a possible decompression bomb)"
        )


def _read_pil(data: bytes, name: str, reduce_to: int | None, info: dict) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(*image.size, name)
            stored_size = image.size
            if reduce_to and image.format == "JPEG":
                image.draft(image.mode, (reduce_to, reduce_to))
            image.load()
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses before we see the size (>89 MP); say the same as _check_size does.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"has {int(found.group(1)):,} pixels" if found else "is too large"
        raise ImageReadError(
            f"{name}: image {size}, above the {MAX_PIXELS // 1_000_000} MP limit "
            "(refused as a possible decompression bomb)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: not a readable image (expected JPEG, PNG or DICOM)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: corrupt or truncated image ({exc})") from None
    if getattr(image, "n_frames", 1) > 1:
        raise ImageReadError(f"{name}: image has {image.n_frames} frames; expected a single image")
    image_format = image.format
    image = ImageOps.exif_transpose(image)
    info["width"], info["height"] = stored_size  # as stored: the checks using it do not care about orientation
    info["colourfulness"] = _colour_of(image)
    return _pil_to_gray(image, name, image_format)


def _pil_to_gray(image: Image.Image, name: str, image_format: str | None = None) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":  # 32-bit integer mode: 16-bit PNGs on older Pillow versions
        array = np.asarray(image, dtype=np.float32)
        # A PNG in mode I is 16-bit: scale by the bit depth, not by the content (a dark image must stay dark).
        scale = 65535.0 if image_format == "PNG" or array.max() > 255 else 255.0
        return np.clip(array / scale, 0.0, 1.0)
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        lo, hi = float(array.min()), float(array.max())
        return (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent areas become black, the colour of air around a radiograph.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "L":
        image = image.convert("L")  # ITU-R 601-2 luma; identical to any channel for gray RGB
    return np.asarray(image, dtype=np.float32) / 255.0


def _read_dicom(data: bytes, name: str, info: dict) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: corrupt DICOM ({exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM has no pixel data (not an image object)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"{name}: DICOM has {frames} frames; expected a single radiograph")
    _check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), name)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported/corrupt encodings
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "pixel data"
        raise ImageReadError(f"{name}: cannot decode DICOM {what} ({str(exc).splitlines()[0]})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    # What the header says the picture is, for the not-a-chest-radiograph check (predict.dicom_header_check)
    for key, tag in (("modality", "Modality"), ("body_part", "BodyPartExamined"), ("view", "ViewPosition")):
        value = ds.get(tag)
        if value:
            info[key] = str(value).strip().upper()
    info["height"], info["width"] = pixels.shape[:2]
    info["colourfulness"] = 0.0
    if pixels.ndim == 3:  # colour DICOM: pydicom converts YBR to RGB by default
        image = Image.fromarray(np.ascontiguousarray(pixels.astype(np.uint8)), "RGB")
        info["colourfulness"] = _colour_of(image)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    array = apply_modality_lut(pixels, ds).astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # The window is the display the modality chose: map it to [0, 1] as is, without stretching further.
        array = _window(array, ds, name)
    elif "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        array = np.clip(apply_voi_lut(array, ds, index=0).astype(np.float64) / (2**bits - 1), 0.0, 1.0)
    else:  # no display transform stored: stretch min..max, as viewers do
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip to the usual look
        array = 1.0 - array
    return array.astype(np.float32)


def _first(value) -> float:
    """A DS element may hold several values (several windows); the first is the default."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def _window(array: np.ndarray, ds, name: str) -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3) straight to [0, 1]; the first window when several."""
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError):
        raise ImageReadError(f"{name}: DICOM window center/width are not numbers") from None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (array - center) / width))
    if function == "LINEAR_EXACT" and width > 0:
        return np.clip((array - center) / width + 0.5, 0.0, 1.0)
    if function == "LINEAR" and width >= 1:
        if width == 1:
            return (array > center - 0.5).astype(np.float64)
        return np.clip((array - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    raise ImageReadError(f"{name}: unsupported DICOM VOI LUT function {function!r} with window width {width}")
