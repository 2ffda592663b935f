"""ONNX Runtime sessions with the options this project has decided on (docs/DESIGN.md section 6).

At ORT_ENABLE_EXTENDED and above, ORT fuses DequantizeLinear -> MatMul into MatMulNBits. With
accuracy level 4 that kernel quantizes activations to int8 (about 0.6% relative error); level 1
keeps fp32 activations and matches PyTorch. Default: level 1 (exact, what parity is checked at).

`runtime` picks the graph run on CPU (`export.cpu_graph`): `qdq` the exported file as it is,
`exact` int8 weights folded to float once at load, `int8` int8 GEMMs on the trained codes. Two
options were measured on the default MiniLM export (2-core Sapphire Rapids VM, docs/export_bench.md):
- intra-op threads do not spin between calls: with two sessions (backbone, adapter) or another
  runtime taking turns on two cores, spinning threads took 45 ms at batch 1 against 26 without;
- SkipLayerNormalization fusion is off: that kernel took 47 ms per batch-32 backbone call, its
  unfused LayerNormalization + Add 10 + 31 ms less in total (ONNX Runtime 1.32).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from .cpu_graph import RUNTIMES, cpu_graph

EXACT_ACCURACY_LEVEL = 1
FAST_ACCURACY_LEVEL = 4
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def session_options(threads: int | None = None, accuracy_level: int = EXACT_ACCURACY_LEVEL) -> ort.SessionOptions:
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0-4, got {accuracy_level}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
    runtime: str = "qdq",
) -> ort.InferenceSession:
    """Open `path` on the given providers (CPU by default), rewritten for `runtime`, with the project's options."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist: run `make export` first")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    source = str(path) if runtime == "qdq" else cpu_graph(onnx.load(str(path)), runtime)[0].SerializeToString()
    return _session(source, threads, accuracy_level, providers)


def session_for_model(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session, with the project's options, on a model built in memory (e.g. with extra outputs)."""
    return _session(model.SerializeToString(), threads)


def _session(
    source: str | bytes,
    threads: int | None = None,
    accuracy_level: int = EXACT_ACCURACY_LEVEL,
    providers: list[str] | None = None,
) -> ort.InferenceSession:
    return ort.InferenceSession(
        source,
        sess_options=session_options(threads, accuracy_level),
        providers=providers or ["CPUExecutionProvider"],
        disabled_optimizers=DISABLED_OPTIMIZERS,
    )
