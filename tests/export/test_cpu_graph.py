"""The CPU graphs ONNX Runtime serves (export/cpu_graph.py), on the test export's real int8-weight backbone."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from export.cpu_attention import padding_mask_input
from export.cpu_graph import cpu_graph
from export.ort_session import make_session
from tests.export.conftest import backbone_feeds

pytestmark = pytest.mark.slow


def model_of(path, runtime):
    return cpu_graph(onnx.load(str(path)), runtime)[0]


def _ops(path_or_model, runtime):
    model, changes = cpu_graph(onnx.load(str(path_or_model)), runtime)
    return collections.Counter(n.op_type for n in model.graph.node), changes


def test_exact_folds_every_int8_linear_and_fuses_attention(backbone):
    before, _ = _ops(backbone, "qdq")
    ops, changes = _ops(backbone, "exact")
    assert changes["int8_linears"] == before["DequantizeLinear"] > 0 and changes["attention_fused"] > 0
    assert "DequantizeLinear" not in ops and ops["ReduceSum"] < before["ReduceSum"]  # corrections folded too
    assert ops["MultiHeadAttention"] == changes["attention_fused"]
    mha = [n for n in model_of(backbone, "exact").graph.node if n.op_type == "MultiHeadAttention"]
    assert all(n.input[4] == "attention_mask_int32" and len(n.input) == 5 for n in mha)  # key padding, no bias
    assert not set(ops) & {"QuantizeLinear", "MatMulIntegerToFloat", "MatMulNBits"}  # activations stay float


def test_int8_keeps_the_trained_codes(backbone):
    exported = onnx.load(str(backbone))
    codes = sorted(
        onnx.numpy_helper.to_array(i).tobytes()
        for i in exported.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 and i.name.endswith("weight_t")
    )
    model, changes = cpu_graph(exported, "int8")
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    served = []
    for n in matmuls:
        blocks = inits[n.input[1]]  # (N, blocks, block) uint8 codes q
        served.append((blocks.reshape(blocks.shape[0], -1).T.astype(np.int16) - 128).astype(np.int8).tobytes())
    assert len(matmuls) == changes["int8_linears"] == len(codes) and sorted(served) == codes
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in matmuls)  # int8 activations


def test_int8_answers_a_row_the_same_alone_and_in_a_batch(backbone):
    """Activations are quantized per row: what the dynamic batcher merges cannot change an answer."""
    session = make_session(backbone, threads=1, runtime="int8")
    feeds = backbone_feeds(session, batch=4)
    together = session.run(None, feeds)
    for row in range(4):
        alone = session.run(None, {k: v[row : row + 1] for k, v in feeds.items()})
        for a, t in zip(alone, together):
            np.testing.assert_allclose(a[0], t[row], atol=1e-5 * np.abs(t).max())


@pytest.mark.parametrize("runtime", ["exact", "int8"])
def test_rewrites_match_the_exported_graph(backbone, runtime):
    reference = make_session(backbone, threads=1)
    feeds = backbone_feeds(reference)
    expected = reference.run(None, feeds)
    got = make_session(backbone, threads=1, runtime=runtime).run(None, feeds)
    for e, g in zip(expected, got):
        scale = np.abs(e).max()
        if runtime == "exact":
            np.testing.assert_allclose(g, e, atol=1e-5 * scale)
        else:  # int8 activations: close, not equal
            assert np.abs(g - e).max() < 0.25 * scale and np.abs(g - e).max() > 0


def test_unknown_runtime_is_refused(backbone):
    with pytest.raises(ValueError, match="runtime must be one of"):
        make_session(backbone, runtime="fast")


@pytest.mark.parametrize("runtime", ["exact", "int8"])
def test_adapter_runs_sparse_experts_and_batched_taps_exactly(adapter, runtime):
    """The adapter has no int8: both CPU runtimes give the exported adapter's logits, from fewer ops."""
    exported = onnx.load(str(adapter))
    taps = exported.graph.input[0].type.tensor_type.shape.dim[1].dim_value  # hidden_states (B, L, T, D)
    model, changes = cpu_graph(exported, runtime)
    assert changes["sparse_moe"] > 0 and changes["batched_taps"] == taps > 1
    assert "Einsum" not in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(0)
    hidden = onnx.load(str(adapter)).graph.input
    dims = [[d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in hidden]
    for batch, seq in ((1, 5), (4, 17)):
        feeds = {
            "hidden_states": rng.normal(size=(batch, dims[0][1], seq, dims[0][3])).astype(np.float32),
            "cls_states": rng.normal(size=(batch, *dims[1][1:])).astype(np.float32),
            "attention_mask": np.ones((batch, seq), np.int64),
        }
        feeds["attention_mask"][0, seq // 2 :] = 0
        expected = make_session(adapter, threads=1).run(None, feeds)[0]
        got = make_session(adapter, threads=1, runtime=runtime).run(None, feeds)[0]
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())


def _bias_graph(offset: float) -> onnx.ModelProto:
    """bias = (1 - mask) * -1e9 + offset, (B, 1, 1, T): the padding mask alone when offset is 0."""
    h = onnx.helper
    nodes = [
        h.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
        h.make_node("Sub", ["one", "m"], ["pad"]),
        h.make_node("Mul", ["pad", "big"], ["neg"]),
        h.make_node("Add", ["neg", "offset"], ["flat"]),
        h.make_node("Unsqueeze", ["flat", "axes"], ["bias"]),
    ]
    consts = {"one": 1.0, "big": -1e9, "offset": offset}
    inits = [onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    inits.append(onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    graph = h.make_graph(
        nodes,
        "bias",
        [h.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["B", "T"])],
        [h.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])


def test_only_a_pure_padding_bias_becomes_a_key_padding_mask():
    assert padding_mask_input(_bias_graph(0.0), "bias") == "attention_mask"
    assert padding_mask_input(_bias_graph(0.5), "bias") is None  # more than padding: stays a bias
