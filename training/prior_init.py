"""Data-driven initialisation of the ISMoE prior: each expert's representative r_e is a k-means centroid
of the backbone's salient tokens, so the prior separates inputs from the first step.

Random r (the paper's default reading) start with a spread of about 1% between experts; the
routing then learns only from the load-balancing loss, which pushes towards uniform. Centroids of
the layer's own salient tokens give every expert a region of the input space at step 0.
"""

from __future__ import annotations

import torch

from .moe import MoEBlock, centred_unit


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k centroids of unit vectors x (M, D) under cosine similarity (k-means++ seeding) -> (k, D), unit length."""
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=g))
    centroids = [x[first]]
    for _ in range(1, k):
        distance = (1 - (x @ torch.stack(centroids).t()).max(-1).values).clamp_min(0) + 1e-12  # (M,)
        centroids.append(x[int(torch.multinomial(distance, 1, generator=g))])
    c = torch.stack(centroids)  # (k, D)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(-1)  # (M,)
        for e in range(k):
            members = x[assign == e]
            if len(members):
                c[e] = torch.nn.functional.normalize(members.sum(0), dim=-1)
            else:  # an empty cluster takes the point farthest from every centroid
                c[e] = x[(x @ c.t()).max(-1).values.argmin()]
    return c


@torch.no_grad()
def kmeans_prior_init_(model, batches: list[dict], seed: int = 0) -> int:
    """Set every MoE block's prior_keys from its layer's salient tokens over `batches`; returns blocks set.

    Logits mode compares centred unit vectors, so the keys are centroids in that space; the paper's
    average mode takes raw dot products, so its keys are the raw-space means of the same clusters.
    """
    blocks = (
        [
            (j, b.ffn)
            for j, b in enumerate(model.adapter.blocks)
            if isinstance(b.ffn, MoEBlock) and b.ffn.prior_keys is not None
        ]
        if model.adapter.side_enabled
        else []
    )
    if not blocks or not batches:
        return 0
    was_training = model.training
    model.eval()
    salient = torch.cat(
        [
            model.tap.stream(b["input_ids"], b["attention_mask"], b.get("token_type_ids"), lambda j, tap: None)
            for b in batches
        ]
    )  # (M, K-1, D)
    model.train(was_training)
    for j, block in blocks:
        raw = salient[:, j].float()  # (M, D)
        unit = centred_unit(raw)
        centroids = spherical_kmeans(unit, block.num_experts, seed=seed * 1000 + j)  # (N, D)
        if block.prior_mode == "logits":
            keys = centroids
        else:
            assign = (unit @ centroids.t()).argmax(-1)
            keys = torch.stack(
                [raw[assign == e].mean(0) if (assign == e).any() else raw.mean(0) for e in range(block.num_experts)]
            )
        block.prior_keys.copy_(keys.to(block.prior_keys.dtype))
    return len(blocks)
