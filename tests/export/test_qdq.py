"""Export forms of the quantized modules: exact symmetric int8 re-expression, int4 blocks, and the
int8-weight ONNX backbone (TensorRT-valid Q/DQ, a quarter of the fp32 bytes)."""

import copy
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from export.io_spec import backbone_io
from export.onnx_export import export_backbone, onnx_size_bytes
from export.ort_session import make_session
from export.qdq import (
    Int4BlockLinear,
    Int8GatherEmbedding,
    SymmetricInt8Linear,
    convert_for_export_,
    symmetric_reexpression,
)
from export.trt_check import check_tensorrt_compatible
from training.backbone import BackboneTap
from training.config import QuantConfig
from training.quant import QuantizedEmbedding, QuantizedLinear, quantize_


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def skewed_linear(in_f=64, out_f=48, bias=True, seed=0) -> nn.Linear:
    """Rows of very different ranges and offsets, including all-positive and all-negative rows."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, out_f)[:, None])
        lin.weight[:8] += torch.linspace(-3, 3, 8)[:, None]
        lin.weight[8] = lin.weight[8].abs() + 0.1
        lin.weight[9] = -lin.weight[9].abs() - 0.1
    return lin


def test_symmetric_reexpression_is_exact_per_row():
    layer = QuantizedLinear.from_float(skewed_linear())
    q, s, z = layer.codes(), layer.scale, layer.zero_point
    assert int(z.min()) == 0 and int(z.max()) == 255  # the all-positive and all-negative rows
    q8, corr = symmetric_reexpression(q, s, z)
    assert q8.dtype == torch.int8 and corr.shape == s.shape
    assert torch.equal(q8.to(torch.int16) + 128, q.to(torch.int16))
    w_sym = s[:, None] * q8.float() + corr[:, None]  # DQ(q', s) + s (128 - z)
    torch.testing.assert_close(w_sym, layer.dequantize(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_symmetric_int8_linear_equals_the_trained_layer(bias):
    layer = QuantizedLinear.from_float(skewed_linear(bias=bias))
    sym = SymmetricInt8Linear(layer)
    assert sym.weight_t.dtype == torch.int8 and sym.weight_t.shape == (64, 48)
    torch.manual_seed(1)
    for x in (torch.randn(5, 7, 64), torch.randn(3, 64) * 10 + 2):
        with torch.no_grad():
            ref, out = layer(x), sym(x)
        assert rel_err(out, ref) < 1e-5


def test_symmetric_int8_linear_refuses_4_bit_codes():
    with pytest.raises(ValueError, match="8-bit"):
        SymmetricInt8Linear(QuantizedLinear.from_float(skewed_linear(), bits=4))


def test_int8_gather_embedding_equals_the_quantized_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    with torch.no_grad():
        emb.weight[1:10] += 4.0  # rows that do not span zero
    q = QuantizedEmbedding.from_float(emb)
    gather = Int8GatherEmbedding(q)
    assert gather.weight.dtype == torch.int8
    ids = torch.tensor([[0, 1, 5, 49, 9], [3, 3, 2, 0, 7]])
    torch.testing.assert_close(gather(ids), q(ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_f", [64, 70])
def test_int4_block_linear_is_within_int4_error(in_f):
    layer = QuantizedLinear.from_float(skewed_linear(in_f, 20))
    int4 = Int4BlockLinear(layer, block_size=32)
    nb = -(-in_f // 32)
    assert int4.weight_t.shape == (in_f, 20) and int4.scale.shape == (nb, 20)
    assert int(int4.weight_t.min()) >= -8 and int(int4.weight_t.max()) <= 7
    w8 = layer.dequantize().t()  # (in, out)
    w4 = int4.weight_t.float() * int4.scale.repeat_interleave(32, 0)[:in_f]
    # round to nearest on a symmetric grid of step s = max|w| / 7 per block: error <= s / 2
    step = int4.scale.repeat_interleave(32, 0)[:in_f]
    assert ((w4 - w8).abs() <= step / 2 + 1e-6).all()
    for b in range(nb):  # each block's largest weight sits on the grid's end point
        block = w8[b * 32 : (b + 1) * 32]
        torch.testing.assert_close(int4.scale[b], block.abs().amax(0) / 7)
    x = torch.randn(4, in_f)
    with torch.no_grad():
        out, ref = int4(x), layer(x)
    torch.testing.assert_close(out, x @ w4 + layer.bias, rtol=1e-5, atol=1e-5)
    assert 1e-3 < rel_err(out, ref) < 0.15  # really 4-bit, and no worse than 4-bit


def tiny_quantized_bert(hidden=32, layers=2, vocab=1000, bits=8) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )
    enc = BertModel(cfg, add_pooling_layer=False).eval()
    quantize_(enc, QuantConfig(bits=bits, keep_fp_reference=False))
    return enc


def _count(module, cls):
    return sum(isinstance(m, cls) for m in module.modules())


@pytest.mark.parametrize(
    "precision, linear_type, tol",
    [
        ("int8-weight", SymmetricInt8Linear, 1e-5),
        ("fp32", nn.Linear, 1e-5),
        ("fp16", nn.Linear, 1e-5),
        ("int4-weight", Int4BlockLinear, 0.2),
    ],
)
def test_convert_for_export_replaces_every_quantized_module(precision, linear_type, tol):
    enc = tiny_quantized_bert()
    n_lin, n_emb = _count(enc, QuantizedLinear), _count(enc, QuantizedEmbedding)
    assert (n_lin, n_emb) == (12, 3)
    conv = convert_for_export_(copy.deepcopy(enc), precision)
    assert _count(conv, QuantizedLinear) == _count(conv, QuantizedEmbedding) == 0
    assert _count(conv, linear_type) == n_lin
    emb_type = Int8GatherEmbedding if precision in ("int8-weight", "int4-weight") else nn.Embedding
    assert _count(conv, emb_type) == n_emb
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        ref = enc(input_ids=ids).last_hidden_state
        out = conv(input_ids=ids).last_hidden_state
    assert rel_err(out, ref) < tol


def test_convert_for_export_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        convert_for_export_(tiny_quantized_bert(), "int2")


MINILM = dict(hidden=384, layers=2, vocab=30522)


@pytest.fixture(scope="module")
def minilm_exports(tmp_path_factory):
    """A MiniLM-shaped random int8 backbone exported as int8-weight and as fp32."""
    enc = tiny_quantized_bert(**MINILM)
    tap = BackboneTap(enc, [1, 2], "frozen").eval()
    io = backbone_io(384, 3, True)
    out = tmp_path_factory.mktemp("minilm_onnx")
    model = SimpleNamespace(tap=tap)
    paths = {p: export_backbone(model, io, out / f"{p}.onnx", p) for p in ("int8-weight", "fp32")}
    return tap, paths


@pytest.mark.slow
def test_int8_backbone_is_tensorrt_valid(minilm_exports):
    _, paths = minilm_exports
    assert check_tensorrt_compatible(paths["int8-weight"]) == []


@pytest.mark.slow
def test_int8_backbone_has_only_symmetric_int8_dq_with_an_explicit_axis(minilm_exports):
    _, paths = minilm_exports
    m = onnx.load(str(paths["int8-weight"]), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) >= 12  # every Linear of the 2 layers
    assert not [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    for n in dqs:
        assert n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8, n.name
        assert any(a.name == "axis" for a in n.attribute), n.name
        if len(n.input) > 2 and n.input[2]:
            zp = onnx.numpy_helper.to_array(inits[n.input[2]], base_dir=str(paths["int8-weight"].parent))
            assert not zp.any()
    # no float copy of any weight matrix: float initializers are vectors (scales, biases, norms)
    for init in inits.values():
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            assert sum(d > 1 for d in init.dims) <= 1, (init.name, list(init.dims))
    int8_elems = sum(int(np.prod(i.dims)) for i in inits.values() if i.data_type == onnx.TensorProto.INT8)
    assert int8_elems >= 30522 * 384 + 2 * 4 * 384 * 384 + 2 * 2 * 384 * 1536


@pytest.mark.slow
def test_int8_backbone_is_under_030_of_fp32(minilm_exports):
    _, paths = minilm_exports
    ratio = onnx_size_bytes(paths["int8-weight"]) / onnx_size_bytes(paths["fp32"])
    assert ratio < 0.30, ratio


@pytest.mark.slow
def test_int8_backbone_matches_pytorch_in_onnxruntime(minilm_exports):
    tap, paths = minilm_exports
    ids = torch.randint(1000, 30000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    types = torch.zeros_like(ids)
    with torch.no_grad():
        hs, cls = tap(ids, mask, types)
    sess = make_session(paths["int8-weight"], threads=1)
    o_hs, o_cls = sess.run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": types.numpy()}
    )
    assert o_hs.shape == (2, 3, 16, 384) and o_cls.shape == (2, 2, 384)
    np.testing.assert_allclose(o_hs, hs.numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(o_cls, cls.numpy(), atol=1e-3, rtol=0)
