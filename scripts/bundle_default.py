"""Copy a trained run's model into the package as the bundled default model (float16 storage, ~half size).

    python scripts/bundle_default.py runs/default [--out DIR]

The model file's record is read as a typed ``ModelRecord`` (any record version) and written back at the current
version, renamed ``pneumoscan-default`` with ``storage: float16``; the weights are stored as float16 and widened
to float32 on load; thresholds, calibration, guard and precision are the run's, chosen on its validation split.
Writes DIR/default.safetensors and DIR/default.sha256 (DIR: src/pneumoscan/weights).

The package refuses a file named ``pneumoscan-default`` whose sha256 is not ``BUNDLED_SHA256`` in
src/pneumoscan/predict.py, so after bundling that constant must be set to the sha256 printed here. Then evaluate
the bundled file itself (`pneumoscan evaluate` without --model), since that is what users run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "pneumoscan" / "weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default="runs/default", help="run directory or model file")
    parser.add_argument("--out", default=str(WEIGHTS), help=f"folder to write into (default {WEIGHTS})")
    args = parser.parse_args(argv)

    from pneumoscan.modelfile import resolve_model_path, save_model_file
    from pneumoscan.predict import BUNDLED_SHA256, DEFAULT_NAME, read_record

    source = resolve_model_path(args.run)
    tensors, record = read_record(source)
    record = record.with_(name=DEFAULT_NAME, storage="float16")
    out = Path(args.out)
    target = out / "default.safetensors"
    sha = save_model_file(target, tensors, record.to_dict(), half=True)
    (out / "default.sha256").write_text(f"{sha}  default.safetensors\n")
    size = target.stat().st_size / 2**20
    print(f"{target}: {size:.1f} MiB from {source} ({record.arch}, {record.preprocessing.size} px, "
          f"precision {record.precision}, record version {record.record_version})")
    print(f"sha256 {sha}")
    if sha == BUNDLED_SHA256:
        print("BUNDLED_SHA256 in src/pneumoscan/predict.py already equals it: nothing else to change")
    else:
        print(f"REMINDER: set BUNDLED_SHA256 in src/pneumoscan/predict.py to {sha} (it is {BUNDLED_SHA256[:12]}...); "
              "until then the package refuses this file as a modified copy of the bundled model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
