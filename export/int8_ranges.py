"""Calibrated activation ranges for the CPU `int8` graph, stored in backbone.onnx's metadata.

The exported int8-weight graph quantizes weights only. For ONNX Runtime's int8 GEMMs the inputs of
each linear must be int8 too; quantizing them per call (DynamicQuantizeMatMul, one scale per
tensor) would make a request's answer depend on the rows the dynamic batcher merged with it. So
the range of each linear's input is measured once here, on training rows saved with the checkpoint
(checkpoint/calibration.jsonl), by running the exact CPU graph, and `export.cpu_graph` quantizes
with those fixed ranges. The ranges live in the model's metadata (`RANGES_KEY`): the graph
TensorRT reads is unchanged, and the manifest's checksum covers them.

A range is the [0.001%, 99.999%] quantile interval of the input's values at real tokens, not its
min/max: one outlier then no longer sets the step of every other value. Chosen on the validation
split of two default MiniLM runs (label agreement with the exact graph 0.9758 / 0.9805 against
0.9735 / 0.9758 for min/max; accuracy -0.63 / -0.54 points with min/max, +0.07 / -0.23 with
quantiles; 99.99% clipped too much: agreement 0.9539).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .cpu_graph import RANGES_KEY, cpu_graph, int8_linear_inputs
from .ort_session import session_for_model

QUANTILE = 0.99999
BINS = 16384


def calibrate(
    path: Path, feeds: list[dict[str, np.ndarray]], threads: int | None = None, quantile: float = QUANTILE
) -> dict[str, list[float]]:
    """{linear input name: [low, high]} quantiles over real tokens of `feeds`, from the exact CPU graph of `path`.

    Two passes: min/max, then a histogram of BINS bins over them per tensor (memory stays one batch).
    """
    if not feeds:
        raise ValueError("int8 calibration needs at least one batch of inputs")
    model = onnx.load(str(path))
    names = int8_linear_inputs(model)
    model, _ = cpu_graph(model, "exact")
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = session_for_model(model, threads)

    def real_tokens():
        for feed in feeds:
            mask = feed["attention_mask"].astype(bool)  # (B, T)
            for name, value in zip(names, session.run(names, feed)):  # each (B, T, K)
                yield name, value[mask] if value.shape[:2] == mask.shape else value

    lo, hi = {n: np.inf for n in names}, {n: -np.inf for n in names}
    for name, value in real_tokens():
        lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    counts = {n: np.zeros(BINS, np.int64) for n in names}
    for name, value in real_tokens():
        counts[name] += np.histogram(value, BINS, (lo[name], hi[name]))[0]
    ranges = {}
    for n in names:
        edges = np.linspace(lo[n], hi[n], BINS + 1)
        cdf = np.cumsum(counts[n]) / counts[n].sum()
        low = edges[np.searchsorted(cdf, 1 - quantile)]  # left edge of the bin holding the low quantile
        high = edges[np.searchsorted(cdf, quantile) + 1]  # right edge of the bin holding the high quantile
        ranges[n] = [float(low), float(high)]
    return ranges


def store(path: Path, ranges: dict[str, list[float]]) -> None:
    """Write `ranges` into the metadata of the graph file at `path` (its external weights are untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != RANGES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=RANGES_KEY, value=json.dumps(ranges))
    onnx.save(model, str(path))
