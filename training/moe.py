"""ISMoE: top-k experts routed by token features plus a prior from the backbone's salient token.

Routing is a small pure function in fp32 (`route`); the auxiliary losses are their own functions.
Two ways to run the experts, same function: `dense` computes every expert on every token and
combines them with a gate built by `scatter` (static shapes: what the ONNX export holds, every
expert in the graph whatever the example input routes to); `sparse` sends each real token only to
its k experts (training: k/N of the compute and of the saved activations).

The prior (decisions in docs/METHOD.md, "ISMoE routing"):
- `logits` (default): the cosine similarity of the centred salient token with each expert's
  representative r_e, divided by a learnable temperature, is added to the router logits, so the
  prior and the token features compete in one softmax and both get gradient from step 0;
- `average` (the paper, literally): g' = (softmax(router) + softmax(h . r^T / sqrt(D))) / 2.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

PRIOR_MODES = ("logits", "average")


def route(
    logits: torch.Tensor,
    k: int,
    mode: str = "renorm",
    prior: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
):
    """Top-k routing over g = softmax(logits), or g' = (g + prior) / 2 when a prior distribution is given.

    logits (B, T, N) router scores (a logits-mode prior is already in them); prior (B, N) or None.
    Returns weights (B, T, k) summing to 1, indices (B, T, k), and the gate distribution (B, T, N).
    `renorm` renormalises the chosen gate values; `paper` is a softmax over them.
    `indices` (B, T, k) replaces the top-k choice (parity checks force another runtime's routes).
    """
    g = torch.softmax(logits.float(), dim=-1)  # (B, T, N)
    if prior is not None:
        g = 0.5 * (g + prior.float().unsqueeze(1))
    if indices is None:
        top, idx = torch.topk(g, k, dim=-1)  # (B, T, k)
    else:
        idx = indices.to(device=g.device, dtype=torch.long)
        top = g.gather(-1, idx)
    weights = torch.softmax(top, dim=-1) if mode == "paper" else top / top.sum(-1, keepdim=True)
    return weights, idx, g


def routing_margin(g: torch.Tensor, k: int) -> torch.Tensor:
    """log g_(k) - log g_(k+1): the log-gap between the k-th and (k+1)-th gate value, (B, T, N) -> (B, T).

    Where it is near zero the top-k choice is a near-tie, and rounding alone can change it. The gap
    is taken in log space because rounding perturbs the router logits by a relative amount: two
    gate values of 1e-10 and 1e-13 are far apart, two of 0.2500001 and 0.25 are not. inf when k == N.
    """
    if k >= g.shape[-1]:
        return torch.full(g.shape[:-1], float("inf"), device=g.device)
    top = torch.topk(g.float(), k + 1, dim=-1).values.clamp_min(1e-38).log()  # (B, T, k+1)
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


ROW_QUANTUM = 64  # sparse dispatch pads each expert's rows to a multiple of this


class FFNExperts(nn.Module):
    """N feed-forward experts as stacked weights: x (B, T, D) -> (B, T, N, D), or routed tokens only."""

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
    def upcycle(
        cls,
        fc1: nn.Linear,
        fc2: nn.Linear,
        num_experts: int,
        dropout: float = 0.0,
        mode: str = "copy",
        noise: float = 0.0,
        seed: int = 0,
    ) -> FFNExperts:
        """Sparse upcycling from a dense FFN.

        `copy`: every expert is the dense FFN (the paper). `noise`: copies plus Gaussian noise of
        `noise` x each weight matrix's std, a different draw per expert, so experts differ from
        step 0 and the router gets a task gradient at once. `partition`: expert e keeps the e-th
        of N interleaved slices of the hidden units, zeroing the rest (fine-grained experts that
        sum to the dense FFN; active compute stays that of the full width).
        """
        experts = cls(fc1.in_features, fc1.out_features, num_experts, dropout)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            experts.w1.copy_(fc1.weight.t().expand(num_experts, -1, -1))
            experts.b1.copy_(fc1.bias.expand(num_experts, -1))
            experts.w2.copy_(fc2.weight.t().expand(num_experts, -1, -1))
            experts.b2.copy_(fc2.bias.expand(num_experts, -1))
            if mode == "noise":
                for w in (experts.w1, experts.w2):
                    w.add_(torch.randn(w.shape, generator=g) * noise * float(w[0].std()))
            elif mode == "partition":
                for e in range(num_experts):
                    off = torch.ones(fc1.out_features, dtype=torch.bool)
                    off[e::num_experts] = False
                    experts.w1[e][:, off] = 0.0
                    experts.b1[e][off] = 0.0
                    experts.w2[e][off] = 0.0
                experts.w2.mul_(num_experts)  # the k routed slices stand in for all N
                experts.b2.zero_().add_(fc2.bias)
        return experts

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        B, T, D = x.shape
        N = self.num_experts
        # Expert-major layout: batched matmuls save only (N, B*T, F) activations, no permuted copies.
        xf = x.reshape(1, B * T, D).expand(N, B * T, D)  # (N, BT, D), a view
        h = self.dropout(F.gelu(torch.baddbmm(self.b1.unsqueeze(1), xf, self.w1)))  # (N, BT, F)
        out = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (N, BT, D)
        return out.view(N, B, T, D).permute(1, 2, 0, 3)  # (B, T, N, D), a view

    def dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Sparse top-k: each real token through its k experts only, weighted; x (B, T, D) -> (B, T, D).

        The (token, expert) assignments of real tokens are sorted by expert and gathered once into
        contiguous per-expert slices, so each expert runs two matmuls on exactly its own tokens
        (no padding to a capacity). Padding positions get zeros (nothing reads them).
        """
        B, T, D = x.shape
        k = indices.shape[-1]
        xf = x.reshape(B * T, D)
        keep = mask.reshape(B * T).bool().repeat_interleave(k)  # (BT*k,)
        token = torch.arange(B * T, device=x.device).repeat_interleave(k)[keep]  # (A,) assignments
        expert = indices.reshape(-1)[keep]
        weight = weights.reshape(-1)[keep]
        order = torch.argsort(expert, stable=True)
        token, weight = token[order], weight[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        outs = []
        for e, chunk in enumerate(xf[token].split(counts)):  # (n_e, D) each, views of one gather
            if n := len(chunk):
                # Rows padded to a multiple of ROW_QUANTUM: a few GEMM shapes instead of a new one per
                # step (CPU oneDNN builds a kernel per shape; unpadded bf16 steps slowed 2.3 -> 3.4 s).
                padded = F.pad(chunk, (0, 0, 0, -n % ROW_QUANTUM))  # (m_e, D), m_e >= n_e
                h = self.dropout(F.gelu(torch.addmm(self.b1[e], padded, self.w1[e])))  # (m_e, F)
                outs.append(torch.addmm(self.b2[e], h, self.w2[e])[:n])  # (n_e, D)
        if not outs:
            return torch.zeros_like(x)
        out = torch.cat(outs) * weight.unsqueeze(-1).to(outs[0].dtype)  # (A, D)
        return torch.zeros_like(xf).index_add(0, token, out.to(xf.dtype)).view(B, T, D)


class DenseFFN(nn.Module):
    """The side block's dense FFN (LST and the `dense side` ablation); also the upcycling source."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cls=None, mask=None, context=None):
        return self.fc2(self.dropout(F.gelu(self.fc1(x)))), {}


def centred_unit(x: torch.Tensor) -> torch.Tensor:
    """Subtract the feature mean and scale to unit length: (..., D) -> (..., D), fp32."""
    x = x.float()
    return F.normalize(x - x.mean(-1, keepdim=True), dim=-1)


class MoEBlock(nn.Module):
    """Top-k mixture of experts whose routing is steered by the backbone's salient token."""

    def __init__(
        self,
        experts: nn.Module,
        dim: int,
        backbone_dim: int,
        top_k: int,
        prior: bool = True,
        routing: str = "renorm",
        prior_mode: str = "logits",
        prior_temperature: float = 0.1,
        dispatch: str = "dense",
    ):
        super().__init__()
        if prior_mode not in PRIOR_MODES:
            raise ValueError(f"prior_mode must be one of {PRIOR_MODES}, got {prior_mode!r}")
        self.experts = experts
        n = experts.num_experts
        self.router = nn.Linear(dim, n, bias=False)
        nn.init.zeros_(self.router.weight)  # p is uniform at start: routing follows the prior alone
        self.prior_keys = nn.Parameter(torch.randn(n, backbone_dim) * 0.02) if prior else None  # r: (N, D)
        # logits mode: prior scores are cos(h, r_e) / T with T = exp(log_temperature), learned
        self.log_temperature = (
            nn.Parameter(torch.tensor(math.log(prior_temperature))) if prior and prior_mode == "logits" else None
        )
        self.top_k, self.routing, self.prior_mode, self.dispatch = top_k, routing, prior_mode, dispatch
        self.forced_indices: torch.Tensor | None = None  # set by `forced_routes` only (parity checks)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def prior_scores(self, salient: torch.Tensor) -> torch.Tensor:
        """Logits mode: cos(centred h, r_e) / T, (B, D) -> (B, N), fp32."""
        keys = F.normalize(self.prior_keys.float(), dim=-1)  # (N, D)
        return centred_unit(salient) @ keys.t() / self.log_temperature.exp()

    def prior(self, salient: torch.Tensor) -> torch.Tensor:
        """Average mode (the paper): c = softmax(h . r^T / sqrt(D)), (B, D) -> (B, N)."""
        scores = salient.float() @ self.prior_keys.float().t() / math.sqrt(salient.shape[-1])
        return torch.softmax(scores, dim=-1)

    def router_logits(self, x: torch.Tensor, salient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(router logits (B, T, N) with a logits-mode prior added, average-mode prior (B, N) or None), in fp32."""
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.router.weight.float())  # (B, T, N)
            if self.prior_keys is None:
                return logits, None
            if self.prior_mode == "logits":
                return logits + self.prior_scores(salient).unsqueeze(1), None
            return logits, self.prior(salient)

    def forward(self, x, salient, mask, context=None):
        logits, prior = self.router_logits(x, salient)
        weights, idx, g = route(logits, self.top_k, self.routing, prior, self.forced_indices)
        if self.dispatch == "sparse" and self.training and hasattr(self.experts, "dispatch"):
            y = self.experts.dispatch(x, weights, idx, mask)  # (B, T, D)
        else:
            gate = dense_gate(weights, idx, self.num_experts)  # (B, T, N)
            expert_out = self.experts(x, context)  # (B, T, N, D)
            y = torch.einsum("btn,btnd->btd", gate.to(expert_out.dtype), expert_out)  # (B, T, D)
        aux = {
            "load_balance": load_balancing_loss(g, idx, mask, self.num_experts),
            "z_loss": router_z_loss(logits, mask),
            "indices": idx,
            "gates": g,
            "prior": prior,
        }
        if prior is None and self.prior_keys is not None and not self.training:  # diagnostics only
            aux["prior"] = torch.softmax(self.prior_scores(salient), dim=-1)  # (B, N)
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
