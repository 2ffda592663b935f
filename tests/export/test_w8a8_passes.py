"""The two graph passes around ONNX Runtime's w8a8 quantizer, on hand-built graphs run in ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.w8a8 import merge_sibling_matmuls, unquantize_non_gemm_consumers
from tests.onnx_fixtures import make_model

K = 16


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _siblings() -> onnx.ModelProto:
    """x feeds three MatMuls (widths 8, 8, 24), a Relu, and one MatMul on another input width."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((K, n)).astype(np.float32), f"w{i}")
        for i, n in enumerate((8, 8, 24))
    ]
    inits.append(numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w_next"))
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
    nodes += [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["y0", "w_next"], ["z"], name="mm_next"),
    ]
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", w])
        for n, w in (("y0", 8), ("y1", 8), ("y2", 24), ("r", K), ("z", 4))
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])], outs, inits)


def test_sibling_matmuls_become_one_matmul_and_split_with_equal_outputs():
    model = _siblings()
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    before = _run(model, x)
    assert merge_sibling_matmuls(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Split") == 1  # the merged one and mm_next (single reader)
    assert {i.name for i in model.graph.initializer} == {"mm0_merged_weight", "mm0_merged_sizes", "w_next"}
    onnx.checker.check_model(model)
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _quantized_residual() -> onnx.ModelProto:
    """x -> Q -> DQ feeding both a GEMM and a residual Add, as ONNX Runtime's quantizer leaves it."""
    w = np.random.default_rng(2).integers(-127, 128, (K, K)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "x_s"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(K, 0.01, np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(K, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w", axis=1),
        helper.make_node("MatMul", ["x_dq", "w"], ["h"], name="gemm"),
        helper.make_node("Add", ["h", "x_dq"], ["y"], name="residual"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", K])],
        inits,
    )


def test_residual_reads_the_float_tensor_and_the_gemm_keeps_its_qdq():
    model = _quantized_residual()
    x = np.random.default_rng(3).uniform(-3, 3, (4, K)).astype(np.float32)
    assert unquantize_non_gemm_consumers(model) == 1
    nodes = {n.name: n for n in model.graph.node}
    assert list(nodes["residual"].input) == ["h", "x"]
    assert list(nodes["gemm"].input) == ["x_dq", "w"]  # the weight DQ (initializer input) is untouched too
    x_dq = np.clip(np.round(x / 0.05), -128, 127) * 0.05
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_q")).astype(np.float32) * 0.01
    np.testing.assert_allclose(_run(model, x)[0], x_dq @ w + x, rtol=1e-4, atol=1e-4)
