"""Tiny hand-built ONNX graphs for the export-stage tests (onnx.helper only, no exporter).

Each builder returns a ModelProto; `save(model, dir, name)` writes it. The good graphs follow
docs/DESIGN.md section 5 (int8 symmetric weights, DQ with an explicit axis); each bad graph breaks one rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
K, N = 64, 32  # in / out features of the toy linear layer


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "fixture", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def save(model: onnx.ModelProto, directory: str | Path, name: str) -> Path:
    path = Path(directory) / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _x(k=K):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])


def _y(n=N):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])


def int8_weight(k=K, n=N, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes (N, K) in torch's Linear layout and per-output-channel scales (N,)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
    s = (rng.random(n) * 0.02 + 0.005).astype(np.float32)
    return q, s


def reference_linear(x: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """y = x @ (s * q)^T in float64, the exact value every runtime is compared with."""
    w = q.astype(np.float64) * s.astype(np.float64)[:, None]  # (N, K)
    return (x.astype(np.float64) @ w.T).astype(np.float32)  # (B, N)


def int8_linear(k=K, n=N, seed=0, activations=False) -> onnx.ModelProto:
    """Good: int8 W (N, K), DQ(axis=0, zero point 0) -> Transpose -> MatMul; optional activation Q/DQ."""
    q, s = int8_weight(k, n, seed)
    inits = [
        numpy_helper.from_array(q, "w_q"),
        numpy_helper.from_array(s, "w_s"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"], name="w_transpose", perm=[1, 0]),
    ]
    x = "x"
    if activations:  # w8a8: per-tensor symmetric activation Q/DQ
        inits += [numpy_helper.from_array(np.float32(0.05), "x_s"), numpy_helper.from_array(np.int8(0), "x_zp")]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"),
            helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"),
        ]
        x = "x_dq"
    nodes.append(helper.make_node("MatMul", [x, "w_t"], ["y"], name="matmul"))
    return make_model(nodes, [_x(k)], [_y(n)], inits)


def int8_matmul_fusable(k=256, n=64, seed=0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Good: W stored (K, N), DQ(axis=1) straight into MatMul: the pattern ORT fuses into MatMulNBits."""
    q, s = int8_weight(k, n, seed)
    inits = [numpy_helper.from_array(np.ascontiguousarray(q.T), "w_q"), numpy_helper.from_array(s, "w_s")]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    return make_model(nodes, [_x(k)], [_y(n)], inits), q, s


def _dq_matmul(w_q: TensorProto, scale: np.ndarray, zero_point: TensorProto | None, **dq_attrs):
    """W (K, N) -> DQ -> MatMul with the given codes / zero point."""
    inits = [w_q, numpy_helper.from_array(scale, "w_s")]
    inputs = ["w_q", "w_s"]
    if zero_point is not None:
        inits.append(zero_point)
        inputs.append(zero_point.name)
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["w"], name="dq_w", **dq_attrs),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    return make_model(nodes, [_x()], [_y()], inits)


def uint8_zero_point_linear() -> onnx.ModelProto:
    """Bad: ORT-style asymmetric uint8 codes with zero point 128."""
    q = np.random.default_rng(1).integers(0, 256, size=(K, N)).astype(np.uint8)
    zp = numpy_helper.from_array(np.full(N, 128, np.uint8), "w_zp")
    return _dq_matmul(numpy_helper.from_array(q, "w_q"), np.full(N, 0.01, np.float32), zp, axis=1)


def nonzero_zero_point_linear() -> onnx.ModelProto:
    """Bad: int8 codes but a non-zero zero point."""
    q = np.random.default_rng(2).integers(-127, 128, size=(K, N)).astype(np.int8)
    zp = numpy_helper.from_array(np.arange(N, dtype=np.int8) % 3, "w_zp")
    return _dq_matmul(numpy_helper.from_array(q, "w_q"), np.full(N, 0.01, np.float32), zp, axis=1)


def per_channel_without_axis() -> onnx.ModelProto:
    """Bad: per-channel scale (N,) and no axis attribute (ONNX falls back to axis=1)."""
    q = np.random.default_rng(3).integers(-127, 128, size=(K, N)).astype(np.int8)
    return _dq_matmul(numpy_helper.from_array(q, "w_q"), np.full(N, 0.01, np.float32), None)


def int4_block_linear(zero_point: int = 0, block=32) -> onnx.ModelProto:
    """Good for zero_point=0: INT4 weights, block-quantized DQ(axis=0, block_size) with an int4 zero point."""
    q = np.random.default_rng(4).integers(-8, 8, size=(K, N))
    w_q = helper.make_tensor("w_q", TensorProto.INT4, (K, N), q.ravel().tolist())
    zp = helper.make_tensor("w_zp", TensorProto.INT4, (K // block, N), [zero_point] * (K // block * N))
    return _dq_matmul(w_q, np.full((K // block, N), 0.01, np.float32), zp, axis=0, block_size=block)


def constant_node_zero_point(value: int) -> onnx.ModelProto:
    """Zero point comes from a Constant node (not an initializer); bad when value != 0."""
    q, s = int8_weight()
    zp = helper.make_node(
        "Constant", [], ["w_zp"], name="zp_const", value=numpy_helper.from_array(np.full(N, value, np.int8))
    )
    nodes = [
        zp,
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"], name="w_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"], name="matmul"),
    ]
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(s, "w_s")]
    return make_model(nodes, [_x()], [_y()], inits)


def quantize_without_zero_point() -> onnx.ModelProto:
    """Bad: activation QuantizeLinear with no zero point, so ONNX makes it uint8."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_s"], ["y"], name="dq_x"),
    ]
    inits = [numpy_helper.from_array(np.float32(0.05), "x_s")]
    return make_model(nodes, [_x()], [_y(K)], inits)


def non_constant_scale() -> onnx.ModelProto:
    """Warning: the weight scale is a graph input, not a build-time constant."""
    q, _ = int8_weight()
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=0),
        helper.make_node("Transpose", ["w"], ["w_t"], name="w_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_t"], ["y"], name="matmul"),
    ]
    scale_in = helper.make_tensor_value_info("w_s", TensorProto.FLOAT, [N])
    return make_model(nodes, [_x(), scale_in], [_y()], [numpy_helper.from_array(q, "w_q")])


def com_microsoft_op() -> onnx.ModelProto:
    """Bad: an ONNX Runtime contrib op (com.microsoft.FastGelu)."""
    nodes = [helper.make_node("FastGelu", ["x"], ["y"], name="fast_gelu", domain="com.microsoft")]
    return make_model(nodes, [_x()], [_y(K)], extra_opsets=[("com.microsoft", 1)])


def dynamic_int8_matmul() -> onnx.ModelProto:
    """Bad: what onnxruntime's quantize_dynamic emits, DynamicQuantizeLinear + MatMulInteger (not in TensorRT)."""
    q = np.random.default_rng(5).integers(-127, 128, size=(K, N)).astype(np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_s", "x_zp"], name="dyn_q"),
        helper.make_node("MatMulInteger", ["x_q", "w_q", "x_zp"], ["acc"], name="matmul_integer"),
        helper.make_node("Cast", ["acc"], ["acc_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["acc_f", "x_s"], ["y"], name="rescale"),
    ]
    return make_model(nodes, [_x()], [_y()], [numpy_helper.from_array(q, "w_q")])


def relu_model(opset: int) -> onnx.ModelProto:
    """A one-Relu graph at the given default-domain opset (8 and 26 fall outside TensorRT's range)."""
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_x()], [_y(K)], opset=opset)


def if_with_bad_dq() -> onnx.ModelProto:
    """Bad inside a subgraph: an If whose then-branch dequantizes uint8 codes with zero point 128."""
    q = np.random.default_rng(6).integers(0, 256, size=(K,)).astype(np.uint8)
    then_nodes = [helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_zp"], ["b"], name="dq_bias")]
    then_inits = [
        numpy_helper.from_array(q, "b_q"),
        numpy_helper.from_array(np.float32(0.1), "b_s"),
        numpy_helper.from_array(np.uint8(128), "b_zp"),
    ]
    then_graph = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [K])], then_inits
    )
    else_graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["b0"], name="zeros", value=numpy_helper.from_array(np.zeros(K, np.float32))
            )
        ],
        "else",
        [],
        [helper.make_tensor_value_info("b0", TensorProto.FLOAT, [K])],
    )
    nodes = [
        helper.make_node("If", ["cond"], ["bias"], name="pick_bias", then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Add", ["x", "bias"], ["y"], name="add_bias"),
    ]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    return make_model(nodes, [_x(), cond], [_y(K)])


def dangling_input() -> onnx.ModelProto:
    """Broken: Add reads a tensor nothing produces."""
    return make_model([helper.make_node("Add", ["x", "missing"], ["y"], name="add_dangling")], [_x()], [_y(K)])


def wrong_input_type() -> onnx.ModelProto:
    """Broken: Add of float and int64."""
    c = numpy_helper.from_array(np.ones(K, np.int64), "c")
    return make_model([helper.make_node("Add", ["x", "c"], ["y"], name="add_wrong_type")], [_x()], [_y(K)], [c])


def scale_dequantize_scales(path: Path, factor: float) -> int:
    """Multiply every DequantizeLinear scale of the graph at `path` by `factor` in place; returns how many."""
    from export.onnx_export import save_with_external_data

    model = onnx.load(str(path))
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for init in model.graph.initializer:
        if init.name in scales:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    save_with_external_data(model, Path(path))
    return len(scales)
