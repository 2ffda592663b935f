"""Heterogeneous experts: shapes, gradients, prior-only routing, padding, ONNX parity, train + reload."""

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from training.config import EXPERT_TYPES, MoEConfig, load_config
from training.hmmoe import CrossAttentionExpert, HeterogeneousExperts
from training.moe import DenseFFN, MoEBlock, route
from training.side import upcycle

HETERO = "moe.expert_types=[ffn, lowrank, cross_attn, channel_attn]"
D, F_DIM, D_BACKBONE = 16, 32, 24


def _inputs(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    tokens = torch.randn(B, T, D_BACKBONE, generator=g)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[-1, T // 2 :] = 0
    return x, {"tokens": tokens, "mask": mask}


def _dense(seed=0) -> DenseFFN:
    torch.manual_seed(seed)
    return DenseFFN(D, F_DIM)


def _moe(types, **kw) -> MoEConfig:
    return MoEConfig(num_experts=len(types), top_k=min(2, len(types)), expert_types=list(types), **kw)


@pytest.mark.parametrize("kind", EXPERT_TYPES)
def test_each_expert_type_shape_and_gradients(kind):
    experts = HeterogeneousExperts.from_dense(_dense(), _moe([kind, kind], lowrank_rank=4), D_BACKBONE)
    x, ctx = _inputs()
    x.requires_grad_(True)
    y = experts(x, ctx)
    assert y.shape == (2, 6, 2, D)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind}: no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_ffn_experts_are_the_dense_ffn_and_full_rank_lowrank_is_too():
    dense = _dense()
    x, ctx = _inputs()
    experts = HeterogeneousExperts.from_dense(dense, _moe(["ffn", "lowrank"], lowrank_rank=F_DIM), D_BACKBONE)
    y = experts(x, ctx)
    ref, _ = dense(x)
    torch.testing.assert_close(y[:, :, 0], ref)
    torch.testing.assert_close(y[:, :, 1], ref)  # rank = F keeps every hidden unit: the pruned init is exact


def test_expert_order_follows_config():
    types = ["lowrank", "ffn", "cross_attn", "ffn", "channel_attn"]
    experts = HeterogeneousExperts.from_dense(_dense(), _moe(types), D_BACKBONE)
    x, ctx = _inputs()
    y = experts(x, ctx)
    ref, _ = _dense()(x)
    assert experts.num_experts == 5 and experts.types == tuple(types)
    torch.testing.assert_close(y[:, :, 1], ref)
    torch.testing.assert_close(y[:, :, 3], ref)
    assert not torch.allclose(y[:, :, 0], ref)


def test_zero_router_routes_by_the_prior_alone():
    types = ["ffn", "lowrank", "cross_attn", "channel_attn"]
    block = upcycle(_dense(), D_BACKBONE, _moe(types, prior_mode="average"), dropout=0.0)  # the paper's prior
    assert isinstance(block, MoEBlock) and isinstance(block.experts, HeterogeneousExperts)
    with torch.no_grad():
        block.prior_keys.normal_(std=1.0)  # a decisive prior; the router stays zero-initialised
    x, ctx = _inputs(B=3)
    cls = torch.randn(3, D_BACKBONE)
    weights, idx, _ = route(block.router(x.float()), block.top_k, prior=block.prior(cls))

    c = block.prior(cls)  # (B, N)
    g = 0.5 * (1.0 / 4 + c)  # p is uniform when the router is zero
    expected_idx = c.argsort(dim=-1, descending=True)[:, :2]  # (B, k): g is monotone in c
    expected_w = g.gather(-1, expected_idx) / g.gather(-1, expected_idx).sum(-1, keepdim=True)
    assert torch.equal(idx, expected_idx[:, None].expand_as(idx))  # every token of a sequence: same experts
    torch.testing.assert_close(weights, expected_w[:, None].expand_as(weights))

    y, aux = block(x, cls, ctx["mask"], ctx)
    outs = block.experts(x, ctx)  # (B, T, N, D)
    gate = torch.zeros(3, 4).scatter(-1, expected_idx, expected_w)  # (B, N)
    torch.testing.assert_close(y, torch.einsum("bn,btnd->btd", gate, outs))


def test_cross_attention_ignores_padding_keys():
    torch.manual_seed(0)
    expert = CrossAttentionExpert(D, D_BACKBONE, num_heads=2).eval()
    x, ctx = _inputs()
    real = ctx["mask"].bool()
    y = expert(x, ctx)
    changed = ctx["tokens"].clone()
    changed[~real] = torch.randn(int((~real).sum()), D_BACKBONE) * 100
    y2 = expert(x, {"tokens": changed, "mask": ctx["mask"]})
    torch.testing.assert_close(y2[real], y[real], rtol=0, atol=1e-6)
    assert torch.equal(y2[0], y[0])  # the unpadded row is untouched
    changed[real] += 1.0  # real keys do matter
    assert not torch.allclose(expert(x, {"tokens": changed, "mask": ctx["mask"]})[real], y[real])


def _tiny_hetero_model(toy_csv, extra=()):
    from training.backbone import load_tokenizer
    from training.model import build_side_model

    cfg = load_config(None, tiny_overrides(toy_csv) + [HETERO, "moe.lowrank_rank=4", *extra])
    tokenizer = load_tokenizer(cfg.backbone)
    model, info = build_side_model(cfg, 2, tokenizer)
    return model.eval(), info, tokenizer


def _toy_batch(tokenizer, toy_csv, n=16):
    lines = open(toy_csv).read().splitlines()[1 : n + 1]
    texts = [" ".join([line.split(",")[0]] * (1 + i % 3)) for i, line in enumerate(lines)]  # ragged: real padding
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.mark.slow
def test_exported_heterogeneous_adapter_matches_pytorch(toy_csv, tmp_path):
    from export.io_spec import adapter_io
    from export.onnx_export import export_adapter
    from export.ort_session import make_session

    model, info, tokenizer = _tiny_hetero_model(toy_csv)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.adapter.blocks:
            block.ffn.router.weight.normal_(std=5.0)  # token-dependent routing, so every expert gets picked
    batch = _toy_batch(tokenizer, toy_csv)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        hidden, cls = model.tap(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        logits, aux = model.adapter(hidden, cls, batch["attention_mask"])
    real = batch["attention_mask"].bool()
    for a in aux:
        assert set(a["indices"][real].unique().tolist()) == {0, 1, 2, 3}, "test input does not reach every expert"

    io = adapter_io(info.hidden_size, info.num_taps, 2)
    path = export_adapter(model, io, tmp_path / "adapter.onnx")
    session = make_session(path, threads=2)
    feeds = {
        "hidden_states": hidden.numpy(),
        "cls_states": cls.numpy(),
        "attention_mask": batch["attention_mask"].numpy().astype(np.int64),
    }
    (ort_logits,) = session.run(["logits"], feeds)
    np.testing.assert_allclose(ort_logits, logits.numpy(), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_heterogeneous_training_run_and_checkpoint_reload(toy_csv, tmp_path):
    from training.checkpoint import load_checkpoint
    from training.trainer import Trainer

    cfg = load_config(None, tiny_overrides(toy_csv) + [HETERO, "train.epochs=2", "moe.lowrank_rank=4"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    metrics = trainer.run()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["epochs"][-1]["train_loss"])

    model, cfg2, meta, tokenizer = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert cfg2.moe.expert_types == ["ffn", "lowrank", "cross_attn", "channel_attn"]
    assert isinstance(model.adapter.blocks[0].ffn.experts, HeterogeneousExperts)
    batch = _toy_batch(tokenizer, toy_csv, n=8)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], trainer.model(batch)[0])
