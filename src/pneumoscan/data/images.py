"""Decode JPEG / PNG / TIFF / BMP / GIF / WebP / PNM / DICOM into the one value the rest of pneumoscan understands.

Contract: ``decode(source) -> DecodedImage``: the gray image, 0 = black (air on a frontal X-ray), whatever the
file's bit depth, colour mode or photometric interpretation, together with what the file said that the gray array
no longer shows (stored size, colourfulness, DICOM header fields). ``data`` keeps the image at the depth the file
had: uint8 for 8-bit files (JPEG, 8-bit PNG: most inputs), float32 in [0, 1] for deeper ones (16-bit PNG, DICOM);
``pixels`` is always the float32 [0, 1] view, made on demand. Skipping the float copy of an 8-bit image halves
the cost of screening one (the network input is uint8 either way, see ``Preprocessing.to_uint8``). Keeping both in one value
means no route can screen the pixels while dropping the header: the not-an-X-ray checks read both.

Every format is decoded at full resolution, so the same pixels give the same network input whatever the
container (JPEG draft-mode decoding moved probabilities by up to 0.07). Only images longer than
``REDUCE_ABOVE`` px a side are reduced while decoding, by the same power-of-two factor for every format (JPEG in
the DCT domain, others by box averaging), to bound memory. Everything that can go wrong raises ``ImageReadError``
whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import io
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import PneumoscanError

# A 2752 px test image is 7.6 MP; 50 MP leaves room for any real radiograph while refusing decompression bombs
# before they are decoded into gigabytes.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 200 * 1024 * 1024

Source = str | Path | bytes
# Longer sides above this are reduced while decoding, by a power of two that keeps them >= REDUCE_TO. No Kermany
# original reaches it (2752 px at most); a 7000 px scan is decoded at 3500 px, a quarter of the memory.
REDUCE_ABOVE = 4096
REDUCE_TO = 2048


@dataclass(frozen=True)
class DicomHeader:
    """The DICOM attributes pneumoscan acts on: the checks (modality, body part, view) and the identifiers a
    result must reference. No patient attributes: nothing here may identify a person in a log."""

    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    photometric: str = "MONOCHROME2"
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    age_years: float | None = None  # PatientAge (or birth and study dates): the intended-population check only
    manufacturer: str | None = None  # what drift monitoring groups by (with modality, view and photometric)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels plus what the file said about them, the input of every screening route."""

    data: np.ndarray = field(repr=False)  # uint8 (H, W) for 8-bit files, else float32 (H, W) in [0, 1]
    name: str = "<array>"
    format: str = "array"  # jpeg | png | tiff | bmp | dicom | array
    width: int = 0  # as stored, before any reduction: the size checks judge the acquisition, not our decoding
    height: int = 0
    colourfulness: float = 0.0  # Hasler & Suesstrunk 2003, 0..255 scale; 0 for gray images
    dicom: DicomHeader | None = None

    @classmethod
    def from_array(cls, array: np.ndarray, name: str = "<array>") -> DecodedImage:
        """A float (H, W) array in [0, 1] with no file behind it: only the header check is skipped (there is no
        header); the colour, size, aspect and content checks still see it."""
        array = np.asarray(array, dtype=np.float32)
        if array.ndim != 2:
            raise ImageReadError(f"{name}: expected a grayscale (H, W) array, got shape {array.shape}")
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageReadError(f"{name}: array values must be finite and in [0, 1]")
        return cls(array, name, "array", array.shape[1], array.shape[0])

    @cached_property
    def pixels(self) -> np.ndarray:
        """float32 (H, W) in [0, 1], whatever the depth of ``data``."""
        if self.data.dtype == np.uint8:
            return self.data.astype(np.float32) / np.float32(255.0)
        return self.data


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


# The one list of file formats every route accepts: ``decode`` opens no other (Pillow is told these plug-ins
# only), the HTTP service checks uploads with ``sniff``, folders are walked for ``SUFFIXES``, and the help texts
# and pages print ``FORMAT_NAMES``. Pillow's name -> ours; MPO is how Pillow opens many cameras' JPEGs.
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "GIF": "gif",
            "WEBP": "webp", "PPM": "pnm"}
_PIL_OPENERS = ["JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM"]  # the JPEG opener also opens MPO files
FORMAT_NAMES = "JPEG, PNG, TIFF, BMP, GIF, WebP, PNM (PGM/PPM) or DICOM"
SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm",
                      ".pbm", ".dcm"})


def sniff(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce ('jpeg', 'png', ..., 'dicom'), or None: a cheap check
    before any decoding, agreeing with what ``decode`` opens."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pnm"
    if is_dicom(data):
        return "dicom"
    return None


def decode(source: Source | DecodedImage | np.ndarray, *, name: str | None = None,
           max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """The one decoding entry point: a path, the file's bytes, a float (H, W) array in [0, 1] (no header), a
    pydicom ``Dataset`` already parsed, or an already decoded image (returned as is).

    ``max_pixels``: larger images are refused before they are decoded (decompression bombs).
    """
    if isinstance(source, DecodedImage):
        return source
    if isinstance(source, np.ndarray):
        return DecodedImage.from_array(source, name or "<array>")
    if _is_dataset(source):  # parsed once by a route that needs its header too (the DICOM node)
        label, data = name or "<dataset>", None
    else:
        label = _name(source, name)
        data = _load_bytes(source, label)
    try:
        if data is None:
            return _decode_dataset(source, label, max_pixels)
        if is_dicom(data):
            return _read_dicom(data, label, max_pixels)
        return _read_pil(data, label, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(f"{label}: not enough memory to decode this image") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        # A malformed file can make any decoder raise anything, even a BaseException (a Rust decoder's panic
        # surfaces as pyo3's PanicException): it is that file's error, not the batch's.
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{label}: corrupt or unreadable image ({detail})") from None


def reduce_factor(width: int, height: int) -> int:
    """The power of two every format's decoder divides a side by (1 for any image up to ``REDUCE_ABOVE`` px)."""
    factor = 1
    while max(width, height) / factor > REDUCE_ABOVE and max(width, height) / (2 * factor) >= REDUCE_TO:
        factor *= 2
    return factor


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


def _check_size(width: int, height: int, name: str, max_pixels: int = MAX_PIXELS) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name}: image is {width}x{height} pixels, above the {max_pixels / 1_000_000:g} MP limit "
            "(refused as a possible decompression bomb; see --max-megapixels)"
        )


def _read_pil(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PIL_OPENERS)
            _check_size(*image.size, name, max_pixels)
            stored_size = image.size
            factor = reduce_factor(*stored_size)
            if factor > 1 and image.format == "JPEG":
                # DCT-domain scaling: the decoder never holds the full-size image
                image.draft(image.mode, (stored_size[0] // factor, stored_size[1] // factor))
            image.load()
            if factor > 1 and image.size == stored_size:  # formats without a reduced decode: box-average
                image = image.reduce(factor)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses before we see the size (>89 MP); say the same as _check_size does.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"has {int(found.group(1)):,} pixels" if found else "is too large"
        raise ImageReadError(
            f"{name}: image {size}, above the {max_pixels / 1_000_000:g} MP limit "
            "(refused as a possible decompression bomb; see --max-megapixels)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{name}: not a readable image (expected {FORMAT_NAMES})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: corrupt or truncated image ({str(exc).splitlines()[0][:200]})") from None
    if getattr(image, "n_frames", 1) > 1:
        raise ImageReadError(f"{name}: image has {image.n_frames} frames; expected a single image")
    image_format = image.format or Image.open(io.BytesIO(data), formats=_PIL_OPENERS).format
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation; exif_transpose would copy even when upright
        image = ImageOps.exif_transpose(image)
    pixels = _pil_to_gray(image, name, image_format)
    return DecodedImage(pixels, name, _FORMATS.get(image_format or "", (image_format or "image").lower()),
                        stored_size[0], stored_size[1], _colour_of(image))


def _pil_to_gray(image: Image.Image, name: str, image_format: str | None = None) -> np.ndarray:
    """uint8 (H, W) for 8-bit modes, float32 (H, W) in [0, 1] for 16-bit, 32-bit integer and float modes."""
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
    return np.asarray(image, dtype=np.uint8)


def _header(ds) -> DicomHeader:
    def text(tag: str) -> str | None:
        value = ds.get(tag)
        return str(value).strip().upper() if value not in (None, "") else None

    def uid(tag: str, where=None) -> str | None:
        value = (where if where is not None else ds).get(tag)
        return str(value) if value else None

    meta = getattr(ds, "file_meta", None)
    return DicomHeader(
        modality=text("Modality"), body_part=text("BodyPartExamined"), view=text("ViewPosition"),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper(),
        sop_class_uid=uid("SOPClassUID"), sop_instance_uid=uid("SOPInstanceUID"),
        study_instance_uid=uid("StudyInstanceUID"), series_instance_uid=uid("SeriesInstanceUID"),
        transfer_syntax_uid=uid("TransferSyntaxUID", meta) if meta is not None else None,
        age_years=patient_age_years(ds), manufacturer=text("Manufacturer"),
    )


_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def patient_age_years(ds) -> float | None:
    """The patient's age in years at the study, from PatientAge ("074Y", "018M", "003W", "010D"), else from
    PatientBirthDate and StudyDate (or AcquisitionDate); None when the header does not say or says it badly (a
    malformed age is no reason to refuse an image, so it is treated as unknown)."""
    from datetime import date

    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNITS:
        return int(age[:3]) * _AGE_UNITS[age[3]]

    def day(text) -> date | None:
        text = str(text or "").strip()
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
        except ValueError:
            return None

    born = day(ds.get("PatientBirthDate"))
    seen = day(ds.get("StudyDate")) or day(ds.get("AcquisitionDate"))
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def _int_tag(ds, tag: str, default: int, name: str) -> int:
    value = ds.get(tag, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise ImageReadError(f"{name}: DICOM {tag} is not a number ({str(value)[:40]!r})") from None


def _read_dicom(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise ImageReadError(f"{name}: corrupt DICOM ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    return _decode_dataset(ds, name, max_pixels)


def _is_dataset(source) -> bool:
    module = sys.modules.get("pydicom.dataset")  # not imported yet: the source cannot be one of its Datasets
    return module is not None and isinstance(source, module.Dataset)


def _decode_dataset(ds, name: str, max_pixels: int) -> DecodedImage:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{name}: DICOM has no pixel data (not an image object)")
    frames = _int_tag(ds, "NumberOfFrames", 1, name) or 1
    if frames > 1:
        raise ImageReadError(f"{name}: DICOM has {frames} frames; expected a single radiograph")
    _check_size(_int_tag(ds, "Columns", 0, name), _int_tag(ds, "Rows", 0, name), name, max_pixels)
    header = _header(ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported/corrupt encodings
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {getattr(syntax, 'name', syntax)}" if syntax is not None else "pixel data"
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{name}: cannot decode DICOM {what} ({detail})") from None
    if pixels.ndim not in (2, 3) or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageReadError(f"{name}: DICOM pixel data has shape {pixels.shape}; expected one 2-D image")
    height, width = pixels.shape[:2]
    factor = reduce_factor(width, height)
    if pixels.ndim == 3:  # colour DICOM: pydicom converts YBR to RGB by default
        if pixels.shape[2] != 3:
            raise ImageReadError(f"{name}: DICOM has {pixels.shape[2]} samples per pixel; expected 1 or 3")
        image = Image.fromarray(np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)), "RGB")
        if factor > 1:
            image = image.reduce(factor)
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        return DecodedImage(gray, name, "dicom", width, height, _colour_of(image), header)
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    modality = apply_modality_lut(pixels, ds)
    array = modality.astype(np.float64)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # The window is the display the modality chose: map it to [0, 1] as is, without stretching further.
        array = _window(array, ds, name)
    elif "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        if np.issubdtype(modality.dtype, np.floating) and np.array_equal(modality, np.round(modality)):
            modality = modality.astype(np.int64)  # a LUT is indexed by integers; pydicom mis-reads float input
        array = np.clip(apply_voi_lut(modality, ds, index=0).astype(np.float64) / (2**bits - 1), 0.0, 1.0)
    else:  # no display transform stored: stretch min..max, as viewers do
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    if header.photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; flip to the usual look
        array = 1.0 - array
    if not np.isfinite(array).all():
        raise ImageReadError(f"{name}: DICOM pixel values are not finite after its LUTs")
    if factor > 1:  # box-average, as Image.reduce does for the other formats
        h, w = height // factor * factor, width // factor * factor
        array = array[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return DecodedImage(array.astype(np.float32), name, "dicom", width, height, 0.0, header)


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
