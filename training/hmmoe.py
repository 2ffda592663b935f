"""Heterogeneous experts (HMMoE, arXiv 2503.20633) behind ISMoE's one router.

A homogeneous ISMoE offers the router N copies of one operator (the upcycled FFN), so experts
can only differ by what their weights drift to. Heterogeneous experts give the router different
*kinds* of computation to choose between, per token, at the same top-k cost:

- `ffn`: a copy of the side block's dense FFN (sparse upcycling), the usual expert.
- `lowrank`: down (d -> r) -> GELU -> up (r -> d), a cheap expert for tokens that need little
  work. It starts as the r most important hidden units of the dense FFN (importance
  ||fc1 row|| * ||fc2 column||, LST-style structured pruning), so from step 0 it is a real,
  coarser approximation of the FFN, not a zero (a zero expert would only shrink the block output
  by its gate weight) and not noise.
- `cross_attn`: side tokens (queries, width d) attend to the *backbone* layer's own tokens
  (keys/values projected D -> d), padding keys masked out. The ladder only mixes backbone
  token i into side token i; this expert lets a side token read any backbone position at full
  width, i.e. information the downsampling dropped.
- `channel_attn`: squeeze-and-excitation over feature channels: a masked mean over real tokens
  -> d -> d/4 -> d sigmoid gate, multiplied into a linear projection of x. A sequence-level,
  per-channel re-weighting: the kind of global context a per-token FFN cannot express.

Init of the new operators: their output projections are small (normal, std 0.02, zero bias, as
`FFNExperts` draws its own weights) so a sequence routed to them at step 0 gets a slightly
scaled dense FFN plus a small term, yet every parameter receives gradient from the first step
(an exactly-zero output projection would leave the attention/gate weights without gradient
until it moves). Keys, values and queries use PyTorch's Linear default init, which makes the
initial attention nearly uniform: a masked mean of projected backbone tokens.

Every expert is computed densely for every token and stacked to (B, T, N, d) in the order of
`moe.expert_types`: static shapes, no data-dependent control flow, so the MoE block exports to
ONNX with every expert in the graph whatever the example input routes to. Routing, the [CLS]
prior and top-k stay in `training.moe.MoEBlock`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EXPERT_TYPES, MoEConfig
from .moe import DenseFFN, FFNExperts

OUT_INIT_STD = 0.02
CROSS_ATTN_MAX_HEADS = 2  # "single or few heads": the expert is small, heads of >= 8 dims


def _small_out_(linear: nn.Linear) -> nn.Linear:
    nn.init.normal_(linear.weight, std=OUT_INIT_STD)
    nn.init.zeros_(linear.bias)
    return linear


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: x (B, T, d), mask (B, T) -> (B, d)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class LowRankExpert(nn.Module):
    """down (d -> r) -> GELU -> up (r -> d): x (B, T, d) -> (B, T, d)."""

    def __init__(self, dim: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), _small_out_(nn.Linear(rank, dim))
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_dense(cls, dense: DenseFFN, rank: int, dropout: float = 0.0) -> LowRankExpert:
        """Keep the `rank` most important hidden units of the dense FFN (the rest, if any, stay small-random)."""
        expert = cls(dense.fc1.in_features, rank, dropout)
        fc1, fc2 = dense.fc1, dense.fc2
        importance = fc1.weight.norm(dim=1) * fc2.weight.norm(dim=0)  # (F,)
        keep = importance.topk(min(rank, fc1.out_features)).indices.sort().values  # (r',)
        n = len(keep)
        with torch.no_grad():
            expert.down.weight[:n].copy_(fc1.weight[keep])
            expert.down.bias[:n].copy_(fc1.bias[keep])
            expert.up.weight[:, :n].copy_(fc2.weight[:, keep])
            expert.up.bias.copy_(fc2.bias)
        return expert

    def forward(self, x, context=None):
        return self.up(self.dropout(F.gelu(self.down(x))))  # (B, T, d)


class CrossAttentionExpert(nn.Module):
    """Side tokens attend to the backbone layer's tokens: x (B, T, d), tokens (B, T, D) -> (B, T, d)."""

    def __init__(self, dim: int, backbone_dim: int, num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross_attn expert: width {dim} is not divisible by {num_heads} heads")
        self.q = nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(backbone_dim, dim), nn.Linear(backbone_dim, dim)
        self.o = _small_out_(nn.Linear(dim, dim))
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, x, context):
        tokens, mask = context["tokens"], context["mask"]
        B, T, d = x.shape
        S, H = tokens.shape[1], self.num_heads
        q = self.q(x).view(B, T, H, d // H).transpose(1, 2)  # (B, H, T, d/H)
        k, v = (p(tokens).view(B, S, H, d // H).transpose(1, 2) for p in (self.k, self.v))  # (B, H, S, d/H)
        bias = (1.0 - mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, d))  # (B, T, d)


class ChannelAttentionExpert(nn.Module):
    """Squeeze-and-excitation over channels, gating a projection of x: (B, T, d) -> (B, T, d)."""

    def __init__(self, dim: int, reduction: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.squeeze, self.excite = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.proj = _small_out_(nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context):
        s = _masked_mean(x, context["mask"])  # (B, d)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(s))))  # (B, d)
        return self.dropout(self.proj(x) * gate.unsqueeze(1))  # (B, T, d)


class HeterogeneousExperts(nn.Module):
    """One expert per entry of `types`: x (B, T, d), context -> (B, T, N, d), all computed densely.

    All `ffn` experts live in one stacked `FFNExperts` (one einsum); the others in `self.others`.
    `self.order` maps expert position -> index into [ffn experts..., other experts...].
    """

    def __init__(self, types: list[str], ffn: FFNExperts | None, others: list[nn.Module]):
        super().__init__()
        unknown = [t for t in types if t not in EXPERT_TYPES]
        if unknown:
            raise ValueError(f"unknown expert types {unknown}; known: {list(EXPERT_TYPES)}")
        n_ffn = types.count("ffn")
        if (ffn.num_experts if ffn is not None else 0) != n_ffn or len(others) != len(types) - n_ffn:
            raise ValueError("HeterogeneousExperts: the experts given do not match `types`")
        self.types = tuple(types)
        self.ffn = ffn
        self.others = nn.ModuleList(others)
        i_ffn, i_other, order = 0, n_ffn, []
        for t in types:
            order.append(i_ffn if t == "ffn" else i_other)
            i_ffn, i_other = i_ffn + (t == "ffn"), i_other + (t != "ffn")
        self.order = tuple(order)

    @property
    def num_experts(self) -> int:
        return len(self.types)

    @property
    def needs_context(self) -> bool:
        """Cross-attention experts read the full-width backbone tokens of their layer."""
        return any(isinstance(e, CrossAttentionExpert) for e in self.others)

    @classmethod
    def from_dense(
        cls, dense: DenseFFN, moe: MoEConfig, backbone_dim: int, dropout: float = 0.0
    ) -> HeterogeneousExperts:
        """Build `moe.expert_types` in order, each initialised from (or beside) the dense FFN."""
        types = list(moe.expert_types or ["ffn"] * moe.num_experts)
        d = dense.fc1.in_features
        n_ffn = types.count("ffn")
        ffn = FFNExperts.upcycle(dense.fc1, dense.fc2, n_ffn, dropout) if n_ffn else None
        heads = CROSS_ATTN_MAX_HEADS if d % CROSS_ATTN_MAX_HEADS == 0 and d // CROSS_ATTN_MAX_HEADS >= 8 else 1
        build = {
            "lowrank": lambda: LowRankExpert.from_dense(dense, moe.lowrank_rank, dropout),
            "cross_attn": lambda: CrossAttentionExpert(d, backbone_dim, heads, dropout),
            "channel_attn": lambda: ChannelAttentionExpert(d, 4, dropout),
        }
        return cls(types, ffn, [build[t]() for t in types if t != "ffn"])

    def forward(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        outs = list(self.ffn(x).unbind(2)) if self.ffn is not None else []  # n_ffn x (B, T, d)
        outs += [expert(x, context) for expert in self.others]  # (B, T, d) each
        return torch.stack([outs[i] for i in self.order], dim=2)  # (B, T, N, d)

    def extra_repr(self) -> str:
        return f"types={list(self.types)}"
