"""The onnxruntime backend: an ``.onnx`` file from ``pneumoscan export`` (fp32 or int8) behind the same ``forward``.

The graph starts at the image, a (N, 1, S, S) batch already decoded and resized (float in [0, 1] or uint8, as the
file declares), applies the model's own ``Preprocessing.normalize`` inside, and outputs the logits and the pooled
features. The model record and the guard statistics travel in the file's ``metadata_props``: one ``.onnx`` file is
a complete model. There is no PyTorch network here, so ``gradcam`` is False.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import PneumoscanError
from ..guard import Guard
from ..preprocess import Preprocessing
from ..record import ModelRecord
from .torch import tta_views

FORMAT = "pneumoscan-onnx/1"
META_KEY, GUARD_KEY, FORMAT_KEY = "pneumoscan", "pneumoscan.guard", "format"
INPUT, OUTPUTS = "image", ("logits", "features")


class OnnxError(PneumoscanError):
    """An ONNX model cannot be loaded or run; the message says why."""


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def open_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    # Worker threads sleep between operators instead of spinning: screening decodes images in other threads on the
    # same cores, and a spinning pool takes the CPU they need. On a quiet 2-core machine this was faster for the
    # network alone too (fp32 batch 32: 185 vs 163 images/s; end to end 105 vs 91).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None


def read_metadata(session, where: str = "ONNX file") -> tuple[ModelRecord, Guard | None]:
    """(model record, guard) from an onnxruntime session's ``metadata_props``."""
    props = session.get_modelmeta().custom_metadata_map
    if props.get(FORMAT_KEY) != FORMAT or META_KEY not in props:
        raise OnnxError(f"{where}: not a pneumoscan ONNX model (format {props.get(FORMAT_KEY)!r}); "
                        "make one with `pneumoscan export`")
    record = ModelRecord.from_json(props[META_KEY], where)
    guard = None
    if GUARD_KEY in props and record.guard is not None:
        from safetensors.torch import load

        guard = Guard.from_tensors(load(base64.b64decode(props[GUARD_KEY])), record.guard.threshold)
    return record, guard


def unit(size: int) -> Preprocessing:
    """The identity normalisation: uint8 or float images -> float (N, 1, S, S) in [0, 1], by the same definition."""
    return Preprocessing(size=size, channels=1, mean=(0.0,), std=(1.0,))


class OnnxBackend:
    name = "onnx"
    gradcam = False

    def __init__(self, session, preprocessing: Preprocessing, *, int8: bool = False):
        self.session = session
        self.preprocessing = preprocessing
        self.uint8_input = session.get_inputs()[0].type == "tensor(uint8)"
        self.runtime = "onnxruntime int8" if int8 else "onnxruntime"
        self._unit = unit(preprocessing.size)

    def feed(self, images: torch.Tensor) -> np.ndarray:
        """uint8 or [0, 1] float images (N, [1,] S, S) as the graph's input type wants them."""
        if self.uint8_input and images.dtype != torch.uint8:
            images = self._unit.normalize(images).mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        elif not self.uint8_input:
            images = self._unit.normalize(images)
        elif images.ndim == 3:
            images = images.unsqueeze(1)
        return np.ascontiguousarray(images.numpy())

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.session.run(list(OUTPUTS), {INPUT: self.feed(images)})
        return torch.from_numpy(logits).float(), torch.from_numpy(feats).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, S, S) -> (logits (N, 2), features (N, D)), as ``TorchBackend.forward``."""
        if images.dtype != torch.uint8:
            raise TypeError(f"the scoring function takes uint8 images, got {images.dtype}")
        logits, feats = self.run(images)
        if tta:  # the views are built on [0, 1] images: resampling and padding commute with normalisation
            for view in tta_views(self._unit.normalize(images))[1:]:
                logits = logits + self.run(view)[0]
            logits = logits / 4
        return logits, feats


def load_onnx(path: str | Path, *, threads: int | None = None) -> tuple[OnnxBackend, ModelRecord, Guard | None]:
    """(backend, record, guard) of an ``.onnx`` file written by ``pneumoscan export``."""
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise OnnxError(f"{path}: the onnx backend needs an .onnx file; make one with "
                        f"`pneumoscan export --model {path} --onnx MODEL.onnx`")
    if not path.is_file():
        raise OnnxError(f"{path}: ONNX model file not found")
    session = open_session(path, threads)
    record, guard = read_metadata(session, str(path))
    backend = OnnxBackend(session, record.preprocessing, int8=record.quantization is not None)
    return backend, record, guard


def metadata_props(record: ModelRecord, guard: Guard | None) -> dict[str, str]:
    """What an exported file carries: the record (JSON) and the guard statistics (safetensors, base64)."""
    props = {FORMAT_KEY: FORMAT, META_KEY: json.dumps(record.to_dict(), sort_keys=True)}
    if guard is not None:
        from safetensors.torch import save

        props[GUARD_KEY] = base64.b64encode(save(guard.to_tensors())).decode("ascii")
    return props
