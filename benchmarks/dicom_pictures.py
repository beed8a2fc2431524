"""What a reader sees of the DICOM node's results: one positive and one negative study, as a viewer shows them.

Two X-rays of the official val split (one PNEUMONIA, one NORMAL, the first of each by name) are made into DX
instances (``dicom.samples.xray_dicom``) and answered by the node's own screening step (``dicom.screen.Screener``,
the bundled model, default heatmap rule). For each study the picture shows, side by side, the image a viewer
opens (the heatmap Secondary Capture when there is one, else the source X-ray: NORMAL decisions get no heatmap)
and the Structured Report as ``dsrdump`` (dcmtk) renders it, the way a viewer's report panel lists it.

    python benchmarks/dicom_pictures.py --data ../shared/data/chest_xray --out docs/results/dicom
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL = 640  # px: the image panel's longest side and the report panel's width


def _image_of(ds) -> Image.Image:
    """The instance's pixels as a viewer draws them (8-bit; RGB as is, gray stretched to its stored range)."""
    pixels = ds.pixel_array
    if pixels.ndim == 3:
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    gray = pixels.astype(np.float32)
    gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1.0) * 255
    if str(ds.PhotometricInterpretation) == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _report_text(sr) -> list[str]:
    """dsrdump's rendering of the SR (the content tree a report panel lists), wrapped to the panel."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        sr.save_as(f.name, enforce_file_format=True)
        text = subprocess.run(["dsrdump", "-Ee", f.name], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in text.splitlines():
        while len(line) > 96:
            lines.append(line[:96])
            line = "    " + line[96:]
        lines.append(line)
    return lines


def picture(title: str, shown: Image.Image, report: list[str]) -> Image.Image:
    shown = shown.copy()
    shown.thumbnail((PANEL, PANEL))
    font = ImageFont.load_default()
    line_height = 12
    height = max(shown.height, line_height * (len(report) + 2)) + 30
    canvas = Image.new("RGB", (shown.width + PANEL + 30, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 8), title, fill=(255, 255, 255), font=font)
    canvas.paste(shown, (10, 26))
    x = shown.width + 20
    for i, line in enumerate(report):
        draw.text((x, 26 + i * line_height), line, fill=(210, 210, 210), font=font)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/chest_xray", help="the Kermany folder (its val split)")
    parser.add_argument("--out", default="docs/results/dicom", help="folder for positive.png and negative.png")
    args = parser.parse_args(argv)

    import pydicom

    from pneumoscan import load_model
    from pneumoscan.dicom.samples import xray_dicom
    from pneumoscan.dicom.screen import Screener

    model = load_model()
    screener = Screener(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for label, name in (("PNEUMONIA", "positive"), ("NORMAL", "negative")):
        source = sorted((Path(args.data) / "val" / label).glob("*.jpeg"))[0]
        ds = xray_dicom(source, side=1024)
        ds.PatientAge = "003Y"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        (outcome,) = screener.screen([(source.name, buffer.getvalue())])
        sr = outcome.results[0]
        sc = outcome.results[1] if len(outcome.results) > 1 else None
        shown = _image_of(sc) if sc is not None else _image_of(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
        what = "heatmap Secondary Capture (series 9902)" if sc is not None else "source X-ray (no heatmap: NORMAL)"
        title = f"{name} study ({source.name}): {outcome.summary()}; left: {what}; right: the SR (series 9901)"
        picture(title, shown, _report_text(sr)).quantize(256).save(out / f"{name}.png", optimize=True)
        print(f"{name}: {outcome.summary()} -> {out / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
