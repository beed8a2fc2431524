"""ONNX export, verification and int8 quantisation (the onnxruntime backend itself is ``backends.onnx``).

The exported graph starts at the image, a (N, 1, S, S) batch already decoded and resized, float in [0, 1] or
uint8, and applies the model's own ``Preprocessing.normalize`` (traced, so there is no second copy of the
constants). It outputs the logits and the pooled features, so the out-of-distribution guard keeps working. The
model file's metadata, the source sha256 and the guard statistics travel in ``metadata_props``: one ``.onnx`` file
is a complete model. A file is published only after onnxruntime has been checked against PyTorch on real images.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import pipeline
from .data.cache import decode_file
from .data.images import ImageReadError
from .data.layout import Sample
from .data.sources import decode_samples, open_source
from .errors import PneumoscanError
from .guard import Guard
from .metrics import roc_auc
from .modelfile import atomic_write, sha256_file
from .models import logits_and_features
from .predict import Model
from .preprocess import Preprocessing
from .run import RunFolder

INPUT_DTYPES = ("float32", "uint8")
OPSET = 18
CALIBRATION_IMAGES = 128


class ExportError(PneumoscanError):
    """Export, verification or quantisation of an ONNX model failed; the message says why."""


class _ImageToOutputs(nn.Module):
    """The exported function: image batch -> Preprocessing.normalize -> network -> (logits, pooled features)."""

    def __init__(self, network: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.network = network
        self.preprocessing = preprocessing

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.network, self.preprocessing.normalize(image))


def _set_metadata(path: str | Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "pneumoscan"
    onnx.save(proto, str(path))


def load_onnx_model(path: str | Path, *, threads: int | None = None) -> Model:
    """An ``.onnx`` file from ``export_onnx`` as a ``Model`` on the onnxruntime backend."""
    from .predict import load_model

    return load_model(path, backend="onnx", threads=threads)


# ---------------------------------------------------------------------------------------------- images


def read_images(paths: Iterable[str | Path], preprocessing: Preprocessing) -> tuple[np.ndarray, list[int]]:
    """uint8 (N, S, S) images exactly as ``predict_files`` feeds them, and the indices of the readable paths."""
    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(decode_file(path, preprocessing))
            kept.append(i)
        except ImageReadError:
            continue
    size = preprocessing.size
    return (np.stack(images) if images else np.zeros((0, size, size), np.uint8)), kept


def network_inputs(model: Model, samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 network inputs (N, S, S), labels, why each left-out file was left out) of ``samples``, as the
    screening stage prepares them for every route (``pipeline.prepare``: decoding, pixel limit, the model's input
    size, the stage's messages). A MedMNIST file holds arrays, not image files: its images enter as its training
    cache holds them (they are network inputs already, ``pipeline.from_array``'s case)."""
    size = model.preprocessing.size
    if any(p.suffix.lower() == ".npz" for s in samples for p in s.path.parents):
        cache = decode_samples(list(samples), model.preprocessing)
        return cache.images, cache.labels, list(cache.skipped)
    items = [(pipeline.prepare(model, str(s.path)), s.label) for s in samples]
    ready = [(item.image, label) for item, label in items if item.image is not None]
    left_out = [item.error or f"{item.name}: {item.refused}" for item, _ in items if item.image is None]
    if not ready:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, np.int64), left_out
    return np.stack([r[0] for r in ready]), np.array([r[1] for r in ready], dtype=np.int64), left_out


def _left_out(messages: list[str]) -> str:
    return f" ({len(messages)} left out, e.g. {messages[0]})" if messages else ""


def run_split(model: Model) -> tuple[list[Sample], list[Sample]] | None:
    """(train, val) samples of the run that produced this model, when its split.csv sits beside the model file."""
    # a split.csv from another run (another sha256 than recorded) is not used: its validation images may be this
    # model's training images
    run = RunFolder.of_model(model.path, split_sha256=model.record.training.get("split_sha256"))
    return run.split() if run is not None else None


def validation_samples(model: Model, data_dir: str | Path | None) -> tuple[list[Sample], list[Sample], str]:
    """(calibration samples from training data, validation samples, a description); never the test split."""
    split = run_split(model)
    if split is not None and split[1]:
        return split[0], split[1], f"run split {model.path.parent / 'split.csv'} (val subset)"
    if data_dir is None:
        raise ExportError(
            "--int8 needs validation images: give a run directory (with split.csv) as --model, "
            "or --data DATA_DIR with a val split"
        )
    source = open_source(data_dir)
    return source.samples("train"), source.samples("val"), f"{Path(data_dir) / 'val'}"


def check_images(model: Model, data_dir: str | Path | None, limit: int = 64) -> tuple[np.ndarray, str]:
    """Real images to compare the runtimes on: DATA_DIR/val (or test), else the run's validation images, as the
    screening stage prepares them (``network_inputs``).

    Reading the test split is fine here: nothing is chosen on this comparison.
    """
    prep = model.preprocessing
    if data_dir is not None:
        source = open_source(data_dir)
        for split in ("val", "test"):
            try:
                images, _, left_out = network_inputs(model, _spread(source.samples(split), limit))
            except PneumoscanError:
                continue
            if len(images):
                return images, f"{len(images)} images from {Path(data_dir) / split}{_left_out(left_out)}"
        raise ExportError(f"{data_dir}: no readable images in its val or test split")
    split = run_split(model)
    if split is not None:
        images, _, left_out = network_inputs(model, _spread(split[1], limit))
        if len(images):
            return images, f"{len(images)} validation images of the run{_left_out(left_out)}"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, prep.size, prep.size), dtype=np.uint8)
    return images, "8 random images (no --data given: pass --data DATA_DIR to check on X-rays)"


def _spread(samples: Sequence[Sample], limit: int) -> list[Sample]:
    """Up to ``limit`` samples spread evenly over the (class-sorted) list, so both classes are represented."""
    if len(samples) <= limit:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    sha256: str
    checked_on: str
    max_logit_diff: float
    max_feature_diff: float


def export_onnx(
    model: Model,
    out: str | Path,
    *,
    images: np.ndarray,
    checked_on: str = "",
    input_dtype: str = "float32",
    tolerance: float = 1e-3,
) -> ExportResult:
    """Export ``model`` to ``out`` and publish it only if onnxruntime matches PyTorch on ``images``.

    images: uint8 (N, S, S) network inputs, as ``Model.prepare`` makes them; both backends score them through
    their ``forward``. tolerance: largest allowed |logit| difference.
    """
    from .backends.onnx import OnnxBackend, metadata_props, open_session

    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if not model.backend.gradcam:
        raise ExportError("export needs the PyTorch model (a .safetensors model file or run directory)")
    if model.backend.precision != "float32":
        raise ExportError("export needs the model loaded in float32 (the ONNX graph is float32)")
    size = model.preprocessing.size
    wrapper = _ImageToOutputs(model.network, model.preprocessing).eval()
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    props = metadata_props(model.record.with_(source_sha256=model.sha256), model.guard)
    batch = torch.from_numpy(np.ascontiguousarray(images))
    expected = model.backend.forward(batch) if len(images) else None
    result: dict[str, float] = {}

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                tmp,
                input_names=["image"],
                output_names=["logits", "features"],
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            )
        _set_metadata(tmp, props)
        if expected is None:
            result["logits"] = result["features"] = 0.0
            return
        logits, feats = OnnxBackend(open_session(tmp), model.preprocessing).forward(batch)
        result["logits"] = float((logits - expected[0]).abs().max())
        result["features"] = float((feats - expected[1]).abs().max())
        if not result["logits"] <= tolerance:
            raise ExportError(
                f"onnxruntime differs from PyTorch by {result['logits']:.3g} in the logits "
                f"(tolerance {tolerance:g}); {out} not written"
            )

    try:
        atomic_write(out, write)
    except PneumoscanError:
        raise
    except ModuleNotFoundError as exc:
        raise ExportError(f"ONNX export needs the onnx extra (pip install 'pneumoscan[onnx]'): {exc.name} is "
                          "not installed") from None
    except Exception as exc:
        raise ExportError(
            f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    return ExportResult(Path(out), sha256_file(out), checked_on, result["logits"], result["features"])


def _quiet():
    """Silence the exporter's and quantiser's progress lines on stdout; the CLI prints its own summary."""
    return contextlib.redirect_stdout(io.StringIO())


# ---------------------------------------------------------------------------------------------- int8


@dataclass
class Int8Result:
    path: Path
    method: str  # "static" (calibrated activations) or "dynamic" (weights only)
    validated_on: str
    n_val: int
    auc_fp32: float
    auc_int8: float
    max_probability_diff: float
    decisions_changed: int  # at the screening threshold

    @property
    def auc_change(self) -> float:
        return self.auc_int8 - self.auc_fp32


def _int8_default_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".int8.onnx")


def quantize_int8(
    fp32_path: str | Path,
    *,
    calibration: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    validated_on: str = "",
    out: str | Path | None = None,
) -> Int8Result:
    """Write an int8 copy of an exported model (default ``MODEL.int8.onnx``) and measure its AUC change on
    validation images.

    Static QDQ quantisation (per-channel weights, activation ranges from ``calibration``: uint8 images from the
    training data) suits convolutions; dynamic quantisation is the fallback if static fails. The guard's limit is
    moved by the median difference between the int8 and float guard scores of the calibration and validation
    images, because int8 features sit measurably farther from the float statistics (8 of 256 test X-rays were
    rejected by int8 alone before).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    from .backends.onnx import OnnxBackend, metadata_props, open_session

    fp32_path = Path(fp32_path)
    out = Path(out) if out is not None else _int8_default_path(fp32_path)
    fp32 = load_onnx_model(fp32_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [fp32.backend.feed(torch.from_numpy(calibration[i : i + 16])) for i in range(0, len(calibration), 16)]
            )

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmpdir:
        prepared = Path(tmpdir) / "prepared.onnx"
        quantized = Path(tmpdir) / "int8.onnx"
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            except Exception:
                prepared = fp32_path
            try:
                quantize_static(
                    str(prepared),
                    str(quantized),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
                method = "static"
            except Exception:
                quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8)
                method = "dynamic"
        quantization = {
            "method": method,
            "format": "QDQ" if method == "static" else "QOperator",
            "calibration_images": int(len(calibration)) if method == "static" else 0,
            "fp32_sha256": sha256_file(fp32_path),
        }
        record = fp32.record.with_(quantization=quantization)
        # Score the calibration and validation images once on each network; the int8 graph needs no metadata for it
        reference = torch.from_numpy(np.concatenate([calibration, val_images]))
        int8_backend = OnnxBackend(open_session(quantized), fp32.preprocessing, int8=True)
        (logits32, feats32), (logits8, feats8) = (_forward_in_batches(b, reference) for b in (fp32.backend, int8_backend))
        guard = fp32.guard
        if guard is not None and record.guard is not None:
            # int8 features sit a little farther from the float statistics: move the limit by the median shift
            # of the same images' scores, so an X-ray near the limit gets the float model's verdict
            shift = float(np.median((guard.score(feats8) - guard.score(feats32)).numpy()))
            guard = Guard(guard.mean, guard.components, guard.variances, guard.residual_variance,
                          guard.threshold + max(0.0, shift))
            record = record.with_(guard=replace(record.guard, threshold=guard.threshold))
        _set_metadata(quantized, metadata_props(record, guard))
        val = slice(len(calibration), None)
        p32, p8 = (fp32.probability(logits[val]).numpy() for logits in (logits32, logits8))
        screening = fp32.thresholds.get("screening", 0.5)
        result = Int8Result(
            out,
            method,
            validated_on,
            len(val_labels),
            _auc(val_labels, p32),
            _auc(val_labels, p8),
            float(np.abs(p32 - p8).max()) if len(p8) else 0.0,
            int(((p32 >= screening) != (p8 >= screening)).sum()),
        )
        atomic_write(out, lambda tmp: os.replace(quantized, tmp))
    return result


def _forward_in_batches(backend, images: torch.Tensor, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``backend.forward`` over ``images`` a batch at a time, so a large validation split stays in bounded memory."""
    outputs = [backend.forward(images[i:i + size]) for i in range(0, len(images), size)]
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def _auc(labels: np.ndarray, p: np.ndarray) -> float:
    return roc_auc(labels, p) if len(set(labels.tolist())) == 2 else float("nan")


def int8_inputs(
    model: Model, data_dir: str | Path | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(calibration images, validation images, validation labels, description) for ``quantize_int8``."""
    train, val, source = validation_samples(model, data_dir)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(train), size=min(CALIBRATION_IMAGES, len(train)), replace=False) if train else []
    calibration, _, skipped = network_inputs(model, [train[i] for i in sorted(pick)])
    images, labels, left_out = network_inputs(model, val)
    if not len(calibration) or not len(images):
        raise ExportError(
            f"no readable {'calibration' if not len(calibration) else 'validation'} images "
            f"for --int8 ({source})"
        )
    return calibration, images, labels, f"{len(images)} images, {source}{_left_out(skipped + left_out)}"
