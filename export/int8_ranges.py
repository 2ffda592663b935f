"""Calibrated activation ranges for the CPU `int8` graph, stored in backbone.onnx's metadata.

The exported int8-weight graph quantizes weights only. For ONNX Runtime's int8 GEMMs the inputs of
each linear must be int8 too; quantizing them per call (DynamicQuantizeMatMul, one scale per
tensor) would make a request's answer depend on the rows the dynamic batcher merged with it. So
the range of each linear's input is measured once here, on training rows saved with the checkpoint
(checkpoint/calibration.jsonl), by running the exact CPU graph, and `export.cpu_graph` quantizes
with those fixed ranges. The ranges live in the model's metadata (`RANGES_KEY`): the graph
TensorRT reads is unchanged, and the manifest's checksum covers them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .cpu_graph import RANGES_KEY, cpu_graph, int8_linear_inputs
from .ort_session import DISABLED_OPTIMIZERS, session_options


def calibrate(path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None = None) -> dict[str, list[float]]:
    """{linear input name: [min, max]} over `feeds`, from the exact CPU graph of `path`."""
    if not feeds:
        raise ValueError("int8 calibration needs at least one batch of inputs")
    model = onnx.load(str(path))
    names = int8_linear_inputs(model)
    model, _ = cpu_graph(model, "exact")
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(threads),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=DISABLED_OPTIMIZERS,
    )
    lo, hi = {n: np.inf for n in names}, {n: -np.inf for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    return {n: [lo[n], hi[n]] for n in names}


def store(path: Path, ranges: dict[str, list[float]]) -> None:
    """Write `ranges` into the metadata of the graph file at `path` (its external weights are untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != RANGES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=RANGES_KEY, value=json.dumps(ranges))
    onnx.save(model, str(path))
