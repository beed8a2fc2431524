"""ONNX export, verification, int8 quantisation, and the onnxruntime backend.

The exported graph starts at the image, a (N, 1, S, S) batch already decoded and resized, float in [0, 1] or
uint8, and applies the model's own ``Preprocessing.normalize`` (traced, so there is no second copy of the
constants). It outputs the logits and the pooled features, so the out-of-distribution guard keeps working. The
model file's metadata, the source sha256 and the guard statistics travel in ``metadata_props``: one ``.onnx`` file
is a complete model. A file is published only after onnxruntime has been checked against PyTorch on real images.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.images import ImageReadError, read_image
from .data.layout import Sample, list_split, read_split
from .errors import PneumoscanError
from .guard import Guard
from .metrics import roc_auc
from .modelfile import atomic_write, sha256_file
from .models import logits_and_features
from .predict import Model, tta_views
from .preprocess import Preprocessing

FORMAT = "pneumoscan-onnx/1"
META_KEY, GUARD_KEY, FORMAT_KEY = "pneumoscan", "pneumoscan.guard", "format"
INPUT, OUTPUTS = "image", ("logits", "features")
INPUT_DTYPES = ("float32", "uint8")
OPSET = 18
CALIBRATION_IMAGES = 128


class ExportError(PneumoscanError):
    """Export, verification or loading of an ONNX model failed; the message says why."""


class _ImageToOutputs(nn.Module):
    """The exported function: image batch -> Preprocessing.normalize -> network -> (logits, pooled features)."""

    def __init__(self, network: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.network = network
        self.preprocessing = preprocessing

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.network, self.preprocessing.normalize(image))


def _unit(size: int) -> Preprocessing:
    """The identity normalisation: uint8 or float images -> float (N, 1, S, S) in [0, 1], by the same definition."""
    return Preprocessing(size=size, channels=1, mean=(0.0,), std=(1.0,))


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _cpu_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def _metadata_props(meta: dict, guard: Guard | None) -> dict[str, str]:
    props = {FORMAT_KEY: FORMAT, META_KEY: json.dumps(meta, sort_keys=True)}
    if guard is not None:
        from safetensors.torch import save

        props[GUARD_KEY] = base64.b64encode(save(guard.to_tensors())).decode("ascii")
    return props


def _set_metadata(path: str | Path, props: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "pneumoscan"
    onnx.save(proto, str(path))


def read_onnx_metadata(session) -> tuple[dict, Guard | None]:
    """(metadata dict, guard) from an onnxruntime session's ``metadata_props``."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get(FORMAT_KEY) != FORMAT or META_KEY not in props:
        raise ExportError(
            f"not a pneumoscan ONNX model (format {props.get(FORMAT_KEY)!r}); "
            "make one with `pneumoscan export`"
        )
    meta = json.loads(props[META_KEY])
    guard = None
    if GUARD_KEY in props:
        from safetensors.torch import load

        guard = Guard.from_tensors(
            load(base64.b64decode(props[GUARD_KEY])), float(meta["guard"]["threshold"])
        )
    return meta, guard


class OnnxModel(Model):
    """A ``Model`` whose network runs on onnxruntime; thresholds, temperature, guard and predict_files are inherited.

    The graph takes images, not normalised tensors, so this backend overrides ``forward_images``; ``forward``
    (normalised input) undoes the normalisation so callers of either entry point get the same answer.
    """

    def __init__(self, session, meta: dict, guard: Guard | None, path: Path, sha256: str):
        super().__init__(nn.Identity(), meta, guard, path, sha256)  # no torch network; see ``network``
        self.session = session
        self.runtime = "onnxruntime"
        self.uint8_input = session.get_inputs()[0].type == "tensor(uint8)"
        self._unit = _unit(self.preprocessing.size)

    @property
    def network(self) -> nn.Module:
        raise ExportError(
            "this model runs on onnxruntime and has no PyTorch network (needed for Grad-CAM "
            "heatmaps); load the .safetensors model file with the torch backend"
        )

    @network.setter
    def network(self, value: nn.Module) -> None:
        pass  # Model.__init__ assigns one; there is none to keep

    def _feed(self, images: torch.Tensor) -> np.ndarray:
        if self.uint8_input and images.dtype != torch.uint8:
            images = self._unit.normalize(images).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        elif not self.uint8_input:
            images = self._unit.normalize(images)
        elif images.ndim == 3:
            images = images.unsqueeze(1)
        return np.ascontiguousarray(images.numpy())

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, [1,] S, S) -> (logits, pooled features) from onnxruntime."""
        logits, feats = self.session.run(list(OUTPUTS), {INPUT: self._feed(images)})
        return torch.from_numpy(logits), torch.from_numpy(feats)

    @torch.no_grad()
    def forward_images(self, images: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not tta:
            logits, feats = self.run(images)
        else:  # the views are built on [0, 1] images: resampling and padding commute with normalisation
            views = tta_views(self._unit.normalize(images))
            logits, feats = self.run(views[0])
            for view in views[1:]:
                logits = logits + self.run(view)[0]
            logits = logits / len(views)
        scores = self.guard.score(feats) if self.guard is not None else torch.zeros(len(logits))
        return logits.float(), scores

    @torch.no_grad()
    def forward(self, batch: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        prep = self.preprocessing
        return self.forward_images(batch[:, :1] * prep.std[0] + prep.mean[0], tta=tta)


def load_onnx_model(path: str | Path, *, threads: int | None = None) -> OnnxModel:
    """Load an ``.onnx`` file written by ``export_onnx`` for the onnxruntime backend."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ExportError(
            f"{path}: the onnx backend needs an .onnx file; make one with "
            f"`pneumoscan export --model {path} --onnx MODEL.onnx`"
        )
    if not path.is_file():
        raise ExportError(f"{path}: ONNX model file not found")
    session = _session(path, threads)
    meta, guard = read_onnx_metadata(session)
    return OnnxModel(session, meta, guard, path, sha256_file(path))


# ---------------------------------------------------------------------------------------------- images


def read_images(paths: Iterable[str | Path], preprocessing: Preprocessing) -> tuple[np.ndarray, list[int]]:
    """uint8 (N, S, S) images exactly as ``predict_files`` feeds them, and the indices of the readable paths."""
    images, kept = [], []
    for i, path in enumerate(paths):
        try:
            images.append(preprocessing.to_uint8(read_image(path, reduce_to=preprocessing.size)))
            kept.append(i)
        except ImageReadError:
            continue
    size = preprocessing.size
    return (np.stack(images) if images else np.zeros((0, size, size), np.uint8)), kept


def _existing(path: Path, anchor: Path) -> Path:
    """split.csv stores paths as given at training time, relative to where training ran: look upwards from it."""
    if path.is_absolute() or path.exists():
        return path
    for parent in anchor.parents:
        if (parent / path).exists():
            return parent / path
    return path


def run_split(model: Model) -> tuple[list[Sample], list[Sample]] | None:
    """(train, val) samples of the run that produced this model, when its split.csv sits beside the model file."""
    split_file = model.path.parent / "split.csv"
    if not split_file.is_file():
        return None
    recorded = model.meta.get("training", {}).get("split_sha256")
    if recorded and recorded != sha256_file(split_file):
        return None  # a split.csv from another run: its validation images may be this model's training images
    train, val = read_split(split_file)
    fix = [Sample(_existing(s.path, split_file), s.label, s.patient) for s in train + val]
    return fix[: len(train)], fix[len(train) :]


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
    return list_split(data_dir, "train"), list_split(data_dir, "val"), f"{Path(data_dir) / 'val'}"


def check_images(model: Model, data_dir: str | Path | None, limit: int = 64) -> tuple[np.ndarray, str]:
    """Real images to compare the runtimes on: DATA_DIR/val (or test), else the run's validation images.

    Reading the test split is fine here: nothing is chosen on this comparison.
    """
    prep = model.preprocessing
    if data_dir is not None:
        for split in ("val", "test"):
            try:
                samples = list_split(data_dir, split)
            except PneumoscanError:
                continue
            images, _ = read_images([s.path for s in _spread(samples, limit)], prep)
            if len(images):
                return images, f"{len(images)} images from {Path(data_dir) / split}"
        raise ExportError(f"{data_dir}: no readable images in its val or test split")
    split = run_split(model)
    if split is not None:
        images, _ = read_images([s.path for s in _spread(split[1], limit)], prep)
        if len(images):
            return images, f"{len(images)} validation images of the run"
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


def _torch_outputs(wrapper: nn.Module, images: np.ndarray, input_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(images)[:, None]
    if input_dtype == "float32":
        x = x.float() / 255.0
    with torch.no_grad():
        logits, feats = wrapper(x)
    return logits.numpy(), feats.numpy()


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

    images: uint8 (N, S, S) as ``Preprocessing.to_uint8`` makes them. tolerance: largest allowed |logit| difference.
    """
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if isinstance(model, OnnxModel):
        raise ExportError("export needs the PyTorch model (a .safetensors model file or run directory)")
    size = model.preprocessing.size
    wrapper = _ImageToOutputs(model.network, model.preprocessing).eval()
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8 if input_dtype == "uint8" else torch.float32)
    props = _metadata_props({**model.meta, "source_sha256": model.sha256}, model.guard)
    expected = _torch_outputs(wrapper, images, input_dtype)
    result: dict[str, float] = {}

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                tmp,
                input_names=[INPUT],
                output_names=list(OUTPUTS),
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            )
        _set_metadata(tmp, props)
        session = _session(tmp)
        feed = images[:, None] if input_dtype == "uint8" else images[:, None].astype(np.float32) / 255.0
        logits, feats = session.run(list(OUTPUTS), {INPUT: feed})
        result["logits"] = float(np.abs(logits - expected[0]).max()) if len(images) else 0.0
        result["features"] = float(np.abs(feats - expected[1]).max()) if len(images) else 0.0
        if not result["logits"] <= tolerance:
            raise ExportError(
                f"onnxruntime differs from PyTorch by {result['logits']:.3g} in the logits "
                f"(tolerance {tolerance:g}); {out} not written"
            )

    try:
        atomic_write(out, write)
    except PneumoscanError:
        raise
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
    out: str | Path | None,
    *,
    calibration: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    validated_on: str = "",
) -> Int8Result:
    """Write an int8 copy of an exported model and measure its AUC change on validation images.

    Static QDQ quantisation (per-channel weights, activation ranges from ``calibration``: uint8 images from the
    training data) suits convolutions; dynamic quantisation is the fallback if static fails.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    fp32_path = Path(fp32_path)
    out = Path(out) if out is not None else _int8_default_path(fp32_path)
    fp32 = load_onnx_model(fp32_path)
    props = dict(fp32.session.get_modelmeta().custom_metadata_map)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    fp32._feed(torch.from_numpy(calibration[i : i + 16]))
                    for i in range(0, len(calibration), 16)
                ]
            )

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

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
        meta = json.loads(props[META_KEY])
        meta["quantization"] = {
            "method": method,
            "format": "QDQ" if method == "static" else "QOperator",
            "calibration_images": int(len(calibration)) if method == "static" else 0,
            "fp32_sha256": sha256_file(fp32_path),
        }
        props[META_KEY] = json.dumps(meta, sort_keys=True)
        _set_metadata(quantized, props)
        int8 = load_onnx_model(quantized)
        p32, p8 = (
            m.probability(m.forward_images(torch.from_numpy(val_images))[0]).numpy() for m in (fp32, int8)
        )
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


def _auc(labels: np.ndarray, p: np.ndarray) -> float:
    return roc_auc(labels, p) if len(set(labels.tolist())) == 2 else float("nan")


def int8_inputs(
    model: Model, data_dir: str | Path | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(calibration images, validation images, validation labels, description) for ``quantize_int8``."""
    train, val, source = validation_samples(model, data_dir)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(train), size=min(CALIBRATION_IMAGES, len(train)), replace=False) if train else []
    calibration, _ = read_images([train[i].path for i in sorted(pick)], model.preprocessing)
    images, kept = read_images([s.path for s in val], model.preprocessing)
    labels = np.array([val[i].label for i in kept])
    if not len(calibration) or not len(images):
        raise ExportError(
            f"no readable {'calibration' if not len(calibration) else 'validation'} images "
            f"for --int8 ({source})"
        )
    return calibration, images, labels, f"{len(images)} images, {source}"
