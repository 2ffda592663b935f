"""ISMoE: routing over g' = (p + c) / 2, the dense gate, auxiliary losses, sparse upcycling."""
import math

import pytest
import torch
import torch.nn.functional as F

from training.moe import DenseFFN, FFNExperts, MoEBlock, dense_gate, load_balancing_loss, route, router_z_loss


N, D, F_DIM, BD = 4, 16, 32, 24  # experts, side width, FFN width, backbone width


def upcycled_block(top_k=2, prior=True, routing="renorm", seed=0):
    torch.manual_seed(seed)
    dense = DenseFFN(D, F_DIM).eval()
    block = MoEBlock(FFNExperts.upcycle(dense.fc1, dense.fc2, N), D, BD, top_k, prior, routing).eval()
    return dense, block


def random_routing(B=3, T=7, seed=0, with_prior=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, N, generator=g) * 3
    prior = torch.softmax(torch.randn(B, N, generator=g) * 3, -1) if with_prior else None
    return logits, prior


@pytest.mark.parametrize("routing", ["renorm", "paper"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycled_moe_with_zero_router_equals_the_dense_ffn(routing, top_k):
    dense, block = upcycled_block(top_k, routing=routing)
    assert torch.count_nonzero(block.router.weight) == 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 9, D, generator=g) * (1 + 4 * seed)
        cls = torch.randn(2, BD, generator=g) * 10 ** seed  # any prior, from flat to one-hot
        mask = torch.ones(2, 9, dtype=torch.long)
        with torch.no_grad():
            y, aux = block(x, cls, mask)
            ref, _ = dense(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert aux["indices"].shape == (2, 9, top_k)


def test_upcycled_experts_are_copies_of_the_dense_ffn():
    dense, block = upcycled_block()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out = block.experts(x)  # (B, T, N, D)
        ref, _ = dense(x)
    assert out.shape == (2, 5, N, D)
    for n in range(N):
        torch.testing.assert_close(out[:, :, n], ref, rtol=1e-5, atol=1e-6)
    # copies, not views: training one expert leaves the others alone
    with torch.no_grad():
        block.experts.w1[0].add_(1.0)
    assert not torch.equal(block.experts.w1[0], block.experts.w1[1])
    assert torch.equal(block.experts.w1[1], dense.fc1.weight.t())


@pytest.mark.parametrize("with_prior", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_picks_the_top_k_of_the_mixed_distribution(k, with_prior):
    logits, prior = random_routing(with_prior=with_prior)
    weights, idx, g = route(logits, prior, k)
    p = torch.softmax(logits, -1)
    expected_g = p if prior is None else (p + prior[:, None, :]) / 2
    torch.testing.assert_close(g, expected_g)
    assert weights.shape == idx.shape == (3, 7, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))
    assert (weights > 0).all()
    order = expected_g.argsort(-1, descending=True)[..., :k]
    for b in range(3):
        for t in range(7):
            chosen = idx[b, t].tolist()
            assert len(set(chosen)) == k  # k distinct experts
            assert set(chosen) == set(order[b, t].tolist())
            # renorm: g' renormalised over the chosen experts
            sel = expected_g[b, t, chosen]
            torch.testing.assert_close(weights[b, t], sel / sel.sum())


def test_route_paper_mode_is_a_softmax_over_the_chosen_g():
    logits, prior = random_routing()
    weights, idx, g = route(logits, prior, 2, mode="paper")
    torch.testing.assert_close(weights, torch.softmax(g.gather(-1, idx), -1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))
    assert (idx[..., 0] != idx[..., 1]).all()


def test_route_is_fp32_for_half_inputs():
    logits, prior = random_routing()
    weights, _, g = route(logits.to(torch.bfloat16), prior.to(torch.bfloat16), 2)
    assert weights.dtype == g.dtype == torch.float32


def test_prior_is_the_softmax_of_scaled_cls_correlation():
    _, block = upcycled_block()
    cls = torch.randn(3, BD)
    expected = torch.softmax(cls @ block.prior_keys.t() / math.sqrt(BD), -1)
    torch.testing.assert_close(block.prior(cls), expected)
    assert upcycled_block(prior=False)[1].prior(cls) is None


def _prior_steered_block():
    """A block whose routing is decided by the prior alone: zero router, prior keys far apart."""
    _, block = upcycled_block(top_k=1)
    with torch.no_grad():
        block.prior_keys.copy_(torch.eye(N, BD) * 50)
    return block


def test_cls_vector_steers_routing():
    block = _prior_steered_block()
    x, mask = torch.randn(1, 6, D), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        _, a = block(x, torch.eye(N, BD)[[0]] * 5, mask)
        _, b = block(x, torch.eye(N, BD)[[2]] * 5, mask)
    assert (a["indices"] == 0).all() and (b["indices"] == 2).all()  # same tokens, different [CLS]


def test_cls_vector_is_ignored_without_the_prior():
    _, block = upcycled_block(top_k=1, prior=False)
    with torch.no_grad():
        block.router.weight.normal_()
    x, mask = torch.randn(1, 6, D), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        _, a = block(x, torch.randn(1, BD) * 5, mask)
        _, b = block(x, torch.randn(1, BD) * 5, mask)
    assert torch.equal(a["indices"], b["indices"])


def test_token_features_and_prior_both_count():
    """With a strong router, each token goes its own way despite the shared prior."""
    _, block = upcycled_block(top_k=1)
    with torch.no_grad():
        block.router.weight.normal_(std=20.0)
    x, mask = torch.randn(2, 64, D), torch.ones(2, 64, dtype=torch.long)
    with torch.no_grad():
        _, aux = block(x, torch.randn(2, BD), mask)
    assert set(aux["indices"].flatten().tolist()) == set(range(N))


def test_dense_gate_has_exactly_k_nonzeros_per_token():
    logits, prior = random_routing(B=4, T=11)
    for k in (1, 2, 3):
        weights, idx, _ = route(logits, prior, k)
        gate = dense_gate(weights, idx, N)
        assert gate.shape == (4, 11, N)
        assert ((gate != 0).sum(-1) == k).all()
        torch.testing.assert_close(gate.gather(-1, idx), weights)
        torch.testing.assert_close(gate.sum(-1), torch.ones(4, 11))


def test_moe_output_is_the_gate_weighted_sum_of_its_experts():
    _, block = upcycled_block(top_k=2)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts differ
        block.router.weight.normal_()
    x, cls, mask = torch.randn(2, 5, D), torch.randn(2, BD), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        y, aux = block(x, cls, mask)
        logits = F.linear(x, block.router.weight)
        w, idx, _ = route(logits, block.prior(cls), 2)
        outs = block.experts(x)
    assert torch.equal(idx, aux["indices"])
    ref = torch.zeros_like(y)
    for b in range(2):
        for t in range(5):
            for j in range(2):
                ref[b, t] += w[b, t, j] * outs[b, t, idx[b, t, j]]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def _one_hot_g(assign: list[int], peak: float = 0.7) -> torch.Tensor:
    g = torch.full((1, len(assign), N), (1 - peak) / (N - 1))
    g[0, torch.arange(len(assign)), torch.tensor(assign)] = peak
    return g


def test_load_balancing_loss_is_one_when_balanced():
    assign = [0, 1, 2, 3, 2, 0, 3, 1]
    g = _one_hot_g(assign)
    idx = torch.tensor(assign).view(1, -1, 1)
    loss = load_balancing_loss(g, idx, torch.ones(1, 8), N)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # uniform g' with any balanced top-2 choice
    idx2 = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]).view(1, 4, 2)
    loss2 = load_balancing_loss(torch.full((1, 4, N), 1 / N), idx2, torch.ones(1, 4), N)
    assert loss2.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_grows_when_routing_collapses():
    g = _one_hot_g([0] * 8, peak=0.97)
    idx = torch.zeros(1, 8, 1, dtype=torch.long)
    loss = load_balancing_loss(g, idx, torch.ones(1, 8), N)
    assert loss.item() == pytest.approx(N * 0.97, rel=1e-5)  # f_0 = 1, P_0 = 0.97
    assert loss.item() > 1.0


def test_padding_is_excluded_from_both_aux_losses():
    """Padding routed anywhere, with any logits, must not change either loss."""
    logits, prior = random_routing(B=2, T=6)
    lengths = [6, 3]
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    padded = logits.clone()
    padded[1, 3:] = torch.tensor([80.0, -50.0, 0.0, 0.0])  # garbage that would dominate both losses
    _, idx, g = route(padded, prior, 2)
    real = [(b, t) for b in range(2) for t in range(lengths[b])]
    g_real = torch.stack([g[b, t] for b, t in real])[None]  # (1, R, N)
    idx_real = torch.stack([idx[b, t] for b, t in real])[None]
    logits_real = torch.stack([padded[b, t] for b, t in real])[None]
    ones = torch.ones(1, len(real))
    lb = load_balancing_loss(g, idx, mask, N)
    torch.testing.assert_close(lb, load_balancing_loss(g_real, idx_real, ones, N))
    z = router_z_loss(padded, mask)
    torch.testing.assert_close(z, router_z_loss(logits_real, ones))
    assert z.item() < 100  # the padded logsumexp^2 (6400) is not in it


def test_router_z_loss_value():
    logits = torch.zeros(2, 3, N)
    assert router_z_loss(logits, torch.ones(2, 3)).item() == pytest.approx(math.log(N) ** 2, rel=1e-6)
    logits = torch.randn(2, 3, N)
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(logits, torch.ones(2, 3)), expected)


def test_moe_block_reports_masked_aux_losses():
    _, block = upcycled_block()
    with torch.no_grad():
        block.router.weight.normal_()
    x, cls = torch.randn(2, 6, D), torch.randn(2, BD)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    x2 = x.clone()
    x2[1, 4:] = 100.0  # padding content changes
    with torch.no_grad():
        _, a = block(x, cls, mask)
        _, b = block(x2, cls, mask)
    torch.testing.assert_close(a["load_balance"], b["load_balance"])
    torch.testing.assert_close(a["z_loss"], b["z_loss"])


def test_router_and_prior_keys_get_gradients():
    _, block = upcycled_block()
    block.train()
    x, cls, mask = torch.randn(2, 6, D), torch.randn(2, BD), torch.ones(2, 6)
    with torch.no_grad():
        for p in block.experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    y, aux = block(x, cls, mask)
    (y.pow(2).sum() + aux["load_balance"] + aux["z_loss"]).backward()
    assert block.router.weight.grad.abs().sum() > 0
    assert block.prior_keys.grad.abs().sum() > 0
    assert block.experts.w1.grad.abs().sum() > 0
