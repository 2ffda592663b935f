"""Where each supported encoder keeps the parts the method uses: an explicit map per `model_type`, as
peft's target-module tables do, instead of guessing from module shapes.

An architecture names, as dotted paths: the ModuleList of layers; the modules whose outputs are the
taps (the embedding output, then each layer's output; T5 normalises its last layer's output in
`final_layer_norm`); per layer, the attention projections q, k, v, o and the FFN's input and output
Linears (what the pruned side initialisation copies); and the LayerNorm each tap ends with (None:
the architecture uses RMSNorm, so only `quant.layernorm=frozen` applies). A model_type not listed is
refused when the backbone loads, with what an entry needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ConfigError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    encoder_class: str  # transformers class building the encoder alone
    layers: str  # dotted path of the layer ModuleList
    embeddings: str  # module whose output is tap 0
    attention: tuple[str, str, str, str]  # q, k, v, o Linears within a layer
    ffn: tuple[str, str]  # FFN input and output Linears within a layer
    tap_norm: str | None  # the LayerNorm a layer's output comes from (within a layer); None: RMSNorm
    embeddings_norm: str | None  # the LayerNorm ending the embeddings block
    final_norm: str | None = None  # a norm applied after the last layer (T5); its output is the last tap
    gated_ffn: str | None = None  # config attribute that, when true, means a gated FFN (not prunable into ours)
    has_pooler: bool = False  # built without it (add_pooling_layer=False): the ladder never uses it


_BERT = dict(
    encoder_class="AutoModel",
    layers="encoder.layer",
    embeddings="embeddings",
    attention=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    ffn=("intermediate.dense", "output.dense"),
    tap_norm="output.LayerNorm",
    embeddings_norm="LayerNorm",
    has_pooler=True,
)
ARCHITECTURES = {
    a.model_type: a
    for a in (
        Architecture("bert", **_BERT),
        Architecture("roberta", **_BERT),
        Architecture("xlm-roberta", **_BERT),
        Architecture(
            "mpnet",
            **{**_BERT, "attention": ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o")},
        ),
        Architecture(
            "distilbert",
            encoder_class="AutoModel",
            layers="transformer.layer",
            embeddings="embeddings",
            attention=("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
            ffn=("ffn.lin1", "ffn.lin2"),
            tap_norm="output_layer_norm",
            embeddings_norm="LayerNorm",
        ),
        Architecture(
            "t5",
            encoder_class="T5EncoderModel",
            layers="encoder.block",
            embeddings="encoder.embed_tokens",
            attention=(
                "layer.0.SelfAttention.q",
                "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o",
            ),
            ffn=("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"),
            tap_norm=None,
            embeddings_norm=None,
            final_norm="encoder.final_layer_norm",
            gated_ffn="is_gated_act",
        ),
    )
}
ARCHITECTURES["mt5"] = ARCHITECTURES["umt5"] = ARCHITECTURES["t5"]


def architecture(model_type: str) -> Architecture:
    """The map for `model_type`, or a ConfigError naming what a new entry needs."""
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"backbone: model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))}). "
            "An encoder needs an entry in training/architectures.py naming its layer list, its embedding "
            "module, the q/k/v/o and FFN Linears of a layer and the norm each layer ends with"
        )
    return ARCHITECTURES[model_type]


def get(module: nn.Module, path: str) -> nn.Module:
    """module.get_submodule(path) with an error that names the architecture entry to fix."""
    try:
        return module.get_submodule(path)
    except AttributeError as e:
        raise ConfigError(
            f"backbone {type(module).__name__} has no module {path!r} "
            f"(training/architectures.py entry for {getattr(module.config, 'model_type', '?')})"
        ) from e


def layers(encoder: nn.Module) -> nn.ModuleList:
    return get(encoder, architecture(encoder.config.model_type).layers)


def tap_modules(encoder: nn.Module, tap_layers: list[int]) -> list[nn.Module]:
    """Modules whose outputs are the taps: embeddings, then each tapped layer (1-based); T5's last is its final norm."""
    arch = architecture(encoder.config.model_type)
    blocks = layers(encoder)
    out = [get(encoder, arch.embeddings)]
    for i in tap_layers:
        last = i == len(blocks) and arch.final_norm is not None
        out.append(get(encoder, arch.final_norm) if last else blocks[i - 1])
    return out


def tapped_layernorms(encoder: nn.Module, tap_layers: list[int]) -> list[nn.LayerNorm]:
    """The LayerNorm each tap ends with (trained in quant.layernorm truncated/full modes)."""
    arch = architecture(encoder.config.model_type)
    if arch.tap_norm is None or arch.embeddings_norm is None:
        raise ConfigError(
            f"quant.layernorm: {arch.model_type} normalises with RMSNorm, whose taps are not "
            "LayerNorms; only quant.layernorm=frozen applies to it"
        )
    blocks = layers(encoder)
    return [get(get(encoder, arch.embeddings), arch.embeddings_norm)] + [
        get(blocks[i - 1], arch.tap_norm) for i in tap_layers
    ]


def layer_linears(encoder: nn.Module, index: int) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """([q, k, v, o], [ffn_in, ffn_out]) of layer `index` (0-based); ConfigError for a gated FFN."""
    arch = architecture(encoder.config.model_type)
    if arch.gated_ffn and getattr(encoder.config, arch.gated_ffn, False):
        raise ConfigError(
            f"side.init=prune: this {arch.model_type} has a gated FFN, which the side network's "
            "GELU FFN cannot be pruned from; set side.init=random"
        )
    block = layers(encoder)[index]
    return [get(block, p) for p in arch.attention], [get(block, p) for p in arch.ffn]
