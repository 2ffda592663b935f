"""`python -m export`: turn a training checkpoint into ONNX graphs (and TensorRT engines where available)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from contracts.artifacts import ArtifactError
from contracts.parity_report import ParityGate

from .onnx_export import DEFAULT_OPSET
from .pipeline import ExportConfig, ExportError, run_export
from .qdq import PRECISIONS

EPILOG = """precisions:
  int8-weight  (default) int8 weights as symmetric DequantizeLinear + exact zero-point correction;
               equals the trained model; valid for TensorRT
  w8a8         int8 weights and calibrated int8 activations on every MatMul input (ONNX Runtime
               static QDQ calibrator); what TensorRT needs for int8 tensor-core GEMMs, and the
               fastest graph on CPU ONNX Runtime (int8 GEMMs)
  fp16         dequantized fp16 weights and compute (GPU runtimes)
  int4-weight  symmetric block-quantized int4 weights (opset 21)

outputs in RUN/onnx: backbone.onnx, adapter.onnx (+ .data), io_spec.json, tokenizer/, parity.json,
manifest.json; RUN/engines/*.plan where TensorRT is installed.
"""


def _limit(item: str) -> tuple[str, float]:
    key, sep, value = item.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r}: expected LIMIT=NUMBER, e.g. logits_quantile_max=2e-3") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory holding checkpoint/, e.g. runs/default")
    p.add_argument("--precision", choices=PRECISIONS, default="int8-weight")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help="ONNX opset, 19-25 (default %(default)s: the first with a Gelu op)",
    )
    p.add_argument("--parity-rows", type=int, default=None, help="held-out rows for parity (default: all)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime / torch threads")
    p.add_argument("--tensorrt", choices=("auto", "off"), default="auto")
    p.add_argument(
        "--calibration",
        choices=("minmax", "percentile", "entropy"),
        default="minmax",
        help="w8a8 activation calibration (ONNX Runtime's calibrators)",
    )
    p.add_argument("--no-fp32-size", action="store_true", help="skip the fp32 reference export used for the size ratio")
    p.add_argument(
        "--accept",
        nargs="+",
        default=[],
        metavar="LIMIT=VALUE",
        type=_limit,
        help="relax a parity limit after reading a failed report, e.g. logits_quantile_max=2e-3; "
        "recorded in parity.json (limits: " + ", ".join(f.name for f in fields(ParityGate)) + ")",
    )
    for name in ("min_batch", "opt_batch", "max_batch", "min_seq", "opt_seq", "max_seq"):
        default = next(f.default for f in fields(ExportConfig) if f.name == name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help="TensorRT optimization profile")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = ExportConfig(
            precision=a.precision,
            opset=a.opset,
            parity_rows=a.parity_rows,
            threads=a.threads,
            tensorrt=a.tensorrt,
            calibration=a.calibration,
            compare_fp32_size=not a.no_fp32_size,
            min_batch=a.min_batch,
            opt_batch=a.opt_batch,
            max_batch=a.max_batch,
            min_seq=a.min_seq,
            opt_seq=a.opt_seq,
            max_seq=a.max_seq,
            accept=dict(a.accept),
        )
        run_export(a.run, cfg)
    except (ArtifactError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
