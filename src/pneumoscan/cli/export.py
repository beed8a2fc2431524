"""``pneumoscan export``: an ONNX file checked against PyTorch, optionally an int8 copy."""

from __future__ import annotations

import argparse

from ..errors import PneumoscanError
from .args import positive_float


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import check_images, export_onnx, int8_inputs, quantize_int8
    from ..predict import load_model

    if not args.onnx.lower().endswith(".onnx"):
        raise PneumoscanError(f"--onnx must name an .onnx file, got {args.onnx!r}")
    # the ONNX graph is float32 and device-independent: traced and checked on the CPU, whatever GPU is there
    model = load_model(args.model, precision="float32", device="cpu")
    int8 = int8_inputs(model, args.data) if args.int8 else None  # fail before the slow export
    images, source = check_images(model, args.data)
    result = export_onnx(model, args.onnx, images=images, checked_on=source, input_dtype=args.input_dtype,
                         tolerance=args.tolerance)
    print(f"wrote {result.path} (sha256 {result.sha256[:12]}; input {args.input_dtype} (N, 1, "
          f"{model.preprocessing.size}, {model.preprocessing.size}); outputs logits, features)")
    print(f"onnxruntime vs PyTorch on {source}: max |logit difference| {result.max_logit_diff:.2e} "
          f"(tolerance {args.tolerance:g}), max |feature difference| {result.max_feature_diff:.2e}")
    if int8 is not None:
        calibration, val_images, val_labels, described = int8
        q = quantize_int8(result.path, calibration=calibration, val_images=val_images, val_labels=val_labels,
                          validated_on=described)
        print(f"wrote {q.path} ({q.method} int8 quantisation, calibrated on {len(calibration)} training images)")
        print(f"int8 on validation ({described}): AUC {q.auc_fp32:.4f} -> {q.auc_int8:.4f} "
              f"(change {q.auc_change:+.4f}), max |probability difference| {q.max_probability_diff:.4f}, "
              f"{q.decisions_changed} screening decision(s) changed")
    return 0


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write an ONNX model (preprocessing inside), checked against PyTorch",
                       description="Write an ONNX model with the preprocessing inside, checked against PyTorch on "
                                   "the CPU (an ONNX file runs on any device onnxruntime has).")
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT.int8.onnx and report its AUC change on validation images")
    p.add_argument("--data", help="Kaggle-layout folder: check on its val/test images; its train/val for --int8 "
                                  "when the model is not a run directory")
    p.add_argument("--input-dtype", choices=["float32", "uint8"], default="float32",
                   help="graph input: float images in [0, 1] (default) or uint8")
    p.add_argument("--tolerance", type=positive_float, default=1e-3, help="largest allowed |logit| difference")
    p.set_defaults(func=cmd_export)
