"""Typed, self-checking run configuration: YAML in, dataclasses out, plain dicts in the checkpoint.

Every section is a dataclass that validates itself on construction; `load_config` rejects unknown
keys, wrong types and impossible values with the dotted key in the message. The whole `RunConfig`
is saved as a plain dict in the checkpoint so that export and serving can rebuild the model.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


@dataclass
class BackboneConfig:
    """Which encoder to load (offline) and how to read it."""

    name: str = "minilm"  # minilm | mpnet | tiny | a local Hugging Face model directory
    max_length: int = 128  # tokenizer truncation; longer text is truncated, never an error
    pooling: str = "mean"  # mean (sentence-transformers models) | cls
    tiny_hidden: int = 32  # only for name=tiny: a random BertConfig with the real MiniLM tokenizer
    tiny_layers: int = 2
    random_init: bool = False  # the architecture of `name` with random weights: memory/speed runs only
    pad_to_max_length: bool = False  # fixed (B, max_length) batches, for memory/speed benchmarks

    def __post_init__(self):
        _check(bool(self.name), "backbone.name", "must not be empty")
        _check(8 <= self.max_length <= 4096, "backbone.max_length", "must be in [8, 4096]")
        _one_of(self.pooling, ("mean", "cls"), "backbone.pooling")
        _check(
            self.tiny_hidden % 4 == 0 and self.tiny_hidden >= 8, "backbone.tiny_hidden", "must be a multiple of 4, >= 8"
        )
        _check(self.tiny_layers >= 1, "backbone.tiny_layers", "must be >= 1")


@dataclass
class DataConfig:
    """A built-in dataset or a user CSV/JSONL file, split once with a fixed seed."""

    dataset: str = "rotten_tomatoes"  # rotten_tomatoes | bbc_news | path/to/file.csv | path/to/file.jsonl
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_examples: int | None = None  # stratified subsample, for quick runs
    task_type: str = "auto"  # auto | classification | regression (one score per row, MSE)

    def __post_init__(self):
        _check(bool(self.dataset), "data.dataset", "must not be empty")
        for k in ("val_fraction", "test_fraction"):
            v = getattr(self, k)
            _check(0.0 < v < 0.5, f"data.{k}", f"must be in (0, 0.5), got {v}")
        _check(self.max_examples is None or self.max_examples >= 10, "data.max_examples", "must be >= 10")
        _one_of(self.task_type, ("auto", "classification", "regression"), "data.task_type")


@dataclass
class QuantConfig:
    """GNP-IQ: n-bit asymmetric per-row backbone weights with iterative noisy re-quantization."""

    enabled: bool = True
    bits: int = 8
    rounding: str = "nearest"  # nearest | floor (the paper's literal floor)
    quantize_embeddings: bool = True
    layernorm: str = "frozen"  # frozen | truncated | full (docs/METHOD.md: frozen measured no worse, saves memory)
    requant_every_epochs: int = 1  # M
    requant_fraction: float = 0.05  # p: share of rows re-quantized per tensor per event
    noise: str = "learned"  # learned (SPSA on the task loss) | fixed | none
    requant_base: str = "reference"  # reference (the fp16 copy: noise around the pretrained weight) | dequantized
    noise_mu_init: float = 0.0  # mu_t, in units of the row's scale s
    noise_rho_init: float = -1.0  # softplus(rho_t) is the noise std in units of s
    spsa_steps: int = 2
    spsa_batches: int = 2
    spsa_lr: float = 0.05  # Adam: about the change of mu, rho per SPSA step; sgd: the plain rate
    spsa_optimizer: str = "adam"  # adam (normalised steps that move) | sgd (the plain SPSA update)
    spsa_perturbation: float = 0.25
    keep_fp_reference: bool = True  # an fp16 CPU copy, used as the reference for Eq. 4

    def __post_init__(self):
        _one_of(self.bits, (4, 8), "quant.bits")
        _one_of(self.rounding, ("nearest", "floor"), "quant.rounding")
        _one_of(self.layernorm, ("frozen", "truncated", "full"), "quant.layernorm")
        _one_of(self.noise, ("learned", "fixed", "none"), "quant.noise")
        _one_of(self.requant_base, ("reference", "dequantized"), "quant.requant_base")
        _check(self.requant_every_epochs >= 0, "quant.requant_every_epochs", "must be >= 0 (0 disables)")
        _check(0.0 <= self.requant_fraction <= 1.0, "quant.requant_fraction", "must be in [0, 1]")
        _check(self.spsa_steps >= 0 and self.spsa_batches >= 1, "quant.spsa_steps", "steps >= 0 and batches >= 1")
        _check(self.spsa_perturbation > 0, "quant.spsa_perturbation", "must be > 0")
        _one_of(self.spsa_optimizer, ("adam", "sgd"), "quant.spsa_optimizer")


@dataclass
class SideConfig:
    """The ladder side network (LST): width d/r, one block per kept backbone layer."""

    enabled: bool = True
    reduction: int = 8  # r
    num_heads: int = 4
    layers: list[int] | None = None  # kept backbone layers (1-based); None keeps all
    gate_temperature: float = 0.1
    init: str = "prune"  # prune (structured magnitude pruning of the backbone layer) | random
    combine_backbone: bool = True  # head sees pooled backbone output + upsampled side output
    dropout: float = 0.1  # attention probabilities and each residual branch (BERT's placement)
    ffn_dropout: float = 0.0  # also inside the FFN / experts, on the hidden units (LST's extra dropout)
    recompute: bool = True  # activation checkpointing of side blocks in training: keeps block inputs only

    def __post_init__(self):
        _check(self.reduction >= 1, "side.reduction", "must be >= 1")
        _check(self.num_heads >= 1, "side.num_heads", "must be >= 1")
        _check(
            self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 1), "side.layers", "1-based, non-empty"
        )
        _check(self.gate_temperature > 0, "side.gate_temperature", "must be > 0")
        _one_of(self.init, ("prune", "random"), "side.init")
        _check(0.0 <= self.dropout < 1.0, "side.dropout", "must be in [0, 1)")
        _check(0.0 <= self.ffn_dropout < 1.0, "side.ffn_dropout", "must be in [0, 1)")


EXPERT_TYPES = ("ffn", "lowrank", "cross_attn", "channel_attn")


@dataclass
class MoEConfig:
    """ISMoE: the side FFNs become top-k experts routed with a prior from the backbone's salient token."""

    enabled: bool = True
    num_experts: int = 8  # docs/capacity.md
    top_k: int = 2
    prior: bool = True
    prior_mode: str = "logits"  # logits (cos(h, r) / T added to router logits) | average (paper: (p + c) / 2)
    prior_temperature: float = 0.1  # initial T of the logits-mode prior (learned)
    prior_init: str = "kmeans"  # kmeans (r from salient tokens of a few training batches) | random
    salient: str = "auto"  # auto (follows backbone.pooling) | cls (token 0) | mean (masked mean of the layer)
    routing: str = "renorm"  # renorm (top-k weights renormalised) | paper (softmax over the chosen)
    upcycle: str = "noise"  # copy (identical experts, the paper) | noise (copies + noise) | partition
    upcycle_noise: float = 0.1  # noise std as a share of each weight matrix's std
    dispatch: str = "sparse"  # training: sparse (each token through its k experts) | dense (all experts)
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    expert_types: list[str] | None = None  # HMMoE: one type per expert; None = all ffn
    lowrank_rank: int = 8

    def __post_init__(self):
        _check(self.num_experts >= 1, "moe.num_experts", "must be >= 1")
        _check(1 <= self.top_k <= self.num_experts, "moe.top_k", f"must be in [1, num_experts={self.num_experts}]")
        _one_of(self.prior_mode, ("logits", "average"), "moe.prior_mode")
        _check(self.prior_temperature > 0, "moe.prior_temperature", "must be > 0")
        _one_of(self.prior_init, ("kmeans", "random"), "moe.prior_init")
        _one_of(self.salient, ("auto", "cls", "mean"), "moe.salient")
        _one_of(self.upcycle, ("copy", "noise", "partition"), "moe.upcycle")
        _check(self.upcycle_noise >= 0, "moe.upcycle_noise", "must be >= 0")
        _one_of(self.dispatch, ("sparse", "dense"), "moe.dispatch")
        _one_of(self.routing, ("renorm", "paper"), "moe.routing")
        _check(
            self.load_balance_coef >= 0 and self.z_loss_coef >= 0, "moe.load_balance_coef", "coefficients must be >= 0"
        )
        if self.expert_types is not None:
            _check(len(self.expert_types) == self.num_experts, "moe.expert_types", f"needs {self.num_experts} entries")
            for t in self.expert_types:
                _one_of(t, EXPERT_TYPES, "moe.expert_types")
        _check(self.lowrank_rank >= 1, "moe.lowrank_rank", "must be >= 1")


METHODS = ("mp_ismoe", "lst", "full_ft", "lora", "bitfit", "linear_probe")
BACKBONE_TUNING = ("full_ft", "lora", "bitfit", "linear_probe")  # no side network: encoder + pooling + head


@dataclass
class TrainConfig:
    """Optimisation budget and the fine-tuning method."""

    method: str = "mp_ismoe"
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 1e-3
    head_lr: float | None = None  # defaults to lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    threads: int | None = None  # torch CPU threads; None = all cores
    lora_r: int = 8
    lora_alpha: int = 16
    max_steps: int | None = None  # stop early (benchmarks)
    log_every: int = 10

    def __post_init__(self):
        _one_of(self.method, METHODS, "train.method")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _one_of(self.device, ("auto", "cpu", "cuda"), "train.device")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")


# What each method needs of the other sections. The preset decides over a config file's values; only
# a value set on purpose for this run (`--set`, load_config's overrides) can contradict it, and that
# is an error naming the key.
_NO_SIDE = {"quant": {"enabled": False}, "side": {"enabled": False}, "moe": {"enabled": False}}
METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "mp_ismoe": {"side": {"enabled": True}},  # its components (quant, moe) stay switchable for the ablations
    "lst": {"quant": {"enabled": False}, "side": {"enabled": True}, "moe": {"enabled": False}},
    **{m: _NO_SIDE for m in BACKBONE_TUNING},
}


@dataclass
class RunConfig:
    name: str = "default"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    side: SideConfig = field(default_factory=SideConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.train.method in BACKBONE_TUNING:
            _check(
                not self.side.enabled and not self.quant.enabled,
                "train.method",
                f"{self.train.method} tunes the fp backbone: side.enabled and quant.enabled must be false",
            )
        _check(self.side.enabled or not self.moe.enabled, "moe.enabled", "needs side.enabled (the experts live there)")
        _check(
            self.quant.layernorm != "full" or self.quant.enabled or self.side.enabled,
            "quant.layernorm",
            "needs a side network",
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _check(type(None) in args, key, "must not be null")
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        _check(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        _check(k in names, f"{prefix}{'.' if prefix else ''}{k}", f"unknown key (known: {sorted(names)})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{'.' if prefix else ''}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{prefix}: {e}") from e


def _apply_override(raw: dict, dotted: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r}: expected section.key=value")
    path, value = dotted.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        _check(isinstance(node, dict), path, "is not a section")
    node[keys[-1]] = yaml.safe_load(value)


SECTIONS = ("backbone", "data", "quant", "side", "moe", "train")


def _check_sections(raw: dict) -> None:
    _check(isinstance(raw, dict), "<root>", "the config must be a mapping")
    for section in SECTIONS:
        value = raw.get(section)
        _check(value is None or isinstance(value, dict), section, f"must be a mapping, got {type(value).__name__}")


def apply_preset(raw: dict, explicit: dict | None = None) -> dict:
    """Set the method's preset in `raw`; a contradicting value in `explicit` (set on purpose) is an error."""
    method = (raw.get("train") or {}).get("method", "mp_ismoe")
    _one_of(method, METHODS, "train.method")
    for section, values in METHOD_PRESETS[method].items():
        if raw.get(section) is None:
            raw[section] = {}
        node = raw[section]
        asked = (explicit or {}).get(section) or {}
        for k, v in values.items():
            if k in asked and asked[k] != v:
                raise ConfigError(f"{section}.{k}: method {method} requires {v!r}, this run sets {asked[k]!r}")
            node[k] = v
    return raw


def config_from_dict(raw: dict, explicit: dict | None = None) -> RunConfig:
    """Build a RunConfig from a plain dict (YAML or a checkpoint), applying the method's preset."""
    raw = copy.deepcopy(raw or {})
    _check_sections(raw)
    return _build(RunConfig, apply_preset(raw, explicit if explicit is not None else raw))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        _check(isinstance(raw, dict), str(p), "must hold a mapping at the top level")
    explicit: dict = {}
    for o in overrides:
        _apply_override(raw, o)
        _apply_override(explicit, o)
    _check_sections(raw)
    return config_from_dict(raw, explicit)
