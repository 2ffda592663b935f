"""Backbone taps on tiny random BERT / RoBERTa / DistilBERT / MPNet, and the three LayerNorm modes."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    MPNetConfig,
    MPNetModel,
    RobertaConfig,
    RobertaModel,
)

from training.architectures import tapped_layernorms
from training.backbone import BackboneTap, embeddings_module, encoder_layers, masked_mean
from training.config import load_config
from training.model import SideTuned, backbone_info, build_side_model
from training.quant import QuantizedLinear

H, L, V, PAD = 32, 3, 100, 1


def make_encoder(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=PAD,
    )
    if kind == "bert":
        return BertModel(BertConfig(**common), add_pooling_layer=False).eval()
    if kind == "roberta":
        return RobertaModel(RobertaConfig(**common, type_vocab_size=1), add_pooling_layer=False).eval()
    if kind == "distilbert":
        return DistilBertModel(
            DistilBertConfig(
                vocab_size=V, dim=H, n_layers=L, n_heads=2, hidden_dim=64, max_position_embeddings=40, pad_token_id=PAD
            )
        ).eval()
    if kind == "mpnet":
        return MPNetModel(MPNetConfig(**common), add_pooling_layer=False).eval()
    raise ValueError(kind)


KINDS = ["bert", "roberta", "distilbert", "mpnet"]
FINAL_LN = {
    "bert": "output.LayerNorm",
    "roberta": "output.LayerNorm",
    "distilbert": "output_layer_norm",
    "mpnet": "output.LayerNorm",
}


def inputs(B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - 3 :] = 0
    ids[mask == 0] = PAD
    return ids, mask


class FakeTokenizer:
    """What backbone_info and build_side_model read from a tokenizer."""

    def __init__(self, kind: str, cls_token: str | None = "[CLS]"):
        self.cls_token = cls_token
        self.model_input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind == "bert" else [])

    def __len__(self):
        return V


@pytest.mark.parametrize("kind", KINDS)
def test_layer_discovery(kind):
    enc = make_encoder(kind)
    layers = encoder_layers(enc)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == L
    names = {id(m): n for n, m in enc.named_modules()}
    norms = tapped_layernorms(enc, [1, 2, 3])
    assert names[id(norms[0])].endswith("embeddings.LayerNorm")
    for norm in norms[1:]:
        assert names[id(norm)].endswith(FINAL_LN[kind])
    emb = embeddings_module(enc)
    assert enc.get_input_embeddings() in emb.children()


@pytest.mark.parametrize("kind", KINDS)
def test_tapped_layernorms_produce_the_hidden_states(kind):
    """The LayerNorm found for each tap is the one whose output IS that hidden state."""
    enc = make_encoder(kind)
    tap = BackboneTap(enc, [1, 3], "frozen").eval()
    seen = []
    hooks = [ln.register_forward_hook(lambda m, i, o: seen.append(o)) for ln in tap.tapped_layernorms()]
    ids, mask = inputs()
    with torch.no_grad():
        hs, cls = tap(ids, mask)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for k in range(3):
        torch.testing.assert_close(hs[:, k], seen[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls_mode", ["cls", "mean"])
def test_tap_shapes_and_values(kind, cls_mode):
    enc = make_encoder(kind)
    tap = BackboneTap(enc, [1, 3], "frozen", cls_mode).eval()
    ids, mask = inputs(B=2, T=7)
    with torch.no_grad():
        hs, cls = tap(ids, mask)
        ref = enc(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert hs.shape == (2, 3, 7, H) and cls.shape == (2, 2, H)  # (B, K, T, D), (B, K-1, D)
    assert tap.num_taps == 3 and tap.hidden_size == H
    for k, layer in enumerate([0, 1, 3]):
        torch.testing.assert_close(hs[:, k], ref[layer])
    if cls_mode == "cls":
        torch.testing.assert_close(cls, hs[:, 1:, 0])
    else:  # masked mean over real tokens: padding content must not count
        for k in range(2):
            torch.testing.assert_close(cls[:, k], masked_mean(hs[:, k + 1], mask))
        real = mask[-1].bool()
        torch.testing.assert_close(cls[-1, 0], hs[-1, 1][real].mean(0))


def test_masked_mean_ignores_padding_and_survives_an_empty_row():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    out = masked_mean(x, mask)
    torch.testing.assert_close(out[0], x[0, :2].mean(0))
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(3))


@pytest.mark.parametrize("kind", KINDS)
def test_backbone_info_reads_any_encoder(kind):
    enc = make_encoder(kind)
    cfg = load_config(overrides=["backbone.name=tiny", "side.layers=[3, 1]"])
    info = backbone_info(enc, cfg, FakeTokenizer(kind))
    assert (info.hidden_size, info.ffn_dim, info.num_layers, info.tap_layers) == (H, 64, L, [1, 3])
    assert info.has_token_type_ids == (kind == "bert") and info.num_taps == 3
    assert info.cls_mode == "mean"  # salient auto: follows backbone.pooling (mean by default)
    cls_pooled = load_config(overrides=["backbone.name=tiny", "side.layers=[3, 1]", "backbone.pooling=cls"])
    assert backbone_info(enc, cls_pooled, FakeTokenizer(kind)).cls_mode == "cls"
    no_cls = FakeTokenizer(kind, cls_token=None)  # e.g. a model without [CLS]: the prior pools instead
    assert backbone_info(enc, cls_pooled, no_cls).cls_mode == "mean"
    with pytest.raises(ValueError, match="side.layers"):
        backbone_info(enc, load_config(overrides=["side.layers=[4]"]), no_cls)


@pytest.mark.parametrize("kind", KINDS)
def test_side_model_builds_quantizes_and_runs_on_any_encoder(kind):
    cfg = load_config(
        overrides=["backbone.name=tiny", "side.reduction=4", "side.num_heads=2", "quant.keep_fp_reference=false"]
    )
    model, info = build_side_model(cfg, 2, FakeTokenizer(kind), encoder=make_encoder(kind))
    assert isinstance(model, SideTuned)
    assert any(isinstance(m, QuantizedLinear) for m in model.tap.encoder.modules())
    assert not any(type(m) is torch.nn.Linear for m in model.tap.encoder.modules())
    ids, mask = inputs()
    batch = {"input_ids": ids, "attention_mask": mask}
    if info.has_token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    model.eval()
    with torch.no_grad():
        logits, aux = model(batch)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all() and len(aux) == L


def _grad_names(tap, loss):
    loss.backward()
    return {n for n, p in tap.encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _tapped_names(tap):
    ids = {id(p) for ln in tap.tapped_layernorms() for p in (ln.weight, ln.bias)}
    return {n for n, p in tap.encoder.named_parameters() if id(p) in ids}


def _attention_outputs(tap):
    """Record whether each encoder layer's attention output keeps an autograd graph."""
    flags = []
    for layer in encoder_layers(tap.encoder):
        att = layer.attention
        att.register_forward_hook(lambda m, i, o: flags.append((o[0] if isinstance(o, tuple) else o).requires_grad))
    return flags


def test_frozen_layernorm_mode_keeps_everything_out_of_autograd():
    tap = BackboneTap(make_encoder("bert"), [1, 2, 3], "frozen").train()
    assert not any(p.requires_grad for p in tap.encoder.parameters())
    flags = _attention_outputs(tap)
    hs, cls = tap(*inputs())
    assert not hs.requires_grad and not cls.requires_grad and not any(flags)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_truncated_layernorm_mode_trains_only_tapped_affine_params(kind):
    tap = BackboneTap(make_encoder(kind), [1, 3], "truncated").train()
    tapped = _tapped_names(tap)
    assert len(tapped) == 6  # embeddings LN + 2 layer LNs, weight and bias
    assert {n for n, p in tap.encoder.named_parameters() if p.requires_grad} == tapped
    flags = _attention_outputs(tap)
    hs, cls = tap(*inputs())
    assert hs.requires_grad and not cls.requires_grad
    assert flags == [False] * L  # no backbone activation is kept for backward
    assert _grad_names(tap, hs.sum()) == tapped
    # the last tap's loss reaches only the last tapped LayerNorm: the LN input is detached
    tap.encoder.zero_grad(set_to_none=True)
    hs, _ = tap(*inputs())
    last = tapped_layernorms(tap.encoder, [3])[-1]
    assert _grad_names(tap, hs[:, -1].sum()) == {
        n for n, p in tap.encoder.named_parameters() if p is last.weight or p is last.bias
    }


def test_truncated_mode_runs_without_grad_in_eval():
    tap = BackboneTap(make_encoder("bert"), [1, 3], "truncated").eval()
    hs, _ = tap(*inputs())
    assert not hs.requires_grad


def test_full_layernorm_mode_backpropagates_through_the_backbone():
    tap = BackboneTap(make_encoder("bert"), [1, 3], "full").train()
    flags = _attention_outputs(tap)
    hs, _ = tap(*inputs())
    assert all(flags)
    grads = _grad_names(tap, hs[:, -1].sum())  # only the last tap in the loss
    assert grads == _tapped_names(tap)  # every tapped LN, including the embeddings', through the backbone
    assert all(not p.requires_grad for n, p in tap.encoder.named_parameters() if n not in grads)


@pytest.mark.parametrize("mode", ["truncated", "full"])
def test_layernorm_modes_do_not_change_the_forward_values(mode):
    ids, mask = inputs()
    with torch.no_grad():
        ref, ref_cls = BackboneTap(make_encoder("bert"), [1, 3], "frozen").train()(ids, mask)
    hs, cls = BackboneTap(make_encoder("bert"), [1, 3], mode).train()(ids, mask)
    torch.testing.assert_close(hs.detach(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-6, atol=1e-6)


def test_encoder_never_runs_dropout():
    tap = BackboneTap(make_encoder("bert"), [1, 3], "frozen").train()
    assert not tap.encoder.training
    ids, mask = inputs()
    a, _ = tap(ids, mask)
    b, _ = tap(ids, mask)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layernorm", ["frozen", "truncated"])
def test_streamed_taps_equal_the_hidden_states(kind, layernorm):
    """Training streams each tap to the ladder as its layer finishes; the taps are the same tensors' values."""
    tap = BackboneTap(make_encoder(kind), [1, 3], layernorm, "mean").train()
    ids, mask = inputs()
    hs, cls = tap(ids, mask, stack=False)
    got = {}
    salient = tap.stream(ids, mask, None, lambda j, t: got.__setitem__(j, t))
    assert sorted(got) == [0, 1, 2]
    for j in range(3):
        torch.testing.assert_close(got[j], hs[j], rtol=0, atol=0)
    torch.testing.assert_close(salient, cls, rtol=0, atol=0)
    assert got[1].requires_grad == (layernorm == "truncated") and not salient.requires_grad


def test_side_model_forward_streams_and_equals_the_exported_two_graph_path():
    """SideTuned.forward (streamed, training path) == adapter(tap(...)) (the exported backbone + adapter)."""
    cfg = load_config(overrides=["backbone.name=tiny", "side.reduction=2", "side.num_heads=2", "side.dropout=0.0"])
    model, _ = build_side_model(cfg, 3, FakeTokenizer("bert"), encoder=make_encoder("bert"))
    with torch.no_grad():
        model.adapter.up.weight.normal_(std=0.2)
    ids, mask = inputs()
    for train in (False, True):
        model.train(train)
        streamed, aux = model({"input_ids": ids, "attention_mask": mask})
        hs, cls = model.tap(ids, mask)
        two_graph, _ = model.adapter(hs, cls, mask)
        torch.testing.assert_close(streamed, two_graph, rtol=1e-5, atol=1e-6)
        assert len(aux) == 3
