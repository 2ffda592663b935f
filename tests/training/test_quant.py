"""Per-row n-bit quantization: round trips, packed 4-bit, quantized modules, quantize_ on a tiny BERT."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from training.config import QuantConfig
from training.quant import (
    QUANTIZED_TYPES,
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize_rows,
    model_bytes,
    pack_int4,
    quant_error,
    quantize_,
    quantize_rows,
    unpack_int4,
)


def tiny_bert(**kw) -> BertModel:
    torch.manual_seed(0)
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=1000)
    args.update(kw)
    return BertModel(BertConfig(**args)).eval()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_round_trip_error_bounded(bits, rounding):
    torch.manual_seed(0)
    w = torch.randn(64, 37) * torch.rand(64, 1) * 3
    w[3] += 5.0  # a row that does not span zero
    w[4] -= 5.0
    q, s, z = quantize_rows(w, bits, rounding)
    assert q.dtype == z.dtype == torch.uint8 and s.dtype == torch.float32
    assert q.shape == w.shape and s.shape == z.shape == (64,)
    assert int(q.max()) <= 2**bits - 1 and int(z.max()) <= 2**bits - 1
    err = (dequantize_rows(q, s, z) - w).abs()
    bound = (0.5 if rounding == "nearest" else 1.0) * s[:, None] * (1 + 1e-4)
    assert (err <= bound).all()


def test_row_spanning_zero_uses_literal_min_max():
    w = torch.tensor([[-1.0, 0.5, 2.0]])
    q, s, z = quantize_rows(w, 8)
    assert torch.allclose(s, torch.tensor([3.0 / 255]))
    assert int(z) == round(1.0 / (3.0 / 255)) and int(q[0, 0]) == 0 and int(q[0, 2]) == 255


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_rows_round_trip(bits):
    w = torch.tensor([[0.0] * 5, [0.3] * 5, [-2.0] * 5])
    q, s, z = quantize_rows(w, bits)
    assert torch.equal(dequantize_rows(q, s, z)[0], w[0])
    assert torch.allclose(dequantize_rows(q, s, z), w, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cols", [6, 7, 1])
def test_int4_packing_round_trips(cols):
    q = torch.randint(0, 16, (5, cols), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (5, (cols + 1) // 2)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4 if cols > 1 else 0)  # low nibble first
    assert torch.equal(unpack_int4(p, cols), q)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("in_features", [16, 15])
def test_quantized_linear_matches_dequantized_weight(bits, in_features):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 8)
    ql = QuantizedLinear.from_float(lin, bits)
    assert len(list(ql.parameters())) == 0
    assert set(ql.state_dict()) == {"qweight", "scale", "zero_point", "bias"}
    assert ql.qweight.shape == (8, in_features if bits == 8 else (in_features + 1) // 2)
    assert torch.equal(ql.codes(), quantize_rows(lin.weight.detach(), bits)[0])
    x = torch.randn(3, in_features)
    assert torch.allclose(ql(x), F.linear(x, ql.dequantize(), lin.bias), atol=1e-6)
    assert (ql.dequantize() - lin.weight).abs().max() <= ql.scale.max() / 2 * 1.001
    assert ql.bias.dtype == torch.float32 and QuantizedLinear.from_float(nn.Linear(4, 2, bias=False)).bias is None


def test_quantized_linear_runs_in_autocast_dtype():
    ql = QuantizedLinear.from_float(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ql(x)
    assert y.dtype == torch.bfloat16
    assert ql(x.half()).dtype == torch.float16


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_gathers_only_rows(bits, monkeypatch):
    torch.manual_seed(0)
    emb = nn.Embedding(50, 9, padding_idx=0)
    qe = QuantizedEmbedding.from_float(emb, bits)
    ids = torch.tensor([[1, 4, 4], [49, 0, 7]])
    full = qe.dequantize()
    monkeypatch.setattr(QuantizedEmbedding, "dequantize", lambda *a, **k: pytest.fail("whole table dequantized"))
    out = qe(ids)
    assert out.shape == (2, 3, 9) and out.dtype == torch.float32
    assert torch.equal(out, full[ids])
    assert torch.equal(out, F.embedding(ids, full))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qe(ids).dtype == torch.bfloat16
    assert qe.padding_idx == 0 and qe.num_embeddings == 50 and qe.embedding_dim == 9


@pytest.mark.parametrize("bits", [8, 4])
def test_set_rows_writes_only_those_rows(bits):
    ql = QuantizedLinear.from_float(nn.Linear(7, 6), bits)
    before = ql.codes().clone()
    rows = torch.tensor([1, 4])
    q = torch.full((2, 7), 3, dtype=torch.uint8)
    ql.set_rows(rows, q, torch.tensor([0.5, 0.25]), torch.tensor([1, 2], dtype=torch.uint8))
    after = ql.codes()
    assert torch.equal(after[rows], q)
    keep = torch.tensor([0, 2, 3, 5])
    assert torch.equal(after[keep], before[keep])
    assert torch.allclose(ql.dequantize()[1], torch.full((7,), 0.5 * 2))


def test_quantize_tiny_bert():
    model = tiny_bert()
    fp = tiny_bert()
    cfg = QuantConfig()
    names = quantize_(model, cfg)
    linears = [n for n, m in fp.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert sorted(names) == sorted(linears)
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert lns and all(m.weight.dtype == torch.float32 for m in lns)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in fp.named_parameters() if "LayerNorm" in n}
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        a, b = fp(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    sd = model.state_dict()
    assert not any(k.endswith(".weight") and "LayerNorm" not in k for k in sd)
    fresh = tiny_bert()
    torch.manual_seed(1)
    fresh.apply(lambda m: m.weight.data.normal_() if isinstance(m, (nn.Linear, nn.Embedding)) else None)
    quantize_(fresh, cfg)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state, b)


def test_reference_is_plain_cpu_attribute_and_eq4():
    model = tiny_bert()
    ref_w = model.encoder.layer[0].intermediate.dense.weight.detach().clone()
    quantize_(model, QuantConfig(keep_fp_reference=True))
    m = model.encoder.layer[0].intermediate.dense
    assert m.reference.dtype == torch.float16 and m.reference.device.type == "cpu"
    assert "reference" not in m.state_dict() and all("reference" not in k for k, _ in model.named_buffers())
    err, rel = quant_error(m)
    r = m.reference.float()
    assert err == pytest.approx((r - m.dequantize()).pow(2).sum().item(), rel=1e-4)
    assert rel == pytest.approx(err / r.pow(2).sum().item(), rel=1e-6) and 0 < rel < 1e-3
    assert torch.allclose(m.reference.float(), ref_w, atol=1e-3)
    quantize_(model2 := tiny_bert(), QuantConfig(keep_fp_reference=False))
    assert model2.encoder.layer[0].intermediate.dense.reference is None


def test_filter_and_embedding_switch():
    model = tiny_bert()
    names = quantize_(model, QuantConfig(quantize_embeddings=False), lambda m, n: "attention" in n)  # torchao order
    assert names and all("attention" in n for n in names)
    assert isinstance(model.embeddings.word_embeddings, nn.Embedding)
    assert isinstance(model.encoder.layer[0].intermediate.dense, nn.Linear)
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantizedLinear)


def test_shared_modules_and_tied_weights():
    lin = nn.Linear(8, 8)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied LM head
    model = nn.ModuleDict({"a": nn.Sequential(lin), "b": nn.Sequential(lin), "emb": emb, "head": head})
    names = quantize_(model, QuantConfig())
    assert sorted(names) == ["a.0", "emb", "head"]
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], QuantizedLinear)
    assert model["head"].qweight is model["emb"].qweight
    assert all(isinstance(m, QUANTIZED_TYPES) for m in (model["emb"], model["head"]))
    ids = torch.tensor([3, 5])
    assert torch.allclose(model["head"](model["emb"](ids)), model["emb"](ids) @ model["emb"].dequantize().T)


def test_mha_out_proj_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    quantize_(model, QuantConfig())
    x = torch.randn(1, 3, 8)
    model[0](x, x, x)  # still works: MHA reads out_proj.weight directly


@pytest.mark.parametrize("bits,limit", [(8, 0.30), (4, 0.18)])
def test_memory_ratio_minilm_shapes(bits, limit):
    model = tiny_bert(
        hidden_size=384, intermediate_size=1536, num_attention_heads=12, vocab_size=30522, num_hidden_layers=2
    )
    fp_bytes = model_bytes(model)
    quantize_(model, QuantConfig(bits=bits, keep_fp_reference=False))
    ratio = model_bytes(model) / fp_bytes
    assert ratio <= limit, ratio
