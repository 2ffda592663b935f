"""ONNX Runtime sessions with the options this project has decided on (docs/DESIGN.md section 6).

At ORT_ENABLE_EXTENDED and above, ORT fuses DequantizeLinear -> MatMul into MatMulNBits. With
accuracy level 4 that kernel quantizes activations to int8 (about 0.6% relative error); level 1
keeps fp32 activations and matches PyTorch. Default: level 1 (exact, what parity is checked at);
level 4 is an opt-in speed mode whose accuracy cost the export stage measures.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

EXACT_ACCURACY_LEVEL = 1
FAST_ACCURACY_LEVEL = 4


def session_options(threads: int | None = None, accuracy_level: int = EXACT_ACCURACY_LEVEL) -> ort.SessionOptions:
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0-4, got {accuracy_level}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def make_session(
    path: str | os.PathLike,
    threads: int | None = None,
    accuracy_level: int = EXACT_ACCURACY_LEVEL,
    providers: list[str] | None = None,
) -> ort.InferenceSession:
    """Open `path` on the given providers (CPU by default) with the project's session options."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist: run `make export` first")
    providers = providers or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=session_options(threads, accuracy_level), providers=providers)
