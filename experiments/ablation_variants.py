"""The ablation's rows: named variants, each the `--set` overrides it states over the base config, and the
tables (after the paper's Tables 3 and 4) that group them. experiments/ablation.py runs them."""

from __future__ import annotations

from dataclasses import dataclass

MP_ISMOE = (
    "train.method=mp_ismoe",
    "quant.enabled=true",
    "quant.bits=8",
    "quant.noise=learned",
    "moe.enabled=true",
    "moe.prior=true",
    "moe.expert_types=null",
)


@dataclass(frozen=True)
class Variant:
    name: str
    what: str  # the "what changes" column, relative to full MP-ISMoE unless it says otherwise
    overrides: tuple[str, ...]


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "lst",
            "LST baseline: fp32 backbone, dense side FFN (no GNP-IQ, no ISMoE)",
            ("train.method=lst", "quant.enabled=false", "moe.enabled=false"),
        ),
        Variant(
            "lst+gnp_iq",
            "+ GNP-IQ only: 8-bit backbone, learned noise; dense side FFN (ISMoE off)",
            (*MP_ISMOE, "moe.enabled=false"),
        ),
        Variant(
            "lst+ismoe",
            "+ ISMoE only: fp32 backbone (GNP-IQ off); 4 FFN experts, top-2, [CLS] prior",
            (*MP_ISMOE, "quant.enabled=false"),
        ),
        Variant(
            "mp_ismoe", "full MP-ISMoE: 8-bit weights + fp32 LayerNorm, learned noise, 4 FFN experts, prior", MP_ISMOE
        ),
        Variant(
            "weights_4bit",
            "backbone weights 4-bit, LayerNorm fp32 (our 'low'; the paper's 'low' is 8-bit "
            "everywhere incl. LayerNorm, but we never quantize LayerNorm)",
            (*MP_ISMOE, "quant.bits=4"),
        ),
        Variant(
            "weights_4bit_noise_fixed",
            "4-bit backbone weights, re-quantization noise fixed at its init",
            (*MP_ISMOE, "quant.bits=4", "quant.noise=fixed"),
        ),
        Variant(
            "weights_4bit_noise_none",
            "4-bit backbone weights, no re-quantization events (static codes)",
            (*MP_ISMOE, "quant.bits=4", "quant.noise=none"),
        ),
        Variant(
            "noise_fixed",
            "re-quantization noise fixed at its init (mu, rho not learned by SPSA)",
            (*MP_ISMOE, "quant.noise=fixed"),
        ),
        Variant(
            "noise_none",
            "no re-quantization noise (static 8-bit codes, no GNP-IQ events)",
            (*MP_ISMOE, "quant.noise=none"),
        ),
        Variant(
            "no_prior", "router without the salient-token prior (g = softmax(W x))", (*MP_ISMOE, "moe.prior=false")
        ),
        Variant(
            "paper_routing",
            "the paper's routing, literally: identical expert copies, g' = (p + c) / 2 with "
            "c from token 0 and random r",
            (*MP_ISMOE, "moe.upcycle=copy", "moe.prior_mode=average", "moe.salient=cls", "moe.prior_init=random"),
        ),
        Variant(
            "upcycle_copy",
            "identical expert copies at upcycling (no symmetry breaking)",
            (*MP_ISMOE, "moe.upcycle=copy"),
        ),
        Variant(
            "prior_average",
            "the paper's prior: g' = (p + c) / 2 instead of cos(h, r) / T in the logits",
            (*MP_ISMOE, "moe.prior_mode=average"),
        ),
        Variant(
            "hetero_lowrank_xattn",
            "heterogeneous experts: 2 ffn + 1 lowrank + 1 cross_attn",
            (*MP_ISMOE, "moe.num_experts=4", "moe.expert_types=[ffn, ffn, lowrank, cross_attn]"),
        ),
        Variant(
            "hetero_all_types",
            "heterogeneous experts: ffn + lowrank + cross_attn + channel_attn",
            (*MP_ISMOE, "moe.num_experts=4", "moe.expert_types=[ffn, lowrank, cross_attn, channel_attn]"),
        ),
    )
}

# (title, [(variant, row label)]); the first row of each table is the reference the others are compared to.
TABLES = [
    (
        "Components (paper Table 3)",
        [
            ("lst", "LST"),
            ("lst+gnp_iq", "+ GNP-IQ"),
            ("lst+ismoe", "+ ISMoE"),
            ("mp_ismoe", "+ GNP-IQ + ISMoE (MP-ISMoE)"),
        ],
    ),
    (
        "Backbone weight precision (paper Table 4)",
        [
            ("mp_ismoe", "mixed: 8-bit weights, fp32 LN"),
            ("lst+ismoe", "full: fp32 weights"),
            ("weights_4bit", "low: 4-bit weights, fp32 LN"),
        ],
    ),
    (
        "GNP-IQ noise at 4 bits, where quantization error matters",
        [
            ("weights_4bit", "learned (SPSA, Adam steps)"),
            ("weights_4bit_noise_fixed", "fixed"),
            ("weights_4bit_noise_none", "none"),
        ],
    ),
    ("GNP-IQ noise", [("mp_ismoe", "learned (SPSA)"), ("noise_fixed", "fixed"), ("noise_none", "none")]),
    (
        "ISMoE routing prior",
        [
            ("mp_ismoe", "with prior (logits mode, k-means r)"),
            ("no_prior", "without prior"),
            ("prior_average", "paper's averaged prior"),
            ("upcycle_copy", "identical expert copies"),
            ("paper_routing", "the paper's routing, literally"),
        ],
    ),
    (
        "Expert types (HMMoE)",
        [
            ("mp_ismoe", "homogeneous: 4 ffn"),
            ("hetero_lowrank_xattn", "2 ffn + lowrank + cross_attn"),
            ("hetero_all_types", "ffn + lowrank + cross_attn + channel_attn"),
        ],
    ),
]
