"""Ladder side network: linear-probe start, gates, masking, pruning-based init, upcycling."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from training.backbone import masked_mean
from training.config import MoEConfig, SideConfig
from training.moe import DenseFFN, MoEBlock
from training.side import Adapter, SideAttention, prune_init_

D, FFN, K, C = 32, 64, 3, 3  # backbone width, backbone FFN width, taps, labels


def make_adapter(moe=True, seed=0, **side_kw) -> Adapter:
    torch.manual_seed(seed)
    side = SideConfig(**{"reduction": 4, "num_heads": 2, "dropout": 0.0, **side_kw})
    adapter = Adapter(D, FFN, K, C, side)
    if moe:
        adapter.upcycle_(MoEConfig(num_experts=4, top_k=2))
    return adapter.eval()


def taps(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, K, T, D, generator=g)
    cls = torch.randn(B, K - 1, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T // 2 :] = 0
    return hs, cls, mask


@pytest.mark.parametrize("moe", [True, False])
def test_adapter_starts_as_a_linear_probe_of_the_last_tap(moe):
    adapter = make_adapter(moe)
    hs, cls, mask = taps()
    with torch.no_grad():
        logits, aux = adapter(hs, cls, mask)
        probe = adapter.classifier(masked_mean(hs[:, -1], mask))
        assert logits.shape == (2, C)
        torch.testing.assert_close(logits, probe, rtol=1e-6, atol=1e-6)
        other = hs.clone()
        other[:, :-1] = torch.randn_like(other[:, :-1]) * 5  # every other tap
        torch.testing.assert_close(adapter(other, torch.randn_like(cls), mask)[0], logits, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert len(aux) == K - 1 and (("indices" in aux[0]) == moe)


def test_adapter_without_backbone_combination_is_not_a_probe():
    adapter = make_adapter(combine_backbone=False)
    assert torch.count_nonzero(adapter.up.weight) > 0
    hs, cls, mask = taps()
    other = hs.clone()
    other[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(adapter(hs, cls, mask)[0], adapter(other, cls, mask)[0])


def test_ladder_gates_start_at_one_half():
    adapter = make_adapter()
    assert adapter.alphas.shape == (K - 1,) and torch.count_nonzero(adapter.alphas) == 0
    torch.testing.assert_close(adapter.gates(), torch.full((K - 1,), 0.5))
    with torch.no_grad():
        adapter.alphas.fill_(0.1 * torch.log(torch.tensor(3.0)))  # alpha / T = log 3
    torch.testing.assert_close(adapter.gates(), torch.full((K - 1,), 0.75))


def test_ladder_mixes_side_and_backbone_with_the_gate():
    """g -> 1 keeps only the embedding tap's path; g -> 0 keeps only the layer taps."""
    adapter = make_adapter()
    hs, cls, mask = taps()
    with torch.no_grad():
        adapter.alphas.fill_(100.0)
        h, _ = adapter.side_forward(hs, cls, mask)
        moved = hs.clone()
        moved[:, 1:] += torch.randn_like(moved[:, 1:])
        torch.testing.assert_close(adapter.side_forward(moved, cls, mask)[0], h)
        adapter.alphas.fill_(-100.0)
        h, _ = adapter.side_forward(hs, cls, mask)
        moved = hs.clone()
        moved[:, 0] += torch.randn_like(moved[:, 0])
        torch.testing.assert_close(adapter.side_forward(moved, cls, mask)[0], h)


def test_ladder_step_formula():
    adapter = make_adapter()
    hs, cls, mask = taps()
    seen = {}
    adapter.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(h=args[0].clone()))
    with torch.no_grad():
        adapter.alphas.fill_(0.05)
        adapter.side_forward(hs, cls, mask)
        g = torch.sigmoid(torch.tensor(0.05 / 0.1))
        expected = g * adapter.downs[0](hs[:, 0]) + (1 - g) * adapter.downs[1](hs[:, 1])
    torch.testing.assert_close(seen["h"], expected)


def test_padding_does_not_change_real_rows():
    adapter = make_adapter()
    with torch.no_grad():
        adapter.up.weight.normal_(std=0.2)  # let the side network reach the logits
        for block in adapter.blocks:
            block.ffn.router.weight.normal_()
    hs, cls, _ = taps(B=1, T=5)
    padded = torch.cat([hs, torch.randn(1, K, 3, D) * 10], dim=2)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        short = adapter(hs, cls, torch.ones(1, 5, dtype=torch.long))[0]
        long = adapter(padded, cls, mask)[0]
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)


def test_list_of_taps_equals_the_stacked_tensor():
    """Training passes the taps as a list (no K-fold copy); the exported graph takes them stacked."""
    adapter = make_adapter()
    with torch.no_grad():
        adapter.up.weight.normal_(std=0.2)
    hs, cls, mask = taps()
    with torch.no_grad():
        stacked = adapter(hs, cls, mask)[0]
        listed = adapter(list(hs.unbind(1)), cls, mask)[0]
    torch.testing.assert_close(listed, stacked, rtol=0, atol=0)


def test_side_attention_width_must_divide_heads():
    with pytest.raises(ValueError, match="num_heads"):
        SideAttention(10, 4, 0.0)


def test_upcycle_turns_every_block_into_an_moe_equal_to_its_dense_ffn():
    """With the paper's identical copies; the default `noise` upcycling is near it (tests/training/test_moe.py)."""
    dense_adapter = make_adapter(moe=False)
    adapter = copy.deepcopy(dense_adapter)
    adapter.upcycle_(MoEConfig(num_experts=4, top_k=2, upcycle="copy"))
    assert all(isinstance(b.ffn, MoEBlock) for b in adapter.blocks)
    assert all(isinstance(b.ffn, DenseFFN) for b in dense_adapter.blocks)
    with torch.no_grad():
        dense_adapter.up.weight.normal_(std=0.2)
        adapter.up.weight.copy_(dense_adapter.up.weight)
    hs, cls, mask = taps()
    with torch.no_grad():
        torch.testing.assert_close(adapter(hs, cls, mask)[0], dense_adapter(hs, cls, mask)[0], rtol=1e-5, atol=1e-5)


def test_upcycle_is_skipped_when_moe_is_disabled():
    adapter = make_adapter(moe=False)
    adapter.upcycle_(MoEConfig(enabled=False))
    assert all(isinstance(b.ffn, DenseFFN) for b in adapter.blocks)


def tiny_bert(layers=2) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=D,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=FFN,
        max_position_embeddings=32,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_prune_init_copies_top_magnitude_submatrices():
    bert = tiny_bert(layers=3)
    adapter = make_adapter(moe=False)  # K = 3: taps = embeddings + 2 layers
    tap_layers = [1, 3]
    assert prune_init_(adapter, bert, tap_layers) == 2
    d, f = adapter.side_dim, adapter.blocks[0].ffn.fc1.out_features
    assert (d, f) == (8, 16)
    for block, li in zip(adapter.blocks, tap_layers):
        layer = bert.encoder.layer[li - 1]
        att = layer.attention
        q, k, v = (w.detach() for w in (att.self.query.weight, att.self.key.weight, att.self.value.weight))
        o, fin, fout = (
            w.detach() for w in (att.output.dense.weight, layer.intermediate.dense.weight, layer.output.dense.weight)
        )
        # importance of hidden dim j: |W| summed over every weight that reads or writes j
        imp = [
            float(sum(w[:, j].abs().sum() for w in (q, k, v, fin)) + o[j].abs().sum() + fout[j].abs().sum())
            for j in range(D)
        ]
        keep = sorted(sorted(range(D), key=lambda j: -imp[j])[:d])
        keep_f = sorted(sorted(range(FFN), key=lambda i: -float(fin[i].abs().sum()))[:f])
        i, j = keep[2], keep[5]
        assert block.attn.q.weight[2, 5].item() == q[i, j].item()  # one weight, by hand
        torch.testing.assert_close(block.attn.k.weight, k[keep][:, keep], rtol=0, atol=0)
        torch.testing.assert_close(block.attn.o.bias, att.output.dense.bias[keep], rtol=0, atol=0)
        torch.testing.assert_close(block.ffn.fc1.weight, fin[keep_f][:, keep], rtol=0, atol=0)
        torch.testing.assert_close(block.ffn.fc2.weight, fout[keep][:, keep_f], rtol=0, atol=0)
        torch.testing.assert_close(block.ffn.fc2.bias, layer.output.dense.bias[keep], rtol=0, atol=0)


def test_prune_init_then_upcycle_gives_experts_equal_to_the_pruned_ffn():
    bert = tiny_bert()
    adapter = make_adapter(moe=False)
    prune_init_(adapter, bert, [1, 2])
    fc1 = adapter.blocks[0].ffn.fc1.weight.clone()
    adapter.upcycle_(MoEConfig(num_experts=4, top_k=2, upcycle="copy"))
    for n in range(4):
        assert torch.equal(adapter.blocks[0].ffn.experts.w1[n], fc1.t())
    assert prune_init_(adapter, bert, [1, 2]) == 0  # MoE blocks are left alone


def _loss_and_grads(adapter, hs, cls, mask):
    adapter.zero_grad(set_to_none=True)
    logits, aux = adapter(hs, cls, mask)
    loss = logits.pow(2).sum() + sum(a["load_balance"] + a["z_loss"] for a in aux)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_recomputed_side_blocks_give_the_same_loss_and_gradients(dispatch):
    """side.recompute keeps only block inputs; the backward pass recomputes the rest, bit for bit."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        adapter = Adapter(D, FFN, K, C, SideConfig(reduction=4, num_heads=2, dropout=0.1, recompute=recompute))
        adapter.upcycle_(MoEConfig(num_experts=4, top_k=2, dispatch=dispatch))
        with torch.no_grad():
            adapter.up.weight.normal_(std=0.2)
        adapter.train()
        hs, cls, mask = taps()
        torch.manual_seed(1)  # the same dropout masks: checkpoint restores the RNG state to recompute them
        results.append(_loss_and_grads(adapter, hs, cls, mask))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_keeps_only_block_inputs():
    """Saved activations (counted with saved_tensors_hooks) shrink with recompute."""
    saved = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        adapter = Adapter(D, FFN, K, C, SideConfig(reduction=4, num_heads=2, dropout=0.1, recompute=recompute))
        adapter.upcycle_(MoEConfig(num_experts=4, top_k=2))
        adapter.train()
        params = {p.untyped_storage().data_ptr() for p in adapter.parameters()}
        storages = {}

        def pack(t, params=params, storages=storages):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hs, cls, mask = taps(B=4, T=16)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            adapter(hs, cls, mask)
        saved[recompute] = sum(storages.values())
    assert saved[True] < 0.5 * saved[False], saved
