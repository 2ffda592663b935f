"""Assemble a trainable model for any method from a RunConfig.

Side methods (MP-ISMoE, LST and their ablations) are `SideTuned`: a frozen (optionally GNP-IQ
quantized) `BackboneTap` feeding an `Adapter`. Baselines that tune the backbone itself (full
fine-tuning, LoRA through peft, BitFit) are `FineTuned`: encoder, pooling, linear head.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .architectures import architecture, get
from .backbone import BackboneTap, encoder_layers, load_encoder, masked_mean
from .config import RunConfig
from .quant import model_bytes, quantize_
from .side import Adapter, prune_init_


@dataclass
class BackboneInfo:
    """What later stages need to know about the backbone, saved in the checkpoint config."""

    model_type: str
    hidden_size: int
    ffn_dim: int
    num_layers: int
    tap_layers: list[int]
    has_token_type_ids: bool
    cls_mode: str  # cls | mean (models without a [CLS] token)
    fp32_bytes: int

    @property
    def num_taps(self) -> int:
        return len(self.tap_layers) + 1

    def to_dict(self) -> dict:
        return asdict(self)


def layer_linears_ffn_dim(encoder: nn.Module) -> int:
    """The FFN width of the backbone's layers, read off its first FFN Linear (training/architectures.py)."""
    return get(encoder_layers(encoder)[0], architecture(encoder.config.model_type).ffn[0]).out_features


def salient_mode(cfg: RunConfig, tokenizer) -> str:
    """Which token steers the ISMoE prior: `cls` (token 0) or `mean` (masked mean of the layer).

    `auto` follows the backbone's pooling: a mean-pooled sentence model (MiniLM, MPNet) was trained
    to put its meaning in the mean, not in token 0; a model without a [CLS] token always uses the mean.
    """
    wanted = cfg.moe.salient
    if wanted == "auto":
        wanted = "mean" if cfg.backbone.pooling == "mean" else "cls"
    return "cls" if wanted == "cls" and tokenizer.cls_token is not None else "mean"


def backbone_info(encoder: nn.Module, cfg: RunConfig, tokenizer) -> BackboneInfo:
    c = encoder.config
    n = len(encoder_layers(encoder))
    tap_layers = sorted(cfg.side.layers) if cfg.side.layers else list(range(1, n + 1))
    if tap_layers[-1] > n:
        raise ValueError(f"side.layers: {tap_layers} names a layer beyond the backbone's {n}")
    takes_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
    has_types = takes_types and "token_type_ids" in tokenizer.model_input_names
    ffn = layer_linears_ffn_dim(encoder)
    cls_mode = salient_mode(cfg, tokenizer)
    return BackboneInfo(
        c.model_type,
        c.hidden_size,
        ffn,
        n,
        tap_layers,
        has_types,
        cls_mode,
        sum(p.numel() * 4 for p in encoder.parameters()),
    )


class SideTuned(nn.Module):
    """Frozen backbone taps -> ladder side network with ISMoE -> logits."""

    def __init__(self, tap: BackboneTap, adapter: Adapter):
        super().__init__()
        self.tap, self.adapter = tap, adapter

    def forward(self, batch: dict):
        """Stream the backbone's taps into the adapter's down-projections, then run the ladder."""
        a, mask = self.adapter, batch["attention_mask"]
        K = a.num_taps
        projected: list = [None] * K
        contexts: list | None = [None] * K if a.needs_context else None
        pooled: list = [None]

        def consume(j: int, tap: torch.Tensor) -> None:
            if a.side_enabled:
                projected[j] = a.project(j, tap)  # (B, T, d); the full-width tap is dropped after this
            if j == K - 1 and a.combine_backbone:
                pooled[0] = a.pool(tap, mask)  # (B, D)
            if contexts is not None:
                contexts[j] = tap

        salient = self.tap.stream(batch["input_ids"], mask, batch.get("token_type_ids"), consume)
        return a.ladder(projected, salient, mask, pooled[0], contexts)


class FineTuned(nn.Module):
    """Encoder + pooling + linear head, for full fine-tuning, LoRA and BitFit."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, batch: dict):
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        x = self.encoder(**kwargs).last_hidden_state  # (B, T, D)
        z = masked_mean(x, batch["attention_mask"]) if self.pooling == "mean" else x[:, 0]
        return self.classifier(self.dropout(z)), []


def build_side_model(
    cfg: RunConfig, num_labels: int, tokenizer, encoder: nn.Module | None = None, for_loading: bool = False
) -> tuple[SideTuned, BackboneInfo]:
    """Backbone (quantized if enabled) + adapter. `for_loading` skips work a checkpoint overwrites."""
    encoder = encoder if encoder is not None else load_encoder(cfg.backbone, len(tokenizer), cfg.train.seed)
    info = backbone_info(encoder, cfg, tokenizer)
    adapter = Adapter(info.hidden_size, info.ffn_dim, info.num_taps, num_labels, cfg.side, cfg.backbone.pooling)
    if cfg.side.init == "prune" and not for_loading:
        prune_init_(adapter, encoder, info.tap_layers)
    adapter.upcycle_(cfg.moe, cfg.train.seed)
    if cfg.quant.enabled:
        quant = cfg.quant if not for_loading else type(cfg.quant)(**{**asdict(cfg.quant), "keep_fp_reference": False})
        quantize_(encoder, quant)  # the side network lives outside the encoder
    tap = BackboneTap(encoder, info.tap_layers, cfg.quant.layernorm, info.cls_mode)
    return SideTuned(tap, adapter), info


def build_finetune_model(cfg: RunConfig, num_labels: int, tokenizer) -> tuple[FineTuned, BackboneInfo]:
    encoder = load_encoder(cfg.backbone, len(tokenizer), cfg.train.seed)
    info = backbone_info(encoder, cfg, tokenizer)
    if cfg.train.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha, lora_dropout=0.1, target_modules="all-linear"
        )
        encoder = get_peft_model(encoder, lora)
    model = FineTuned(encoder, num_labels, cfg.backbone.pooling)
    if cfg.train.method == "bitfit":
        for name, p in model.encoder.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    if cfg.train.method == "linear_probe":  # the frozen fp encoder's pooled output, a trained head
        model.encoder.requires_grad_(False)
    return model, info


def build_model(cfg: RunConfig, num_labels: int, tokenizer) -> tuple[nn.Module, BackboneInfo]:
    if cfg.side.enabled:
        return build_side_model(cfg, num_labels, tokenizer)
    return build_finetune_model(cfg, num_labels, tokenizer)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def backbone_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes of the backbone as it sits in memory (quantized or not)."""
    encoder = model.tap.encoder if isinstance(model, SideTuned) else model.encoder
    return model_bytes(encoder)


def aux_loss(aux: list[dict], cfg: RunConfig) -> torch.Tensor | float:
    """Load-balancing and router z losses summed over MoE blocks, each behind its coefficient."""
    total = 0.0
    for a in aux:
        if "load_balance" in a and cfg.moe.load_balance_coef:
            total = total + cfg.moe.load_balance_coef * a["load_balance"]
        if "z_loss" in a and cfg.moe.z_loss_coef:
            total = total + cfg.moe.z_loss_coef * a["z_loss"]
    return total
