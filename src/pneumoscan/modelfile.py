"""The model file: one self-describing ``.safetensors`` file.

Tensors: the network's state dict, plus the guard's statistics under ``guard.*``. The safetensors header
metadata holds one JSON document (architecture, preprocessing, classes, thresholds, temperature, training and
validation summary, package version). Loading never unpickles anything; the file's sha256 identifies the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .durable import atomic_write  # noqa: F401 (callers import it from here)
from .errors import PneumoscanError

FORMAT = "pneumoscan-model/1"
GUARD_PREFIX = "guard."


class ModelFileError(PneumoscanError):
    pass


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, *, half: bool = False) -> str:
    """Write tensors + metadata atomically; ``half`` stores float tensors as float16. Returns the sha256."""
    from safetensors.torch import save_file

    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        out[name] = tensor.contiguous()
    header = {"format": FORMAT, "pneumoscan": json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=header))
    return sha256_file(path)


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors as float32 where floating, metadata dict). Raises ModelFileError with a clear reason."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a pneumoscan model file ({str(exc).splitlines()[0]})") from None
    if header.get("format") != FORMAT or "pneumoscan" not in header:
        raise ModelFileError(f"{path}: not a pneumoscan model file (format {header.get('format')!r})")
    try:
        meta = json.loads(header["pneumoscan"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt model metadata ({exc})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, meta


def resolve_model_path(model: str | Path) -> Path:
    """A run directory (its model.safetensors) or a model file."""
    path = Path(model)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise ModelFileError(f"{path}: run directory has no model.safetensors (has training finished?)")
        return candidate
    return path
