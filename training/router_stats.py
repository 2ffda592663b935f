"""Router diagnostics per epoch: is ISMoE routing anything, or averaging near-identical experts?

Per MoE block, over the validation split: the mean entropy of the gate distribution (log N =
uniform), the share of top-k assignments each expert receives, the spread of the prior between
experts, and the mean pairwise cosine similarity of the experts' weights (1.0 = identical copies).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .moe import MoEBlock


class RouterStats:
    """Accumulates routing figures over batches of (aux list, mask)."""

    def __init__(self):
        self.entropy: dict[int, list[float]] = {}
        self.load: dict[int, torch.Tensor] = {}
        self.prior_spread: dict[int, list[float]] = {}

    def add(self, aux: list[dict], mask: torch.Tensor) -> None:
        real = mask.bool()  # (B, T)
        for j, a in enumerate(aux):
            if "gates" not in a:
                continue
            g = a["gates"][real].float()  # (R, N)
            ent = -(g * g.clamp_min(1e-12).log()).sum(-1)  # (R,)
            self.entropy.setdefault(j, []).append(float(ent.mean()) if len(ent) else 0.0)
            counts = F.one_hot(a["indices"][real], g.shape[-1]).sum((0, 1)).float().cpu()  # (N,)
            self.load[j] = self.load.get(j, torch.zeros_like(counts)) + counts
            if a.get("prior") is not None:
                self.prior_spread.setdefault(j, []).append(float(a["prior"].float().std(-1).mean()))

    def summary(self, model) -> dict:
        """{"blocks": [{entropy, entropy_uniform, load, prior_spread, expert_similarity}, ...]}."""
        blocks = []
        moes = (
            [b.ffn for b in model.adapter.blocks]
            if getattr(model, "adapter", None) is not None and model.adapter.side_enabled
            else []
        )
        for j, moe in enumerate(moes):
            if not isinstance(moe, MoEBlock) or j not in self.entropy:
                continue
            load = self.load[j] / self.load[j].sum().clamp_min(1)
            blocks.append(
                {
                    "block": j,
                    "entropy": sum(self.entropy[j]) / len(self.entropy[j]),
                    "entropy_uniform": math.log(moe.num_experts),
                    "load": [round(float(v), 4) for v in load],
                    "prior_spread": (
                        sum(self.prior_spread[j]) / len(self.prior_spread[j]) if self.prior_spread.get(j) else None
                    ),
                    "expert_similarity": expert_similarity(moe),
                }
            )
        return {"blocks": blocks}


def expert_similarity(moe: MoEBlock) -> float | None:
    """Mean pairwise cosine similarity of the FFN experts' flattened weights; None for other expert kinds."""
    experts = moe.experts
    if not hasattr(experts, "w1"):
        return None
    flat = torch.cat([experts.w1.flatten(1), experts.w2.flatten(1)], dim=1).detach().float()  # (N, P)
    n = flat.shape[0]
    if n < 2:
        return None
    sim = F.normalize(flat, dim=-1) @ F.normalize(flat, dim=-1).t()  # (N, N)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
