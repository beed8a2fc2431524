"""How well does a model's out-of-distribution guard separate chest X-rays from everything else?

Every image goes through the real prediction path (file -> ``decode`` -> ``Model.prepare`` -> ``Model.score``, via
``Model.predict_files``), so what rejects an input is measured as users meet it, with its two statuses kept apart:
``not_xray`` (``guard.image_check``: the DICOM header, colour, size, aspect, contrast or two-level checks say it
is no frontal chest X-ray) and ``out_of_distribution`` (the checks pass, but the feature guard finds it far from
the training X-rays). "guard alone" columns count what the feature guard would reject by itself (its score is
computed for every readable image, also those the checks reject).

Sources
  X-rays (should be accepted; targets: <= 1% wrongly rejected on validation)
    run-val         the model's own validation images (its run folder's split.csv, when --model is a run):
                    held out from training
    kermany-val     the official 16-image val split (original resolution)
    kermany-test    the official test split (reported only: never used to tune anything)
  not X-rays (should be rejected; target: >= 99% rejected)
    sklearn         scikit-learn's sample photos (china.jpg, flower.jpg)
    matplotlib      matplotlib's sample_data pictures (grace_hopper.jpg, PNGs) and its toolbar icons
    skimage         scikit-image's data pictures (astronaut, camera, text, coins, retina, ...), 40 LFW face crops
    pydicom         pydicom's test DICOMs that decode: CT, MR, NM, US, RT dose, segmentations, colour test charts
                    (duplicates with identical pixels are counted once)
    generated       noise, flat black / white / gray, gradients, checkerboards, rendered text, random shapes
  transformed X-rays (reported separately: real test X-rays that are no longer upright frontal views)
    rot90           rotated 90 degrees (a frontal film lying on its side; not a true lateral view)
    half            the left half only (one lung field, tall and narrow)
    upside-down     flipped vertically
    negative        intensities inverted (what a MONOCHROME1 image read without inversion looks like)

Usage: nice -n 19 python benchmarks/guard_eval.py [--model RUN_OR_FILE] [--data ../shared/data/chest_xray] [--two-level]
       python benchmarks/guard_eval.py --limit 4      (at most 4 files per source: a smoke run)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Source:
    name: str
    group: str  # xray-val | xray-report | non-xray | transformed
    files: list[Path]
    statuses: list[str] = field(default_factory=list)  # ok | not_xray | out_of_distribution | error
    scores: list[float] = field(default_factory=list)
    by_header: list[bool] = field(default_factory=list)  # not_xray because of the DICOM header (Modality, part, view)

    @property
    def n(self) -> int:
        return sum(s != "error" for s in self.statuses)

    @property
    def not_xray(self) -> int:
        return self.statuses.count("not_xray")

    @property
    def out_of_distribution(self) -> int:
        return self.statuses.count("out_of_distribution")

    @property
    def rejected(self) -> int:
        return self.not_xray + self.out_of_distribution

    @property
    def errors(self) -> int:
        return self.statuses.count("error")


# --- X-rays ---------------------------------------------------------------------------------------------------

def run_val_files(model) -> list[Path]:
    """The validation images of the run that produced ``model`` (none for a model file outside its run folder)."""
    from pneumoscan.run import RunFolder

    run = RunFolder.of_model(model.path, split_sha256=model.record.training.get("split_sha256"))
    return [s.path for s in run.split()[1]] if run is not None else []  # missing files are reported as errors


def kermany_files(data: Path, split: str) -> list[Path]:
    return sorted(p for p in (data / split).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def capped(files: list[Path], limit: int | None) -> list[Path]:
    """At most ``limit`` files spread over the sorted list (both classes of a Kermany split)."""
    if limit is None or len(files) <= limit:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]


# --- real non-X-ray pictures shipped inside installed packages -------------------------------------------------

def package_pictures(workdir: Path, limit: int | None = None) -> dict[str, list[Path]]:
    import matplotlib
    import sklearn

    out: dict[str, list[Path]] = {}
    out["sklearn"] = sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    mpl = Path(matplotlib.get_data_path())
    out["matplotlib"] = sorted([*(mpl / "sample_data").glob("*.jpg"), *(mpl / "sample_data").glob("*.png"),
                                *(mpl / "images").glob("*.png")])
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        pictures = sorted(p for p in data.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        faces = np.load(data / "lfw_subset.npy")[:40]  # 25x25 float gray face crops
        face_dir = workdir / "lfw"
        face_dir.mkdir(parents=True, exist_ok=True)
        for i, face in enumerate(faces):
            Image.fromarray(np.round(np.clip(face, 0, 1) * 255).astype(np.uint8), "L").save(face_dir / f"face{i}.png")
        out["skimage"] = pictures + sorted(face_dir.glob("*.png"))
    except ImportError:
        print("scikit-image not installed: its pictures are left out (pip install scikit-image)", file=sys.stderr)
    out = {name: capped(files, limit) for name, files in out.items()}
    out["pydicom"] = pydicom_pictures(limit)
    return out


def pydicom_pictures(limit: int | None = None) -> list[Path]:
    """pydicom's bundled test DICOMs that ``decode`` reads, one per distinct pixel content (the first ``limit``)."""
    import pydicom

    from pneumoscan.data.images import decode

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    seen: set[str] = set()
    kept = []
    for path in sorted(folder.rglob("*.dcm")):
        if limit is not None and len(kept) >= limit:
            break
        try:
            pixels = decode(path).pixels
        except Exception:  # many of pydicom's test files are deliberately broken or exotic
            continue
        digest = hashlib.sha256(np.round(pixels * 255).astype(np.uint8).tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append(path)
    return kept


# --- generated pictures ---------------------------------------------------------------------------------------

def generated_pictures(workdir: Path, size: int = 512) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = workdir / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    gray: dict[str, np.ndarray] = {
        "flat_black": np.zeros((size, size)), "flat_white": np.ones((size, size)),
        "flat_gray50": np.full((size, size), 0.5), "flat_gray20": np.full((size, size), 0.2),
        "gradient_horizontal": xx, "gradient_vertical": yy, "gradient_diagonal": (xx + yy) / 2,
        "gradient_radial": np.clip(np.hypot(xx - 0.5, yy - 0.5) / 0.71, 0, 1),
        "checker_8px": ((np.arange(size)[:, None] // 8 + np.arange(size)[None] // 8) % 2).astype(float),
        "checker_64px": ((np.arange(size)[:, None] // 64 + np.arange(size)[None] // 64) % 2).astype(float),
        "stripes_vertical": (np.sin(xx * 40 * np.pi) > 0).astype(float),
        "sine_rings": 0.5 + 0.5 * np.sin(np.hypot(xx - 0.5, yy - 0.5) * 60),
    }
    for seed in range(3):
        gray[f"noise_uniform_{seed}"] = np.random.default_rng(seed).random((size, size))
        gray[f"noise_gaussian_{seed}"] = np.clip(np.random.default_rng(10 + seed).normal(0.5, 0.15, (size, size)), 0, 1)
        smooth = np.asarray(Image.fromarray(np.random.default_rng(20 + seed).random((16, 16)).astype(np.float32),
                                            "F").resize((size, size), Image.Resampling.BICUBIC))
        gray[f"noise_smooth_{seed}"] = np.clip(smooth, 0, 1)
    files = []
    for name, array in gray.items():
        path = folder / f"{name}.png"
        Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), "L").save(path)
        files.append(path)
    path = folder / "noise_rgb.png"
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    files.append(path)
    font = _font(28)
    lines = ["Patient: DOE^JANE   Study: CHEST PA", "Findings: no focal consolidation.", "Impression: normal",
             "The quick brown fox jumps over the lazy dog 0123456789"] * 4
    for name, fg, bg in (("text_black_on_white", 0, 255), ("text_white_on_black", 255, 0)):
        image = Image.new("L", (size, size), bg)
        draw = ImageDraw.Draw(image)
        for i, line in enumerate(lines):
            draw.text((10, 10 + i * 31), line, fill=fg, font=font)
        path = folder / f"{name}.png"
        image.save(path)
        files.append(path)
    for seed in range(3):
        shapes_rng = np.random.default_rng(30 + seed)
        image = Image.new("RGB", (size, size), tuple(int(v) for v in shapes_rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(25):
            x0, y0 = (int(v) for v in shapes_rng.integers(0, size - 40, 2))
            x1, y1 = x0 + int(shapes_rng.integers(20, 200)), y0 + int(shapes_rng.integers(20, 200))
            colour = tuple(int(v) for v in shapes_rng.integers(0, 256, 3))
            (draw.ellipse if shapes_rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        path = folder / f"shapes_{seed}.jpeg"
        image.save(path, quality=90)
        files.append(path)
    return files


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# --- transformed X-rays ---------------------------------------------------------------------------------------

def transformed_xrays(test_files: list[Path], workdir: Path, count: int = 25) -> dict[str, list[Path]]:
    from pneumoscan.data.images import decode

    picks = test_files[:: max(1, len(test_files) // count)][:count]
    out: dict[str, list[Path]] = {k: [] for k in ("rot90", "half", "upside-down", "negative")}
    for path in picks:
        gray = Image.fromarray(np.round(decode(path).pixels * 255).astype(np.uint8), "L")
        # box-reduced by an integer factor that keeps the shorter side >= 512 px, as the files were written before
        # (then by the JPEG draft decode): small PNGs, still far above the size check's minimum
        image = np.asarray(gray.reduce(max(1, min(gray.size) // 512)))
        variants = {"rot90": np.rot90(image), "half": image[:, : image.shape[1] // 2], "upside-down": image[::-1],
                    "negative": 255 - image}
        for kind, array in variants.items():
            target = workdir / "transformed" / kind / f"{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(array), "L").save(target)
            out[kind].append(target)
    return out


# --- evaluation -----------------------------------------------------------------------------------------------

def score(model, source: Source, batch_size: int) -> None:
    from pneumoscan.guard import NOT_XRAY

    for pred in model.predict_files(source.files, batch_size=batch_size):
        source.statuses.append(pred.status)
        source.scores.append(np.nan if pred.guard_score is None else pred.guard_score)
        source.by_header.append(pred.status == "not_xray" and pred.message.startswith(f"{NOT_XRAY}: DICOM "))


def _rate(k: int, n: int) -> str:
    return f"{100 * k / n:6.2f}%" if n else "     -"


def _guard_alone(s: Source, threshold: float) -> int:
    return sum(1 for v in s.scores if np.isfinite(v) and v > threshold)


def report(sources: list[Source], threshold: float) -> dict:
    print("rejected: not_xray + out_of_distribution; not_xray: by the image checks (header: of these, by the DICOM "
          "header); out_of_dist: the checks passed, the feature guard rejected; guard alone: what the feature guard "
          "rejects by itself")
    print(f"{'source':<16} {'group':<12} {'images':>6} {'rejected':>8} {'rate':>7} {'not_xray':>8} {'header':>6} "
          f"{'out_of_dist':>11} {'guard alone':>11} {'errors':>6} {'score p50':>10} {'score p99':>10} "
          f"{'score min':>10}")
    for s in sources:
        finite = np.array([v for v in s.scores if np.isfinite(v)]) if s.scores else np.array([])
        q = (np.percentile(finite, 50), np.percentile(finite, 99), finite.min()) if finite.size else (np.nan,) * 3
        print(f"{s.name:<16} {s.group:<12} {s.n:>6} {s.rejected:>8} {_rate(s.rejected, s.n)} {s.not_xray:>8} "
              f"{sum(s.by_header):>6} {s.out_of_distribution:>11} {_guard_alone(s, threshold):>11} {s.errors:>6} "
              f"{q[0]:>10.2f} {q[1]:>10.2f} {q[2]:>10.2f}")
    summary = {}
    print(f"\nguard threshold {threshold:.3f}")
    for group, label in (("xray-val", "validation X-rays wrongly rejected"), ("xray-report", "test X-rays wrongly "
                         "rejected (reporting only)"), ("non-xray", "non-X-ray pictures rejected"),
                         ("transformed", "transformed X-rays rejected (reporting only)")):
        members = [s for s in sources if s.group == group]
        n, k = sum(s.n for s in members), sum(s.rejected for s in members)
        nx, ood = sum(s.not_xray for s in members), sum(s.out_of_distribution for s in members)
        g = sum(_guard_alone(s, threshold) for s in members)
        summary[group] = {"n": n, "rejected": k, "rate": k / n if n else None, "not_xray": nx,
                          "out_of_distribution": ood, "guard_alone": g}
        print(f"{label:<48} {k:>5} / {n:<5} = {_rate(k, n).strip():>7}   (not_xray {nx}, out_of_distribution "
              f"{ood}; guard alone {_rate(g, n).strip()})")
    val, non = summary["xray-val"]["rate"], summary["non-xray"]["rate"]
    if val is not None and non is not None:
        verdict = "MET" if val <= 0.01 and non >= 0.99 else "NOT MET"
        print(f"targets (val wrongly rejected <= 1%, non-X-ray rejected >= 99%): {verdict}")
    missed = [(s.name, f.name, sc) for s in sources if s.group == "non-xray"
              for f, st, sc in zip(s.files, s.statuses, s.scores, strict=True) if st == "ok"]
    if missed:
        print("\nnon-X-ray pictures accepted as X-rays:")
        for name, file, sc in missed:
            print(f"  {name:<12} {file:<40} score {sc:.2f}")
    return summary


def two_level_report(model, sources: list[Source]) -> None:
    from pneumoscan.data.images import ImageReadError
    from pneumoscan.guard import MAX_TWO_LEVEL_SHARE, two_level_share

    print(f"\nshare of the network input in its two most frequent gray levels (check rejects > {MAX_TWO_LEVEL_SHARE})")
    print(f"{'source':<16} {'images':>6} {'min':>6} {'p50':>6} {'p99.9':>6} {'max':>6}")
    for source in sources:
        shares = []
        for path in source.files:
            try:
                small, _ = model.prepare(model.decode(path))  # the network input, as prediction makes it
            except ImageReadError:
                continue
            shares.append(two_level_share(small))
        if shares:
            q = np.percentile(shares, [0, 50, 99.9, 100])
            print(f"{source.name:<16} {len(shares):>6} " + " ".join(f"{v:6.3f}" for v in q))


def main(argv: list[str] | None = None) -> int:
    from pneumoscan.predict import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="run directory (adds its validation images) or model file (default: bundled)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-test", action="store_true", help="skip the test split and transformed X-rays")
    parser.add_argument("--limit", type=int, help="at most this many files per source (a smoke run; default all)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--two-level", action="store_true",
                        help="also print, per source, the share of each network input held by its two most frequent "
                             "gray levels (what the two-gray-level check of guard.image_check reads)")
    parser.add_argument("--precision", default="auto", help="auto | float32 | bfloat16 (as `pneumoscan predict`)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="pydicom")  # its test files are deliberately odd

    from pneumoscan import load_model

    model = load_model(args.model, precision=args.precision)
    if model.guard is None:
        print(f"{args.model}: this model has no guard", file=sys.stderr)
        return 2
    data, limit = Path(args.data), args.limit
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="guard_eval_") as tmp:
        work = Path(tmp)
        sources = [Source("run-val", "xray-val", capped(run_val_files(model), limit)),
                   Source("kermany-val", "xray-val", capped(kermany_files(data, "val"), limit))]
        test = kermany_files(data, "test")
        if not args.no_test:
            sources.append(Source("kermany-test", "xray-report", capped(test, limit)))
        sources += [Source(name, "non-xray", files) for name, files in package_pictures(work, limit).items()]
        sources.append(Source("generated", "non-xray", capped(generated_pictures(work), limit)))
        if not args.no_test and test:
            count = 25 if limit is None else min(25, limit)
            sources += [Source(k, "transformed", v) for k, v in transformed_xrays(test, work, count).items()]
        sources = [s for s in sources if s.files]
        for source in sources:
            score(model, source, args.batch_size)
        print(f"model {model.name} (sha256 {model.sha256[:12]}), network on {model.runtime}, "
              f"{time.time() - started:.0f} s" + (f", at most {limit} files per source" if limit else "") + "\n")
        summary = report(sources, model.guard.threshold)
        if args.two_level:
            two_level_report(model, sources)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.sha256, "summary": summary, "sources": {
            s.name: {"n": s.n, "rejected": s.rejected, "not_xray": s.not_xray,
                     "out_of_distribution": s.out_of_distribution, "errors": s.errors} for s in sources}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
