"""k-means initialisation of the ISMoE prior representatives (training/prior_init.py)."""

import torch
import torch.nn.functional as F

from tests.training.test_backbone import FakeTokenizer, inputs, make_encoder
from training.config import load_config
from training.model import build_side_model
from training.moe import centred_unit
from training.prior_init import kmeans_prior_init_, spherical_kmeans


def test_spherical_kmeans_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    points = F.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 16, generator=g), dim=-1)
    found = spherical_kmeans(points, 4, seed=0)
    assert found.shape == (4, 16) and torch.allclose(found.norm(dim=-1), torch.ones(4))
    match = (found @ centres.t()).max(0).values  # each true centre has a centroid next to it
    assert (match > 0.99).all(), match


def test_kmeans_init_spreads_the_prior_over_experts():
    """After k-means init the prior separates inputs: different sequences prefer different experts."""
    cfg = load_config(overrides=["backbone.name=tiny", "side.reduction=2", "side.num_heads=2", "moe.num_experts=4"])
    model, _ = build_side_model(cfg, 2, FakeTokenizer("bert"), encoder=make_encoder("bert"))
    batches = [dict(zip(("input_ids", "attention_mask"), inputs(B=8, seed=s))) for s in range(4)]
    assert kmeans_prior_init_(model, batches, seed=0) == 3
    block = model.adapter.blocks[0].ffn
    keys = block.prior_keys.detach()
    assert torch.allclose(keys.norm(dim=-1), torch.ones(4), atol=1e-5)  # logits mode: unit centroids
    salient = torch.cat(
        [model.tap.stream(b["input_ids"], b["attention_mask"], None, lambda j, t: None) for b in batches]
    )[:, 0]  # (M, D) salient tokens of block 0's layer
    favourite = (centred_unit(salient) @ keys.t()).argmax(-1)
    assert len(set(favourite.tolist())) >= 3  # the representatives cover the data, not one corner of it
