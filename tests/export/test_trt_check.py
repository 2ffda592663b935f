"""export/trt_check.py: the static TensorRT-compatibility check on tiny hand-built graphs."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.trt_check import (
    TENSORRT_ONNX_OPS,
    Finding,
    TensorRTCompatibilityError,
    assert_tensorrt_compatible,
    check_tensorrt_compatible,
)
from tests import onnx_fixtures as fx


@pytest.mark.parametrize(
    "build",
    [
        fx.int8_linear,
        lambda: fx.int8_linear(activations=True),
        lambda: fx.int8_matmul_fusable()[0],
        fx.int4_block_linear,
        lambda: fx.constant_node_zero_point(0),
        lambda: fx.relu_model(9),
        lambda: fx.relu_model(25),
    ],
    ids=["int8-dq-axis0", "w8a8", "int8-dq-axis1", "int4-block", "constant-node-zero", "opset9", "opset25"],
)
def test_accepts_good_graphs(build):
    model = build()
    assert check_tensorrt_compatible(model) == []
    assert_tensorrt_compatible(model)


BAD = [  # (fixture, node, op, words in the problem)
    (fx.uint8_zero_point_linear, "dq_w", "DequantizeLinear", "uint8"),
    (fx.uint8_zero_point_linear, "dq_w", "DequantizeLinear", "non-zero"),
    (fx.nonzero_zero_point_linear, "dq_w", "DequantizeLinear", "non-zero"),
    (lambda: fx.constant_node_zero_point(3), "dq_w", "DequantizeLinear", "non-zero"),
    (lambda: fx.int4_block_linear(zero_point=1), "dq_w", "DequantizeLinear", "non-zero"),
    (fx.per_channel_without_axis, "dq_w", "DequantizeLinear", "axis"),
    (fx.quantize_without_zero_point, "q_x", "QuantizeLinear", "uint8"),
    (fx.com_microsoft_op, "fast_gelu", "com.microsoft.FastGelu", "custom domain"),
    (fx.dynamic_int8_matmul, "dyn_q", "DynamicQuantizeLinear", "not supported"),
    (fx.dynamic_int8_matmul, "matmul_integer", "MatMulInteger", "not supported"),
    (lambda: fx.relu_model(8), "<model>", "opset_import", "opset 8"),
    (lambda: fx.relu_model(26), "<model>", "opset_import", "opset 26"),
    (fx.if_with_bad_dq, "pick_bias/then_branch/dq_bias", "DequantizeLinear", "uint8"),
]


@pytest.mark.parametrize("build,node,op,words", BAD)
def test_rejects_bad_graph_naming_node_and_problem(build, node, op, words):
    findings = check_tensorrt_compatible(build())
    assert any(f.node == node and f.op == op and words in f.problem and f.level == "error" for f in findings), findings
    with pytest.raises(TensorRTCompatibilityError) as err:
        assert_tensorrt_compatible(build())
    assert node in str(err.value) and op in str(err.value) and words in str(err.value)


def test_error_lists_every_finding():
    with pytest.raises(TensorRTCompatibilityError) as err:
        assert_tensorrt_compatible(fx.uint8_zero_point_linear())
    assert len(err.value.findings) == 2
    assert "2 TensorRT compatibility finding(s)" in str(err.value)


def test_non_constant_scale_is_a_warning():
    findings = check_tensorrt_compatible(fx.non_constant_scale())
    assert findings == [Finding("dq_w", "DequantizeLinear", findings[0].problem, "warning")]
    assert "not a constant initializer" in findings[0].problem
    with pytest.raises(TensorRTCompatibilityError):
        assert_tensorrt_compatible(fx.non_constant_scale())
    assert_tensorrt_compatible(fx.non_constant_scale(), allow_warnings=True)


def test_reads_a_path_and_honours_the_opset_range(tmp_path):
    path = fx.save(fx.relu_model(21), tmp_path, "relu21")
    assert check_tensorrt_compatible(path) == []
    assert check_tensorrt_compatible(str(path), max_opset=20)[0].problem.endswith("(9-20)")
    with pytest.raises(FileNotFoundError):
        check_tensorrt_compatible(tmp_path / "missing.onnx")


def _local_function_model(body_op: str):
    """A node calling a model-local function (TensorRT inlines these) whose body holds `body_op`."""
    fn = helper.make_function(
        "local.fns",
        "Act",
        ["a"],
        ["b"],
        [helper.make_node(body_op, ["a"], ["b"], name="inner")],
        [helper.make_opsetid("", fx.OPSET)],
    )
    model = fx.make_model(
        [helper.make_node("Act", ["x"], ["y"], name="act", domain="local.fns")],
        [fx._x()],
        [fx._y(fx.K)],
        extra_opsets=[("local.fns", 1)],
    )
    model.functions.append(fn)
    return model


def test_checks_local_function_bodies_not_the_call():
    assert check_tensorrt_compatible(_local_function_model("Relu")) == []
    findings = check_tensorrt_compatible(_local_function_model("Det"))
    assert [(f.node, f.op) for f in findings] == [("act/Act/inner", "Det")]


def test_op_list_covers_the_transformer_ops_and_lacks_ort_quant_ops():
    needed = {
        "MatMul",
        "Gemm",
        "Add",
        "Mul",
        "Softmax",
        "LayerNormalization",
        "Erf",
        "Gelu",
        "Tanh",
        "Gather",
        "Reshape",
        "Transpose",
        "Where",
        "TopK",
        "GatherElements",
        "ReduceSum",
        "QuantizeLinear",
        "DequantizeLinear",
        "Cast",
        "Concat",
        "Slice",
        "Unsqueeze",
        "If",
        "Loop",
    }
    assert needed <= TENSORRT_ONNX_OPS
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "MatMulNBits"} & TENSORRT_ONNX_OPS


def test_uint8_graph_input_to_dequantize_is_flagged():
    nodes = [helper.make_node("DequantizeLinear", ["codes", "s"], ["y"], name="dq_in", axis=0)]
    codes = helper.make_tensor_value_info("codes", TensorProto.UINT8, [4])
    model = fx.make_model(
        nodes,
        [codes],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.float32(0.1), "s")],
    )
    (finding,) = check_tensorrt_compatible(model)
    assert finding.node == "dq_in" and "input is uint8" in finding.problem
