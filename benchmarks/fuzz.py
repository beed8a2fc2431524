"""Fuzz the readers, the batch predictor, the command line and the HTTP server with mutated real X-rays.

Seeded and reproducible: case ``i`` of ``--seed S`` depends on (S, i) only, so one case can be regenerated alone
(``--only I --keep DIR``). Every case starts from a real chest X-ray of the Kermany test split, shrunk to ``--size``
px and stored as JPEG, PNG or DICOM (several encodings of each), then gets one to three mutations: bit flips,
byte overwrites, truncations, deleted or duplicated spans, appended garbage; PNG IHDR fields (huge or zero
width/height, odd bit depths and colour types), JPEG SOF fields (huge or zero dimensions, precision, component
counts) and EXIF orientation; DICOM header fields (Rows, Columns, BitsAllocated, BitsStored, NumberOfFrames,
PhotometricInterpretation, WindowCenter/Width, RescaleSlope, TransferSyntaxUID, ...) set to odd values, deleted,
or written with the wrong value representation or length.

Every case goes to
  (a) ``Model.predict_files`` in batches: an exception escaping it is a traceback; every file must get a row;
  (b) ``pneumoscan predict FILES --csv OUT`` in a subprocess: a "Traceback" on stderr, a missing CSV or a row
      count other than the file count is a failure;
  (c) ``POST /v1/predict`` on a real uvicorn server in a thread (``serve_in_thread``): any 5xx is a failure, and
      so is an exception logged by the server.

    python benchmarks/fuzz.py --n 10000 --seed 0
    python benchmarks/fuzz.py --n 200 --seed 0 --only 17 --keep /tmp/case17   # regenerate one case
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import io
import json
import logging
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = ROOT.parent / "shared" / "data" / "chest_xray" / "test"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass
class Case:
    index: int
    base: str  # "<x-ray stem> <encoding>"
    ext: str
    ops: list[str]
    data: bytes

    @property
    def filename(self) -> str:
        return f"fuzz_{self.index:05d}.{self.ext}"

    def describe(self) -> str:
        return f"case {self.index}: {self.base}, {len(self.data)} bytes; " + "; ".join(self.ops or ["unmutated"])


# ---- base files: real X-rays in several encodings -----------------------------------------------------------


def source_xrays(count: int, size: int, seed: int, folder: Path = TEST_IMAGES) -> list[tuple[str, np.ndarray]]:
    """``count`` real X-rays (both classes), gray uint8, longest side ``size`` px, chosen by ``seed``."""
    files = sorted(folder.glob("NORMAL/*.jpeg")) + sorted(folder.glob("PNEUMONIA/*.jpeg"))
    if not files:
        raise SystemExit(f"no X-rays under {folder}")
    picked = random.Random(seed).sample(files, min(count, len(files)))
    return [(path.stem, load_xray(path, size)) for path in picked]


def load_xray(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("L", (size, size))
        gray = image.convert("L")
        gray.thumbnail((size, size), Image.Resampling.BILINEAR)
        return np.asarray(gray)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, *, syntax: str = "1.2.840.10008.1.2.1", mono1: bool = False,
           window: bool = True) -> bytes:
    from pydicom import uid
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    # A UID derived from the content, not a random one: the same case is the same bytes on every run.
    entropy = [hashlib.sha256(pixels.tobytes()).hexdigest(), syntax, str(mono1), str(window)]
    meta.MediaStorageSOPInstanceUID = uid.generate_uid(entropy_srcs=entropy)
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = FileDataset("fuzz.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "Fuzz^Case"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    bits = 12 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter = 2 ** (bits - 1)
        ds.WindowWidth = 2**bits
        ds.RescaleSlope = 1
        ds.RescaleIntercept = 0
    ds.PixelData = (pixels.max() - pixels if mono1 else pixels).astype(pixels.dtype).tobytes()
    if syntax == uid.ImplicitVRLittleEndian:
        meta.TransferSyntaxUID = syntax
    elif syntax == uid.JPEGBaseline8Bit:
        from pydicom.encaps import encapsulate

        meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([_save(Image.fromarray(pixels, "L"), "JPEG", quality=90)])
        ds["PixelData"].VR = "OB"
    elif syntax != uid.ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def base_files(xrays: list[tuple[str, np.ndarray]]) -> list[tuple[str, str, bytes]]:
    """(label, extension, bytes) for every X-ray in every encoding this machine can write."""
    import importlib.util

    from pydicom import uid

    out = []
    for stem, gray in xrays:
        image = Image.fromarray(gray, "L")
        twelve = (gray.astype(np.uint16) * 16 + (gray.astype(np.uint16) >> 4)).astype(np.uint16)
        out += [
            (f"{stem} jpeg", "jpeg", _save(image, "JPEG", quality=90)),
            (f"{stem} jpeg-progressive-rgb", "jpeg", _save(image.convert("RGB"), "JPEG", quality=75,
                                                          progressive=True)),
            (f"{stem} png8", "png", _save(image, "PNG")),
            (f"{stem} png16", "png", _save(Image.fromarray((twelve * 16).astype("<u2")), "PNG")),
            (f"{stem} png-rgba", "png", _save(image.convert("RGBA"), "PNG")),
            (f"{stem} dcm16", "dcm", _dicom(twelve)),
            (f"{stem} dcm8-mono1-implicit", "dcm", _dicom(gray, syntax=uid.ImplicitVRLittleEndian, mono1=True,
                                                          window=False)),
            (f"{stem} dcm-rle", "dcm", _dicom(twelve, syntax=uid.RLELossless)),
            (f"{stem} dcm-j2k", "dcm", _dicom(twelve, syntax=uid.JPEG2000Lossless)),
            (f"{stem} dcm-jpeg8", "dcm", _dicom(gray, syntax=uid.JPEGBaseline8Bit)),
        ]
        if importlib.util.find_spec("jpeg_ls") is not None:  # pyjpegls, a dev extra
            out.append((f"{stem} dcm-jpegls", "dcm", _dicom(twelve, syntax=uid.JPEGLSLossless)))
    return out


# ---- generic byte mutations -----------------------------------------------------------------------------------

INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]


def bit_flips(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    n = rng.choice([1, 2, 4, 8, 32, 128])
    lo = rng.choice([0, 0, len(buf) // 2])  # half of the flips land in the first half: the headers
    for _ in range(n):
        pos = rng.randrange(lo, len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf), f"{n} bit flips from byte {lo}"


def overwrite(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    n = rng.choice([1, 4, 16])
    head = min(len(buf), rng.choice([64, 512, len(buf)]))
    for _ in range(n):
        buf[rng.randrange(head)] = rng.choice(INTERESTING + [rng.randrange(256)])
    return bytes(buf), f"{n} bytes overwritten in the first {head}"


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice([rng.randrange(1, 200), rng.randrange(len(data)), len(data) - rng.randrange(1, 64)])
    cut = max(1, min(cut, len(data) - 1))
    return data[:cut], f"truncated to {cut} of {len(data)} bytes"


def splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.choice([1, 16, 256, 4096]))
    if rng.random() < 0.5:
        return data[:a] + data[b:], f"bytes {a}:{b} deleted"
    return data[:b] + data[a:b] * rng.choice([1, 2, 16]) + data[b:], f"bytes {a}:{b} repeated"


def append(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 100, 5000])))
    return data + extra, f"{len(extra)} random bytes appended"


GENERIC = [bit_flips, overwrite, truncate, splice, append]


# ---- PNG: chunk-level edits --------------------------------------------------------------------------------------


def _png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]] | None:
    """(offset, type, payload) of each chunk, or None for data that is no longer a parseable PNG."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((pos, kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def _chunk(kind: bytes, payload: bytes, crc: bool = True) -> bytes:
    check = zlib.crc32(kind + payload) if crc else zlib.crc32(kind + payload) ^ 0xFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", check)


def png_ihdr(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    chunks = _png_chunks(data)
    if not chunks or chunks[0][1] != b"IHDR" or len(chunks[0][2]) != 13:
        return bit_flips(data, rng)
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][2])
    field_ = rng.choice(["size", "size", "depth", "colour", "flags"])
    if field_ == "size":
        huge = [0, 1, 65535, 100_000, 2**31 - 1, 2**32 - 1, width * 50, height + 1]
        width, height = rng.choice(huge + [width]), rng.choice(huge + [height])
        what = f"IHDR width x height = {width} x {height}"
    elif field_ == "depth":
        depth = rng.choice([0, 1, 2, 3, 4, 16, 32, 255])
        what = f"IHDR bit depth = {depth}"
    elif field_ == "colour":
        colour = rng.choice([1, 2, 3, 4, 5, 6, 7, 255])
        what = f"IHDR colour type = {colour}"
    else:
        comp, filt, interlace = rng.choice([0, 1]), rng.choice([0, 9]), rng.choice([0, 1, 2])
        what = f"IHDR compression/filter/interlace = {comp}/{filt}/{interlace}"
    crc = rng.random() < 0.8
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, comp, filt, interlace), crc)
    return data[:8] + ihdr + data[8 + 25:], what + ("" if crc else ", CRC wrong")


def png_chunk(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    chunks = _png_chunks(data)
    if not chunks:
        return bit_flips(data, rng)
    idats = [c for c in chunks if c[1] == b"IDAT"]
    choice = rng.choice(["length", "actl", "text", "drop-idat"])
    if choice == "length" and idats:
        offset = idats[0][0]
        value = rng.choice([0, 2**31 - 1, 2**32 - 1, len(idats[0][2]) + 1])
        return data[:offset] + struct.pack(">I", value) + data[offset + 4:], f"IDAT declared length {value}"
    if choice == "actl":  # an APNG animation control chunk claiming many frames
        frames = rng.choice([0, 2, 2**31 - 1])
        return data[:33] + _chunk(b"acTL", struct.pack(">II", frames, 0)) + data[33:], f"acTL with {frames} frames"
    if choice == "text":
        payload = b"Comment\0" + bytes(rng.randrange(256) for _ in range(rng.choice([10, 10_000])))
        kind = rng.choice([b"tEXt", b"zTXt", b"iCCP", b"eXIf"])
        return data[:33] + _chunk(kind, payload) + data[33:], f"{kind.decode()} chunk of {len(payload)} bytes"
    if idats:
        offset, _, payload = idats[-1]
        return data[:offset] + data[offset + 12 + len(payload):], "last IDAT chunk removed"
    return bit_flips(data, rng)


# ---- JPEG: marker-level edits ------------------------------------------------------------------------------------

SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset of the 0xFF, marker, segment length) of each header segment up to the first SOS."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((pos, marker, length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def jpeg_sof(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    sof = [s for s in _jpeg_segments(data) if s[1] in SOF_MARKERS]
    if not sof:
        return bit_flips(data, rng)
    pos = sof[0][0]
    buf = bytearray(data)
    field_ = rng.choice(["size", "size", "precision", "components", "sampling", "marker"])
    if field_ == "size":
        height = rng.choice([0, 1, 16, 30_000, 65_500, 65_535])
        width = rng.choice([0, 1, 16, 30_000, 65_500, 65_535])
        buf[pos + 5:pos + 9] = struct.pack(">HH", height, width)
        return bytes(buf), f"SOF height x width = {height} x {width}"
    if field_ == "precision":
        buf[pos + 4] = rng.choice([0, 1, 12, 16, 255])
        return bytes(buf), f"SOF precision = {buf[pos + 4]}"
    if field_ == "components":
        buf[pos + 9] = rng.choice([0, 2, 3, 4, 255])
        return bytes(buf), f"SOF component count = {buf[pos + 9]}"
    if field_ == "sampling":
        buf[pos + 11] = rng.choice([0x00, 0x44, 0xFF, 0x15])
        return bytes(buf), f"SOF sampling factors = 0x{buf[pos + 11]:02X}"
    buf[pos + 1] = rng.choice([0xC1, 0xC2, 0xC3, 0xC5, 0xCF])
    return bytes(buf), f"SOF marker = 0xFF{buf[pos + 1]:02X}"


def jpeg_segment(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    segments = _jpeg_segments(data)
    if not segments:
        return bit_flips(data, rng)
    choice = rng.choice(["length", "exif", "no-eoi", "drop"])
    if choice == "length":
        pos, marker, _ = rng.choice(segments)
        value = rng.choice([0, 1, 2, 0xFFFF])
        return data[:pos + 2] + struct.pack(">H", value) + data[pos + 4:], f"0xFF{marker:02X} length = {value}"
    if choice == "exif":  # EXIF orientation is applied on decode: odd values and broken IFDs
        orientation = rng.choice([0, 2, 5, 8, 9, 65535])
        count = rng.choice([1, 1, 0xFFFF])
        ifd = b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", count) + struct.pack("<HHIHH", 0x0112, 3, 1,
                                                                                       orientation, 0)
        ifd += b"\0\0\0\0"
        app1 = b"\xff\xe1" + struct.pack(">H", len(ifd) + 8) + b"Exif\0\0" + ifd
        return data[:2] + app1 + data[2:], f"EXIF Orientation = {orientation}, IFD entry count {count}"
    if choice == "no-eoi":
        return data.rstrip(b"\xff\xd9")[:-rng.randrange(1, 100)], "EOI and the scan's tail removed"
    pos, marker, length = rng.choice(segments[:-1] or segments)
    return data[:pos] + data[pos + 2 + length:], f"segment 0xFF{marker:02X} removed"


# ---- DICOM: element-level edits -----------------------------------------------------------------------------------

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
TS_TAG = 0x00020010


def _walk(data: bytes, start: int, explicit: bool, stop_group: int | None = None):
    """(tag, start, end) of the elements from ``start`` up to pixel data, an undefined length or a parse
    failure (the edits only ever touch elements before those)."""
    pos = start
    while pos + 8 <= len(data):
        group, element = struct.unpack("<HH", data[pos:pos + 4])
        tag = group << 16 | element
        if stop_group is not None and group != stop_group:
            return
        vr = data[pos + 4:pos + 6].decode("latin-1") if explicit else ""
        if explicit and vr in LONG_VRS:
            if pos + 12 > len(data):
                return
            length, header = struct.unpack("<I", data[pos + 8:pos + 12])[0], 12
        elif explicit:
            length, header = struct.unpack("<H", data[pos + 6:pos + 8])[0], 8
        else:
            length, header = struct.unpack("<I", data[pos + 4:pos + 8])[0], 8
        if length == 0xFFFFFFFF or tag >= 0x7FE00010:
            yield tag, pos, None
            return
        yield tag, pos, pos + header + length
        pos += header + length


def _encode(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    if len(value) % 2:
        value += b" " if vr in {"AE", "AS", "CS", "DA", "DS", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI"} \
            else b"\0"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _dicom_layout(data: bytes) -> tuple[int, bool] | None:
    """(offset of the dataset after the file meta, explicit VR?) or None when the meta no longer parses."""
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    end, syntax = 132, None
    for tag, begin, stop in _walk(data, 132, True, stop_group=0x0002):
        if stop is None:
            return None
        if tag == TS_TAG:
            syntax = data[begin + 8:stop].rstrip(b"\0 ").decode("latin-1", "replace")
        end = stop
    return end, syntax != "1.2.840.10008.1.2"


def set_element(data: bytes, tag: int, vr: str, value: bytes | None) -> bytes | None:
    """``data`` with element ``tag`` replaced (or inserted in order, or deleted when ``value`` is None)."""
    layout = _dicom_layout(data)
    if layout is None:
        return None
    if tag >> 16 == 0x0002:
        start, explicit, group_start = 132, True, 132
    else:
        (start, explicit), group_start = layout, None
    out = None
    for found, begin, end in _walk(data, start, explicit, stop_group=0x0002 if group_start else None):
        if end is None and found != tag and found < tag:
            return None
        if found == tag and end is not None:
            new = b"" if value is None else _encode(tag, vr, value, explicit)
            out = data[:begin] + new + data[end:]
            break
        if found > tag:
            if value is None:
                return data
            out = data[:begin] + _encode(tag, vr, value, explicit) + data[begin:]
            break
    if out is None:
        return None
    if group_start is not None:  # keep the file meta group length true, or the rest of the file shifts
        meta = list(_walk(out, 132, True, stop_group=0x0002))
        if meta and meta[0][0] == 0x00020000:
            length = meta[-1][2] - meta[0][2]
            out = out[:meta[0][2] - 4] + struct.pack("<I", length) + out[meta[0][2]:]
    return out


def _us(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


def _text(value: str) -> bytes:
    return value.encode("latin-1")


# keyword -> (tag, VR, [(label, VR or None for the tag's own, value bytes or None to delete)])
_NUMBERS = ["abc", "", "nan", "inf", "-inf", "1e308", "-1e308", "1e999", "0", "1\\2\\x", "2048\\", " 12 "]
DICOM_FIELDS: dict[str, tuple[int, str, list[tuple[str | None, bytes | None]]]] = {
    "Rows": (0x00280010, "US", [(None, _us(0)), (None, _us(1)), (None, _us(65535)), (None, _us(3)),
                                (None, b""), (None, _us(512, 512)), ("DS", b"512.5"), ("OB", b"\x01\x02\x03"),
                                ("FD", struct.pack("<d", 1e308)), ("SS", struct.pack("<h", -1)), (None, None)]),
    "Columns": (0x00280011, "US", [(None, _us(0)), (None, _us(1)), (None, _us(65535)), (None, _us(7)),
                                   (None, b""), ("IS", b"99999999"), ("UN", b"\xff\xff\xff\xff"), (None, None)]),
    "BitsAllocated": (0x00280100, "US", [(None, _us(v)) for v in (0, 1, 7, 8, 12, 24, 32, 64, 65535)]
                      + [("IS", b"16"), (None, None)]),
    "BitsStored": (0x00280101, "US", [(None, _us(v)) for v in (0, 1, 17, 33, 65535)] + [(None, None)]),
    "HighBit": (0x00280102, "US", [(None, _us(v)) for v in (0, 31, 65535)] + [(None, None)]),
    "PixelRepresentation": (0x00280103, "US", [(None, _us(v)) for v in (1, 2, 65535)] + [(None, None)]),
    "SamplesPerPixel": (0x00280002, "US", [(None, _us(v)) for v in (0, 2, 3, 4, 65535)] + [(None, None)]),
    "PlanarConfiguration": (0x00280006, "US", [(None, _us(v)) for v in (1, 3)]),
    "NumberOfFrames": (0x00280008, "IS", [(None, _text(v)) for v in
                                          ("1A", "0", "-1", "2", "3", "100000", "4294967296", "", "NaN",
                                           "1e3", " 1 ")] + [("US", _us(2)), ("SQ", b"")]),
    "PhotometricInterpretation": (0x00280004, "CS", [(None, _text(v)) for v in
                                                     ("", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
                                                      "MONOCHROME3", "monochrome1", "\x00\xff", "A" * 70)]
                                  + [("US", _us(1)), (None, None)]),
    "WindowCenter": (0x00281050, "DS", [(None, _text(v)) for v in _NUMBERS]
                     + [("FD", struct.pack("<d", float("nan"))), ("OB", b"\x00\x01"), (None, None)]),
    "WindowWidth": (0x00281051, "DS", [(None, _text(v)) for v in _NUMBERS + ["-5", "1e-300", "1", "0.5"]]
                    + [("US", _us(0)), (None, None)]),
    "RescaleSlope": (0x00281053, "DS", [(None, _text(v)) for v in ("0", "nan", "1e308", "-1", "inf", "x", "")]),
    "RescaleIntercept": (0x00281052, "DS", [(None, _text(v)) for v in ("1e308", "-1e308", "nan", "q")]),
    "VOILUTFunction": (0x00281056, "CS", [(None, _text(v)) for v in ("SIGMOID", "LINEAR_EXACT", "BOGUS", "")]),
    "TransferSyntaxUID": (TS_TAG, "UI", [(None, _text(v)) for v in
                                         ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
                                          "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2",
                                          "1.2.840.10008.1.2.1", "1.2.3.4.5", "", "\xff\xfe")]
                          + [(None, None)]),
    "Modality": (0x00080060, "CS", [(None, _text(v)) for v in ("CT", "", "dx", "\x00")] + [("US", _us(3))]),
}


def dicom_field(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    for _ in range(4):  # a field whose edit cannot apply here (a meta that no longer parses): try another
        keyword = rng.choice(list(DICOM_FIELDS))
        tag, own_vr, options = DICOM_FIELDS[keyword]
        vr, value = rng.choice(options)
        out = set_element(data, tag, vr or own_vr, value)
        if out is not None:
            shown = "deleted" if value is None else f"= {value[:24]!r}" + (f" as VR {vr}" if vr else "")
            return out, f"DICOM {keyword} {shown}"
    return bit_flips(data, rng)


def dicom_pixel_length(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The declared length of PixelData (native) set to a huge, odd or short value."""
    layout = _dicom_layout(data)
    if layout is None:
        return bit_flips(data, rng)
    start, explicit = layout
    for tag, begin, _ in _walk(data, start, explicit):
        if tag == 0x7FE00010:
            where = begin + (8 if explicit else 4)
            if struct.unpack("<I", data[where:where + 4])[0] == 0xFFFFFFFF:
                return bit_flips(data, rng)  # encapsulated: flip the fragment table instead
            value = rng.choice([0, 1, 0xFFFFFFF0, len(data) // 3])
            return data[:where] + struct.pack("<I", value) + data[where + 4:], f"PixelData length = {value}"
    return bit_flips(data, rng)


SPECIFIC: dict[str, list[Callable]] = {
    "png": [png_ihdr, png_ihdr, png_chunk],
    "jpeg": [jpeg_sof, jpeg_sof, jpeg_segment],
    "dcm": [dicom_field, dicom_field, dicom_field, dicom_pixel_length],
}


def make_case(index: int, seed: int, bases: list[tuple[str, str, bytes]]) -> Case:
    """Case ``index`` of ``seed``: one base file and one to three mutations, half of them format-aware."""
    rng = random.Random(f"{seed}/{index}")
    label, ext, data = rng.choice(bases)
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutate = rng.choice(SPECIFIC[ext]) if rng.random() < 0.6 else rng.choice(GENERIC)
        try:
            data, what = mutate(data, rng)
        except Exception as exc:  # a bug of this script, not of pneumoscan: say so in the case, keep going
            data, what = bit_flips(data, rng)
            what += f" (after {mutate.__name__} failed: {_summary(exc)})"
        ops.append(what)
        if not data:
            data = b"\0"
    return Case(index, label, ext, ops, data)


# ---- runners ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    files: int = 0
    rows: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    tracebacks: int = 0
    failures: list[str] = field(default_factory=list)  # reproducers: the case and what went wrong
    seconds: float = 0.0
    exit_codes: collections.Counter = field(default_factory=collections.Counter)  # the CLI's
    messages: collections.Counter = field(default_factory=collections.Counter)  # kinds of refusal

    def to_dict(self) -> dict:
        out = {"files": self.files, "rows": self.rows, "statuses": dict(self.statuses.most_common()),
               "tracebacks": self.tracebacks, "failures": self.failures[:50], "seconds": round(self.seconds, 1)}
        if self.exit_codes:
            out["exit_codes"] = {str(k): v for k, v in sorted(self.exit_codes.items())}
        if self.messages:
            out["refusal_kinds"] = dict(self.messages.most_common(25))
        return out


def _summary(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} (at {where})"


def run_api(model, cases: list[Case], paths: list[Path], tally: Tally, batch_size: int) -> None:
    """``Model.predict_files`` over the chunk; if an exception escapes, file by file to find the culprits."""
    start = time.perf_counter()
    tally.files += len(cases)
    try:
        rows = list(model.predict_files(paths, batch_size=batch_size))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # native decoders can raise BaseException subclasses (pyo3's PanicException)
        tally.tracebacks += 1
        tally.failures.append(f"predict_files on a batch of {len(paths)}: {_summary(exc)}")
        rows = []
        for case, path in zip(cases, paths, strict=True):
            try:
                rows += list(model.predict_files([path], batch_size=1))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc_one:
                tally.failures.append(f"{case.describe()}: predict_files raised {_summary(exc_one)}")
    tally.rows += len(rows)
    tally.statuses.update(row.status for row in rows)
    tally.messages.update(normalise(row.message, row.path) for row in rows if row.status != "ok")
    if len(rows) == len(paths) and [r.path for r in rows] != [str(p) for p in paths]:
        tally.failures.append("predict_files returned rows out of order")
    tally.seconds += time.perf_counter() - start


def _cli_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``pneumoscan.cli.main(argv)`` here, its output captured and an escaping exception printed as the
    interpreter would: the same checks as a subprocess without a second interpreter's start-up (for the tests)."""
    import contextlib

    from pneumoscan.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what a user would see as a traceback
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_cli(model_path: str, precision: str, cases: list[Case], paths: list[Path], tally: Tally,
            folder: Path, in_process: bool = False) -> None:
    """``pneumoscan predict FILES --csv OUT`` in a fresh interpreter, as a user runs it (or in this one)."""
    start = time.perf_counter()
    out = folder / "rows.csv"
    argv = ["predict", *map(str, paths), "--csv", str(out), "--quiet", "--model", model_path,
            "--precision", precision]
    if in_process:
        done = _cli_in_process(argv)
    else:
        done = subprocess.run([sys.executable, "-m", "pneumoscan.cli", *argv], capture_output=True, text=True,
                              timeout=3600, check=False)
    tally.files += len(paths)
    tally.exit_codes[done.returncode] += 1
    if "Traceback (most recent call last)" in done.stderr:
        tally.tracebacks += 1
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
        tally.failures.append(f"CLI traceback on cases {cases[0].index}-{cases[-1].index}: {last}")
    rows = []
    if out.is_file():
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        out.unlink()
    else:
        tally.failures.append(f"CLI wrote no CSV for cases {cases[0].index}-{cases[-1].index} "
                              f"(exit {done.returncode}): {done.stderr.strip()[-300:]}")
    tally.rows += len(rows)
    tally.statuses.update(row.get("status", "?") for row in rows)
    if rows and [r.get("path") for r in rows] != [str(p) for p in paths]:
        tally.failures.append(f"CLI rows for cases {cases[0].index}-{cases[-1].index} do not match the files")
    tally.seconds += time.perf_counter() - start


class _ErrorLog(logging.Handler):
    """Counts records logged with an exception by the server (pneumoscan's handler and uvicorn's)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()[:200]}: {_summary(record.exc_info[1])}")


def run_http(url: str, cases: list[Case], tally: Tally, histogram: collections.Counter, errors: _ErrorLog,
             slowest: list) -> None:
    import httpx

    start = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for case in cases:
            seen = len(errors.records)
            began = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/predict", files={"file": (case.filename, case.data)})
            except httpx.HTTPError as exc:
                histogram["no answer"] += 1
                tally.failures.append(f"{case.describe()}: no HTTP answer ({_summary(exc)})")
                continue
            elapsed = time.perf_counter() - began
            slowest.append((elapsed, case.describe()))
            slowest.sort(reverse=True)
            del slowest[5:]
            histogram[response.status_code] += 1
            tally.files += 1
            try:
                body = response.json()
                tally.statuses[body.get("status", "refused")] += 1
                tally.rows += 1
            except ValueError:
                tally.failures.append(f"{case.describe()}: HTTP {response.status_code} answer is not JSON")
            if response.status_code >= 500:
                tally.failures.append(f"{case.describe()}: HTTP {response.status_code} {response.text[:200]}")
            if len(errors.records) > seen:
                tally.tracebacks += len(errors.records) - seen
                tally.failures.append(f"{case.describe()}: server logged {errors.records[-1]}")
    tally.seconds += time.perf_counter() - start


def normalise(message: str, name: str) -> str:
    """An error message without the file name and numbers, to count kinds of refusal."""
    message = message.replace(name, "FILE")
    message = re.sub(r"\S*fuzz_\d+\.\w+", "FILE", message)
    return re.sub(r"\d+(\.\d+)?", "N", message)[:160]


def fuzz(n: int, seed: int, *, size: int = 256, sources: int = 6, model_path: str | None = None,
         precision: str = "float32", chunk: int = 500, batch_size: int = 16, cli: bool | str = True,
         http: bool = True, progress: Path | None = None,
         only: Iterable[int] | None = None, keep: Path | None = None, images: Path = TEST_IMAGES,
         log: Callable[[str], None] = print) -> dict:
    """Generate ``n`` cases of ``seed`` and run them through every route; the counts as a dict.

    ``cli``: True runs the command line in a subprocess per chunk, "in-process" calls ``pneumoscan.cli.main``
    here (cheaper, for the tests), False skips it. ``progress``: a file rewritten with the counts after every
    chunk, so a long run that is stopped still leaves its figures.
    """
    import logging as _logging

    from pneumoscan import load_model
    from pneumoscan.serve import create_app, serve_in_thread

    warnings.filterwarnings("ignore", module="pydicom")  # odd values are the point here; each one warns
    _logging.getLogger("pydicom").setLevel(_logging.CRITICAL)  # its plug-ins log every failed decode
    started = time.perf_counter()
    bases = base_files(source_xrays(sources, size, seed, images))
    model_file = model_path or str(ROOT / "src" / "pneumoscan" / "weights" / "default.safetensors")
    model = load_model(model_file, precision=precision)
    indices = list(only) if only is not None else list(range(n))
    api, cmd, web = Tally(), Tally(), Tally()
    histogram: collections.Counter = collections.Counter()
    slowest: list = []
    errors = _ErrorLog()
    stack = serve_in_thread(create_app(model)) if http else None
    url = stack.__enter__() if stack is not None else None
    for name in ("pneumoscan", "uvicorn", "uvicorn.error", "uvicorn.access"):
        _logging.getLogger(name).addHandler(errors)
    try:
        with tempfile.TemporaryDirectory(prefix="pneumoscan-fuzz-") as tmp:
            folder = Path(keep) if keep is not None else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            manifest = (folder / "manifest.jsonl").open("a") if keep is not None else None
            for first in range(0, len(indices), chunk):
                cases = [make_case(i, seed, bases) for i in indices[first:first + chunk]]
                paths = []
                for case in cases:
                    path = folder / case.filename
                    path.write_bytes(case.data)
                    paths.append(path)
                    if manifest is not None:
                        manifest.write(json.dumps({"file": case.filename, "base": case.base, "ops": case.ops}) + "\n")
                run_api(model, cases, paths, api, batch_size)
                if cli:
                    run_cli(model_file, precision, cases, paths, cmd, folder, in_process=cli == "in-process")
                if http:
                    run_http(url, cases, web, histogram, errors, slowest)
                if keep is None:
                    for path in paths:
                        path.unlink()
                log(f"{first + len(cases)} / {len(indices)} cases, {time.perf_counter() - started:.0f} s")
                if progress is not None:
                    partial = {"cases_done": first + len(cases), "predict_files": api.to_dict(),
                               "cli": cmd.to_dict(), "http": web.to_dict(),
                               "status_codes": {str(k): v for k, v in histogram.items()}}
                    progress.write_text(json.dumps(partial, indent=2) + "\n")
            if manifest is not None:
                manifest.close()
    finally:
        for name in ("pneumoscan", "uvicorn", "uvicorn.error", "uvicorn.access"):
            _logging.getLogger(name).removeHandler(errors)
        if stack is not None:
            stack.__exit__(None, None, None)
    result = {
        "command": f"python benchmarks/fuzz.py --n {n} --seed {seed} --size {size}",
        "cases": len(indices),
        "base_files": len(bases),
        "model": {"file": model_file, "sha256": model.sha256, "precision": precision},
        "predict_files": api.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cli:
        result["cli"] = cmd.to_dict()
    if http:
        result["http"] = {**web.to_dict(), "status_codes": {str(k): v for k, v in sorted(histogram.items(),
                                                                                         key=str)},
                          "server_5xx": sum(v for k, v in histogram.items() if isinstance(k, int) and k >= 500),
                          "slowest": [f"{s:.2f} s: {d}" for s, d in slowest]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of mutated files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="longest side of the source X-rays, px")
    parser.add_argument("--sources", type=int, default=6, help="real X-rays to start from")
    parser.add_argument("--model", help="model file (default: the bundled one)")
    parser.add_argument("--precision", default="float32", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--chunk", type=int, default=500, help="files per predict_files call and CLI run")
    parser.add_argument("--no-cli", action="store_true")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--only", type=int, nargs="+", help="run only these case numbers")
    parser.add_argument("--keep", type=Path, help="write the cases (and manifest.jsonl) here and keep them")
    parser.add_argument("--json", type=Path, help="write the counts here (and after each chunk to FILE.partial)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 16 or args.chunk < 1:
        parser.error("--n and --chunk must be positive, --size at least 16")
    result = fuzz(args.n, args.seed, size=args.size, sources=args.sources, model_path=args.model,
                  precision=args.precision, chunk=args.chunk, cli=not args.no_cli, http=not args.no_http,
                  only=args.only, keep=args.keep, log=lambda s: print(s, file=sys.stderr, flush=True),
                  progress=args.json.with_suffix(args.json.suffix + ".partial") if args.json else None)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = result["predict_files"]["tracebacks"] + result.get("cli", {}).get("tracebacks", 0) \
        + result.get("http", {}).get("tracebacks", 0) + result.get("http", {}).get("server_5xx", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
