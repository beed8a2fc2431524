"""Copy a trained run's model into the package as the bundled default model (float16 storage, ~half size).

    python scripts/bundle_default.py runs/default

The weights are stored as float16 and widened to float32 on load; thresholds and temperature are the run's,
chosen on its validation split. Evaluate the bundled file itself (`pneumoscan evaluate` without --model), since
that is what users run. Writes src/pneumoscan/weights/default.safetensors and default.sha256.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pneumoscan.modelfile import read_model_file, resolve_model_path, save_model_file

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "weights"


def main(run: str) -> None:
    source = resolve_model_path(run)
    tensors, meta = read_model_file(source)
    meta = {**meta, "name": "pneumoscan-default", "storage": "float16"}
    sha = save_model_file(WEIGHTS / "default.safetensors", tensors, meta, half=True)
    (WEIGHTS / "default.sha256").write_text(f"{sha}  default.safetensors\n")
    size = (WEIGHTS / "default.safetensors").stat().st_size / 2**20
    print(f"{WEIGHTS / 'default.safetensors'}: {size:.1f} MiB, sha256 {sha}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/default")
