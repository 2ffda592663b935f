"""ISMoE: top-k experts routed by token features plus a [CLS]-correlation prior.

Routing is a small pure function in fp32 (`route`); the auxiliary losses are their own
functions; all experts are computed densely as stacked weights and combined with a gate built
by `scatter`, so the block exports to ONNX with static shapes (TopK, ScatterElements, MatMul)
and the exported graph holds every expert whatever the example input routes to.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def route(logits: torch.Tensor, prior: torch.Tensor | None, k: int, mode: str = "renorm",
          indices: torch.Tensor | None = None):
    """Top-k routing over g' = (p + c) / 2.

    logits (B, T, N) router scores; prior (B, N) softmax of the [CLS] correlation or None.
    Returns weights (B, T, k) summing to 1, indices (B, T, k), and g' (B, T, N).
    `renorm` renormalises g' over the chosen experts; `paper` is a softmax over masked g'.
    `indices` (B, T, k) replaces the top-k choice (parity checks force another runtime's routes).
    """
    p = torch.softmax(logits.float(), dim=-1)  # (B, T, N)
    g = p if prior is None else 0.5 * (p + prior.float().unsqueeze(1))
    if indices is None:
        top, idx = torch.topk(g, k, dim=-1)  # (B, T, k)
    else:
        idx = indices.to(device=g.device, dtype=torch.long)
        top = g.gather(-1, idx)
    if mode == "paper":
        weights = torch.softmax(top, dim=-1)
    else:
        weights = top / top.sum(-1, keepdim=True)
    return weights, idx, g


def routing_margin(g: torch.Tensor, k: int) -> torch.Tensor:
    """Gap between the k-th and (k+1)-th gate value per token, (B, T, N) -> (B, T); inf when k == N.

    Where it is near zero the top-k choice is a near-tie, and rounding alone can change it.
    """
    if k >= g.shape[-1]:
        return torch.full(g.shape[:-1], float("inf"), device=g.device)
    top = torch.topk(g.float(), k + 1, dim=-1).values  # (B, T, k+1)
    return top[..., k - 1] - top[..., k]


def dense_gate(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter top-k weights into a dense (B, T, N) gate with zeros for unchosen experts."""
    gate = torch.zeros(*weights.shape[:-1], num_experts, dtype=weights.dtype, device=weights.device)
    return gate.scatter(-1, indices, weights)


def load_balancing_loss(g: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style N * sum_i f_i * P_i over real tokens; 1.0 when perfectly balanced."""
    m = mask.to(g.dtype)  # (B, T)
    tokens = m.sum().clamp_min(1.0)
    counts = F.one_hot(indices, num_experts).to(g.dtype).sum(-2)  # (B, T, N)
    f = (counts * m.unsqueeze(-1)).sum((0, 1)) / (tokens * indices.shape[-1])  # (N,)
    P = (g * m.unsqueeze(-1)).sum((0, 1)) / tokens  # (N,)
    return num_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits over real tokens (ST-MoE)."""
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # (B, T)
    m = mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


class FFNExperts(nn.Module):
    """N feed-forward experts as stacked weights: x (B, T, D) -> (B, T, N, D)."""

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        self.dropout = nn.Dropout(dropout)
        for w in (self.w1, self.w2):
            nn.init.normal_(w, std=0.02)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @classmethod
    def upcycle(cls, fc1: nn.Linear, fc2: nn.Linear, num_experts: int, dropout: float = 0.0) -> "FFNExperts":
        """Sparse upcycling: every expert starts as a copy of the dense FFN."""
        experts = cls(fc1.in_features, fc1.out_features, num_experts, dropout)
        with torch.no_grad():
            experts.w1.copy_(fc1.weight.t().expand(num_experts, -1, -1))
            experts.b1.copy_(fc1.bias.expand(num_experts, -1))
            experts.w2.copy_(fc2.weight.t().expand(num_experts, -1, -1))
            experts.b2.copy_(fc2.bias.expand(num_experts, -1))
        return experts

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        B, T, D = x.shape
        N = self.num_experts
        # Expert-major layout: batched matmuls save only (N, B*T, F) activations, no permuted copies.
        xf = x.reshape(1, B * T, D).expand(N, B * T, D)  # (N, BT, D), a view
        h = self.dropout(F.gelu(torch.baddbmm(self.b1.unsqueeze(1), xf, self.w1)))  # (N, BT, F)
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (N, BT, D)
        return out.view(N, B, T, D).permute(1, 2, 0, 3)  # (B, T, N, D), a view


class DenseFFN(nn.Module):
    """The side block's dense FFN (LST and the `dense side` ablation); also the upcycling source."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cls=None, mask=None, context=None):
        return self.fc2(self.dropout(F.gelu(self.fc1(x)))), {}


class MoEBlock(nn.Module):
    """Top-k mixture of experts whose routing is steered by the backbone's [CLS] vector."""

    def __init__(self, experts: nn.Module, dim: int, backbone_dim: int, top_k: int, prior: bool = True,
                 routing: str = "renorm"):
        super().__init__()
        self.experts = experts
        n = experts.num_experts
        self.router = nn.Linear(dim, n, bias=False)
        nn.init.zeros_(self.router.weight)  # p is uniform at start: routing follows the prior alone
        self.prior_keys = nn.Parameter(torch.randn(n, backbone_dim) * 0.02) if prior else None  # r: (N, D)
        self.top_k = top_k
        self.routing = routing
        self.forced_indices: torch.Tensor | None = None  # set by `forced_routes` only (parity checks)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def prior(self, cls: torch.Tensor) -> torch.Tensor | None:
        """c = softmax(h_cls . r^T / sqrt(D)); cls (B, D) -> (B, N)."""
        if self.prior_keys is None:
            return None
        scores = cls.float() @ self.prior_keys.float().t() / math.sqrt(cls.shape[-1])
        return torch.softmax(scores, dim=-1)

    def forward(self, x, cls, mask, context=None):
        logits = self.router(x.float())  # (B, T, N) fp32
        weights, idx, g = route(logits, self.prior(cls), self.top_k, self.routing, self.forced_indices)
        gate = dense_gate(weights, idx, self.num_experts)  # (B, T, N)
        expert_out = self.experts(x, context)  # (B, T, N, D)
        y = torch.einsum("btn,btnd->btd", gate.to(expert_out.dtype), expert_out)  # (B, T, D)
        aux = {"load_balance": load_balancing_loss(g, idx, mask, self.num_experts),
               "z_loss": router_z_loss(logits, mask), "indices": idx, "gates": g}
        return y, aux


@contextlib.contextmanager
def forced_routes(moe_blocks: list[MoEBlock], indices: list[torch.Tensor]):
    """Within the block, each MoE block uses the given expert indices (B, T, k) instead of its own top-k."""
    if len(moe_blocks) != len(indices):
        raise ValueError(f"{len(indices)} index tensors for {len(moe_blocks)} MoE blocks")
    for block, idx in zip(moe_blocks, indices):
        block.forced_indices = idx
    try:
        yield
    finally:
        for block in moe_blocks:
            block.forced_indices = None
