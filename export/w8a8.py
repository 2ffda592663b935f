"""W8A8: int8 weights AND activations, so TensorRT can run int8 GEMMs (docs/DESIGN.md section 5).

TensorRT folds an int8 weight DQ with float activations back to float; int8 tensor cores need
Q/DQ on activations too. The calibration is ONNX Runtime's maintained static QDQ quantizer
(symmetric per-tensor activations, symmetric per-channel weights, explicit axis), run on
training rows saved with the checkpoint. Its input is an export with float linears (dequantized
once) and the exact int8 gather embeddings of `int8-weight`.

Q/DQ go on GEMM inputs only, as TensorRT's placement guide recommends. Two graph passes make that
hold with ONNX Runtime's quantizer, and both were measured on the default MiniLM run:
- before calibration, MatMuls that read the same activation (query/key/value) become one MatMul
  and a Split, so every quantized activation feeds exactly one GEMM. ONNX Runtime's CPU fusion to
  MatMulIntegerToFloat needs a DequantizeLinear with a single consumer, and its common-subexpression
  pass merges per-consumer copies back together (3 of 6 GEMMs per layer then ran in fp32).
- after quantization, non-GEMM consumers (the residual Adds) read the float tensor again: the
  quantizer routes every consumer of a quantized tensor through its Q/DQ, which put the residual
  stream on a per-tensor int8 grid.
MatMul outputs are never quantized (`OpTypesToExcludeOutputQuantization`): with them quantized,
the FFN output (range ~200) lost 2 accuracy points and 13% of labels flipped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from .onnx_export import save_with_external_data

QUANTIZED_OPS = ("MatMul",)


class FeedReader(CalibrationDataReader):
    """Feeds a fixed list of input dicts to the calibrator once."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def merge_sibling_matmuls(model: onnx.ModelProto) -> int:
    """MatMuls reading one activation with constant (K, N_i) weights -> one (K, sum N_i) MatMul + Split.

    Returns the number of merged groups. The weights are concatenated on the output axis, so
    per-output-channel weight quantization is unchanged.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    merged = 0
    for activation, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        if len(nodes) < 2 or any(w.ndim != 2 for w in weights) or len({w.shape[0] for w in weights}) != 1:
            continue
        name = nodes[0].name + "_merged"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate(weights, 1), name + "_weight"),
                numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), name + "_sizes"),
            ]
        )
        at = list(graph.node).index(nodes[0])
        for n in nodes:
            graph.node.remove(n)
        graph.node.insert(
            at,
            helper.make_node(
                "Split", [name + "_out", name + "_sizes"], [n.output[0] for n in nodes], name=name + "_split", axis=-1
            ),
        )
        graph.node.insert(at, helper.make_node("MatMul", [activation, name + "_weight"], [name + "_out"], name=name))
        merged += 1
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return merged


def unquantize_non_gemm_consumers(model: onnx.ModelProto) -> int:
    """Point every non-GEMM reader of an activation's Q->DQ copy back at the float tensor; returns how many."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    quantized_from = {
        n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }
    float_of = {
        n.output[0]: quantized_from[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized_from
    }
    rewired = 0
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
                rewired += 1
    return rewired


def quantize_w8a8(fp32_model: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], method: str = "minmax") -> Path:
    """Calibrate activations on `feeds` and write a QDQ model with int8 weights and activations."""
    if not feeds:
        raise ValueError("w8a8 calibration needs at least one batch of inputs")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_model), str(pre), skip_symbolic_shape=True, save_as_external_data=True)
        model = onnx.load(str(pre))
        merge_sibling_matmuls(model)
        save_with_external_data(model, pre)
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(
            str(pre),
            str(quantized),
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            use_external_data_format=True,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QDQKeepRemovableActivations": False,
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
            },
        )
        model = onnx.load(str(quantized))
    unquantize_non_gemm_consumers(model)
    return save_with_external_data(model, Path(out_path))
