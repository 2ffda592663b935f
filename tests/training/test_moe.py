"""ISMoE: routing (the paper's g' = (p + c) / 2 and the logits-mode prior), the dense gate, sparse
dispatch, auxiliary losses, sparse upcycling and what makes routing learn from the first step."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from training.moe import DenseFFN, FFNExperts, MoEBlock, dense_gate, load_balancing_loss, route, router_z_loss

N, D, F_DIM, BD = 4, 16, 32, 24  # experts, side width, FFN width, backbone width


def upcycled_block(top_k=2, prior=True, routing="renorm", seed=0, prior_mode="average", upcycle="copy", noise=0.1):
    """The paper's block by default: identical copies of a dense FFN, g' = (p + c) / 2."""
    torch.manual_seed(seed)
    dense = DenseFFN(D, F_DIM).eval()
    experts = FFNExperts.upcycle(dense.fc1, dense.fc2, N, mode=upcycle, noise=noise, seed=seed)
    block = MoEBlock(experts, D, BD, top_k, prior, routing, prior_mode).eval()
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
        cls = torch.randn(2, BD, generator=g) * 10**seed  # any prior, from flat to one-hot
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
    weights, idx, g = route(logits, k, prior=prior)
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
    weights, idx, g = route(logits, 2, mode="paper", prior=prior)
    torch.testing.assert_close(weights, torch.softmax(g.gather(-1, idx), -1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7))
    assert (idx[..., 0] != idx[..., 1]).all()


def test_route_is_fp32_for_half_inputs():
    logits, prior = random_routing()
    weights, _, g = route(logits.to(torch.bfloat16), 2, prior=prior.to(torch.bfloat16))
    assert weights.dtype == g.dtype == torch.float32


def test_prior_is_the_softmax_of_scaled_cls_correlation():
    _, block = upcycled_block()
    cls = torch.randn(3, BD)
    expected = torch.softmax(cls @ block.prior_keys.t() / math.sqrt(BD), -1)
    torch.testing.assert_close(block.prior(cls), expected)
    assert upcycled_block(prior=False)[1].prior_keys is None


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
        weights, idx, _ = route(logits, k, prior=prior)
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
        w, idx, _ = route(logits, 2, prior=block.prior(cls))
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
    _, idx, g = route(padded, 2, prior=prior)
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


@pytest.mark.parametrize("prior_mode", ["average", "logits"])
def test_router_and_prior_keys_get_gradients(prior_mode):
    _, block = upcycled_block(prior_mode=prior_mode)
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


# ---------------------------------------------------------------- logits-mode prior (the default)


def test_logits_mode_prior_is_a_cosine_over_a_learned_temperature():
    _, block = upcycled_block(prior_mode="logits")
    salient = torch.randn(3, BD) * 7 + 2.0  # scale and offset do not matter: centred, unit length
    h = salient - salient.mean(-1, keepdim=True)
    cos = F.normalize(h, dim=-1) @ F.normalize(block.prior_keys, dim=-1).t()
    torch.testing.assert_close(block.prior_scores(salient), cos / 0.1)
    torch.testing.assert_close(block.prior_scores(salient * 3 - 1), block.prior_scores(salient))
    x = torch.randn(3, 4, D)
    logits, prior = block.router_logits(x, salient)
    assert prior is None
    torch.testing.assert_close(logits, F.linear(x, block.router.weight).float() + (cos / 0.1).unsqueeze(1))
    assert block.log_temperature.requires_grad


def test_prior_changes_the_chosen_experts_when_only_the_salient_token_changes():
    """Same tokens, same weights: the salient token alone moves the routing (logits mode, default)."""
    _, block = upcycled_block(top_k=1, prior_mode="logits", upcycle="noise")
    with torch.no_grad():
        block.prior_keys.copy_(torch.eye(N, BD))
        block.router.weight.normal_(std=0.01)  # token features count, a little
    x, mask = torch.randn(1, 6, D), torch.ones(1, 6, dtype=torch.long)
    chosen = []
    for e in range(N):
        salient = torch.eye(N, BD)[[e]] * 3 + 0.01 * torch.randn(1, BD)
        with torch.no_grad():
            chosen.append(block(x, salient, mask)[1]["indices"])
    for e in range(N):
        assert (chosen[e] == e).all(), chosen


def test_router_fp32_under_bf16_autocast():
    _, block = upcycled_block(prior_mode="logits")
    with torch.no_grad():
        block.router.weight.normal_()
    x, salient = torch.randn(2, 5, D), torch.randn(2, BD)
    reference, _ = block.router_logits(x, salient)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = block.router_logits(x.bfloat16(), salient)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(
        logits, F.linear(x.bfloat16().float(), block.router.weight) + reference - F.linear(x, block.router.weight)
    )


# ---------------------------------------------------------------- symmetry breaking and the first step


def test_noise_upcycling_makes_experts_differ_but_stay_near_the_dense_ffn():
    dense, block = upcycled_block(upcycle="noise", noise=0.1)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out, (ref, _) = block.experts(x), dense(x)  # (B, T, N, D)
    for a in range(N):
        assert (out[:, :, a] - ref).norm() < 0.3 * ref.norm()  # near the FFN it came from
        for b in range(a + 1, N):
            assert (out[:, :, a] - out[:, :, b]).abs().max() > 1e-3  # yet different experts


def test_partition_upcycling_sums_to_the_dense_ffn():
    dense, block = upcycled_block(upcycle="partition")
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out, (ref, _) = block.experts(x), dense(x)
    b2 = dense.fc2.bias
    torch.testing.assert_close((out - b2).sum(2) / N + b2, ref, rtol=1e-4, atol=1e-5)


def _router_grad(upcycle: str, prior_mode: str) -> float:
    _, block = upcycled_block(prior_mode=prior_mode, upcycle=upcycle)
    block.train()
    x, salient, mask = torch.randn(2, 6, D), torch.randn(2, BD), torch.ones(2, 6)
    y, _ = block(x, salient, mask)
    (y * torch.randn_like(y)).sum().backward()  # a task loss, no auxiliary loss
    return float(block.router.weight.grad.abs().max())


def test_router_gets_a_task_gradient_at_step_0_only_when_experts_differ():
    assert _router_grad("copy", "average") < 1e-5  # identical experts: routing cannot matter
    assert _router_grad("copy", "logits") < 1e-5
    assert _router_grad("noise", "logits") > 1e-3  # the default learns routing from the first step
    assert _router_grad("noise", "average") > 1e-3


# ---------------------------------------------------------------- sparse dispatch (training) == dense (export)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_dispatch_equals_the_dense_form_in_outputs_and_gradients(top_k):
    _, dense_block = upcycled_block(top_k=top_k, prior_mode="logits", upcycle="noise")
    with torch.no_grad():
        dense_block.router.weight.normal_()
    sparse_block = copy.deepcopy(dense_block)
    sparse_block.dispatch = "sparse"
    x, salient = torch.randn(3, 7, D), torch.randn(3, BD)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    outs = []
    for block in (dense_block, sparse_block):
        block.train()  # dropout is 0: train mode differs only by the dispatch
        xi = x.clone().requires_grad_(True)
        y, aux = block(xi, salient, mask)
        y = y * mask.unsqueeze(-1)  # padding is never read downstream
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)
