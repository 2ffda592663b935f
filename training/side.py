"""The ladder side network (LST) with ISMoE blocks, and the classification head.

`Adapter` is exactly the exported adapter graph: tapped backbone states in, logits out. Width is
d/r; one side block per kept backbone layer; each ladder step mixes the side state with a
downsampled backbone state through a learned gate g = sigmoid(alpha / T), alpha = 0 at start.

It runs in two halves so that training never holds all full-width taps at once: `project(j, tap)`
downsamples tap j as soon as its backbone layer finishes (training.model.SideTuned streams them),
and `ladder(...)` runs the side blocks on the d-wide projections. `forward` does both for export.
In training, side blocks are recomputed in the backward pass (`side.recompute`): only their
inputs are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import masked_mean
from .config import MoEConfig, SideConfig
from .moe import DenseFFN, FFNExperts, MoEBlock


class SideAttention(nn.Module):
    """Multi-head self-attention of width d/r over the real tokens."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"side width {dim} is not divisible by side.num_heads={num_heads}")
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(self, x, mask):
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = (proj(x).view(B, T, H, D // H).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H, T, D/H)
        bias = (1.0 - mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class SideBlock(nn.Module):
    """Pre-LN transformer block whose FFN is an MoE (or dense for LST)."""

    def __init__(self, dim: int, ffn: nn.Module, num_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SideAttention(dim, num_heads, dropout)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, h, mask, cls, context):
        h = h + self.drop(self.attn(self.ln1(h), mask))
        y, aux = self.ffn(self.ln2(h), cls, mask, context)
        return h + self.drop(y), aux


def upcycle(dense: DenseFFN, backbone_dim: int, moe: MoEConfig, dropout: float, seed: int = 0) -> MoEBlock:
    """Sparse upcycling: an MoE whose experts start from `dense` (HMMoE types via training.hmmoe)."""
    if moe.expert_types and set(moe.expert_types) != {"ffn"}:
        from .hmmoe import HeterogeneousExperts

        experts = HeterogeneousExperts.from_dense(dense, moe, backbone_dim, dropout)
    else:
        experts = FFNExperts.upcycle(
            dense.fc1, dense.fc2, moe.num_experts, dense.dropout.p, moe.upcycle, moe.upcycle_noise, seed
        )
    return MoEBlock(
        experts,
        dense.fc1.in_features,
        backbone_dim,
        moe.top_k,
        moe.prior,
        moe.routing,
        moe.prior_mode,
        moe.prior_temperature,
        moe.dispatch,
    )


class Adapter(nn.Module):
    """Ladder side network + head: (hidden_states (B,K,T,D), cls_states (B,K-1,D), mask (B,T)) -> logits (B,C)."""

    def __init__(
        self, backbone_dim: int, ffn_dim: int, num_taps: int, num_labels: int, side: SideConfig, pooling: str = "mean"
    ):
        super().__init__()
        d = backbone_dim // side.reduction
        self.side_dim, self.pooling, self.side_enabled, self.recompute = d, pooling, side.enabled, side.recompute
        self.num_taps = num_taps
        self.combine_backbone = side.combine_backbone or not side.enabled
        if side.enabled:
            self.downs = nn.ModuleList(nn.Linear(backbone_dim, d) for _ in range(num_taps))
            self.alphas = nn.Parameter(torch.zeros(num_taps - 1))
            self.gate_temperature = side.gate_temperature
            self.blocks = nn.ModuleList(
                SideBlock(
                    d, DenseFFN(d, max(4, ffn_dim // side.reduction), side.ffn_dropout), side.num_heads, side.dropout
                )
                for _ in range(num_taps - 1)
            )
            self.side_norm = nn.LayerNorm(d)
            self.up = nn.Linear(d, backbone_dim)
            if self.combine_backbone:  # start exactly at a linear probe of the frozen backbone
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(side.dropout)
        self.classifier = nn.Linear(backbone_dim, num_labels)

    def upcycle_(self, moe: MoEConfig, seed: int = 0) -> None:
        """Turn every side block's dense FFN into an MoE (after any pruning-based initialisation)."""
        if self.side_enabled and moe.enabled:
            for j, block in enumerate(self.blocks):
                block.ffn = upcycle(block.ffn, self.downs[0].in_features, moe, block.drop.p, seed * 1000 + j)

    @property
    def needs_context(self) -> bool:
        """Whether an expert reads the full-width backbone tokens (HMMoE cross-attention)."""
        return self.side_enabled and any(
            getattr(b.ffn.experts, "needs_context", False) for b in self.blocks if hasattr(b.ffn, "experts")
        )

    def pool(self, x, mask):
        return masked_mean(x, mask) if self.pooling == "mean" else x[:, 0]

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.alphas / self.gate_temperature)  # (K-1,)

    def project(self, j: int, tap: torch.Tensor) -> torch.Tensor:
        """Downsample tap j: (B, T, D) -> (B, T, d)."""
        return self.downs[j](tap)

    def _block(self, j: int, h, mask, salient, context):
        block = self.blocks[j]
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, mask, salient, context, use_reentrant=False)
        return block(h, mask, salient, context)

    def ladder(self, projected: list[torch.Tensor], salient_states, mask, pooled_backbone=None, contexts=None):
        """Side blocks over the projected taps (K of (B, T, d)) and salient states (B, K-1, D) -> logits (B, C), aux."""
        z = pooled_backbone if self.combine_backbone else 0.0  # (B, D)
        aux = []
        if self.side_enabled:
            h = projected[0]  # (B, T, d)
            g = self.gates()
            for j in range(len(self.blocks)):
                h = g[j] * h + (1 - g[j]) * projected[j + 1]
                context = {"tokens": contexts[j + 1], "mask": mask} if contexts is not None else {"mask": mask}
                h, a = self._block(j, h, mask, salient_states[:, j], context)
                aux.append(a)
            z = z + self.up(self.pool(self.side_norm(h), mask))  # (B, D)
        return self.classifier(self.dropout(z)), aux  # (B, C)

    def side_forward(self, hidden_states, cls_states, mask):
        """The ladder on stacked taps; returns the final side states (B, T, d) and the per-block aux losses."""
        tap = _tap_getter(hidden_states)
        h = self.project(0, tap(0))  # (B, T, d)
        g = self.gates()
        aux = []
        for j, block in enumerate(self.blocks):
            tokens = tap(j + 1)  # (B, T, D)
            h = g[j] * h + (1 - g[j]) * self.project(j + 1, tokens)
            h, a = block(h, mask, cls_states[:, j], {"tokens": tokens, "mask": mask})
            aux.append(a)
        return self.side_norm(h), aux

    def forward(self, hidden_states, cls_states, attention_mask):
        """hidden_states: (B, K, T, D), or a list of K (B, T, D) taps (the export and evaluation path)."""
        tap = _tap_getter(hidden_states)
        mask = attention_mask
        pooled = self.pool(tap(self.num_taps - 1), mask) if self.combine_backbone else None  # (B, D)
        projected = [self.project(j, tap(j)) for j in range(self.num_taps)] if self.side_enabled else []
        contexts = [tap(j) for j in range(self.num_taps)] if self.needs_context else None
        return self.ladder(projected, cls_states, mask, pooled, contexts)


def _tap_getter(hidden_states):
    """Index tap j of a stacked (B, K, T, D) tensor or of a list of (B, T, D) taps."""
    if isinstance(hidden_states, torch.Tensor):
        return lambda j: hidden_states[:, j]
    return lambda j: hidden_states[j]


def prune_init_(adapter: Adapter, encoder: nn.Module, tap_layers: list[int]) -> int:
    """Initialise side blocks from their backbone layers by structured magnitude pruning (LST).

    For each block, keep the d hidden dims and d_ff FFN dims of largest weight magnitude of the
    backbone layer's own Linears (q, k, v, o, ffn-in, ffn-out, named per architecture in
    training/architectures.py). Linears without a bias (T5) give zero side biases. Returns how many
    blocks were initialised. Call before `Adapter.upcycle_`, so every expert starts from the pruned FFN.
    """
    from .architectures import layer_linears

    done = 0
    for block, li in zip(adapter.blocks, tap_layers):
        if not isinstance(block.ffn, DenseFFN):
            continue
        (q, k, v, o), (fin, fout) = layer_linears(encoder, li - 1)
        d = adapter.side_dim
        importance = (
            sum(m.weight.abs().sum(0) for m in (q, k, v, fin)) + o.weight.abs().sum(1) + fout.weight.abs().sum(1)
        )
        keep = importance.topk(d).indices.sort().values  # (d,)
        with torch.no_grad():
            for src, dst in zip((q, k, v, o), (block.attn.q, block.attn.k, block.attn.v, block.attn.o)):
                dst.weight.copy_(src.weight[keep][:, keep])
                _copy_bias(dst, src, keep)
            dense = block.ffn
            keep_f = fin.weight.abs().sum(1).topk(dense.fc1.out_features).indices.sort().values
            dense.fc1.weight.copy_(fin.weight[keep_f][:, keep])
            _copy_bias(dense.fc1, fin, keep_f)
            dense.fc2.weight.copy_(fout.weight[keep][:, keep_f])
            _copy_bias(dense.fc2, fout, keep)
        done += 1
    return done


def _copy_bias(dst: nn.Linear, src: nn.Linear, keep: torch.Tensor) -> None:
    if src.bias is None:
        dst.bias.zero_()
    else:
        dst.bias.copy_(src.bias[keep])
