"""One source of truth for tensor names, dtypes and shapes across ONNX, TensorRT, Triton and the client.

The export stage writes `onnx/io_spec.json` from `build_io_spec`; the serving stage reads it back
with `load_io_spec` and never restates a name or shape. A dimension of -1 is dynamic; the first
dimension of every model tensor is the batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

IO_SPEC_FILE = "io_spec.json"
IO_SPEC_VERSION = 1

# Triton's data_type names for the numpy dtype names used here.
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bytes": "TYPE_STRING",
}


AXES = ("batch", "sequence")  # the named dynamic axes; every other dimension is static


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, or "bytes" for Triton strings
    shape: tuple[int, ...]  # batch first; -1 = dynamic
    axes: tuple[str | None, ...] = ()  # per dim: "batch", "sequence" or None (static); as Optimum names them

    def __post_init__(self):
        if not self.axes:  # specs written before axes were named: batch first, every other -1 a sequence
            object.__setattr__(
                self,
                "axes",
                tuple(("batch" if i == 0 else "sequence") if d == -1 else None for i, d in enumerate(self.shape)),
            )
        if len(self.axes) != len(self.shape) or any((a is None) != (d != -1) for a, d in zip(self.axes, self.shape)):
            raise ValueError(f"{self.name}: axes {self.axes} must name exactly the -1 dims of {self.shape}")
        if any(a is not None and a not in AXES for a in self.axes):
            raise ValueError(f"{self.name}: axis names must be in {AXES}, got {self.axes}")

    @property
    def triton_dtype(self) -> str:
        return TRITON_DTYPES[self.dtype]


@dataclass(frozen=True)
class ModelIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class IOSpec:
    """What a served task looks like: its labels, its tokenizer limits, and its two graphs' I/O."""

    task: str
    labels: tuple[str, ...]
    text_pair: bool
    max_length: int
    hidden_size: int
    num_taps: int  # K: embeddings + each kept backbone layer
    has_token_type_ids: bool
    precision: str
    backbone: ModelIO
    adapter: ModelIO
    format_version: int = IO_SPEC_VERSION
    extra: dict = field(default_factory=dict)
    # Bounds on what the backbone accepts (None in io_spec.json files written before they existed):
    # token ids < vocab_size, token types < type_vocab_size, sequences <= max_positions tokens.
    vocab_size: int | None = None
    type_vocab_size: int | None = None
    max_positions: int | None = None
    task_type: str = "classification"  # regression: one output, served as a score
    profile: dict = field(default_factory=dict)  # {"batch": [min, opt, max], "sequence": [...]}: TensorRT's bounds

    @property
    def tokenizer_outputs(self) -> tuple[str, ...]:
        """Names the tokenizer model produces: exactly the backbone's inputs."""
        return tuple(t.name for t in self.backbone.inputs)


B, T = "batch", "sequence"


def backbone_io(hidden_size: int, num_taps: int, has_token_type_ids: bool) -> ModelIO:
    ids = ["input_ids", "attention_mask"] + (["token_type_ids"] if has_token_type_ids else [])
    return ModelIO(
        inputs=tuple(TensorSpec(n, "int64", (-1, -1), (B, T)) for n in ids),
        outputs=(
            TensorSpec("hidden_states", "float32", (-1, num_taps, -1, hidden_size), (B, None, T, None)),  # (B, K, T, D)
            TensorSpec("cls_states", "float32", (-1, num_taps - 1, hidden_size), (B, None, None)),  # (B, K-1, D)
        ),
    )


def adapter_io(hidden_size: int, num_taps: int, num_labels: int) -> ModelIO:
    return ModelIO(
        inputs=(
            TensorSpec("hidden_states", "float32", (-1, num_taps, -1, hidden_size), (B, None, T, None)),
            TensorSpec("cls_states", "float32", (-1, num_taps - 1, hidden_size), (B, None, None)),
            TensorSpec("attention_mask", "int64", (-1, -1), (B, T)),
        ),
        outputs=(TensorSpec("logits", "float32", (-1, num_labels), (B, None)),),  # (B, C); C = 1 for regression
    )


def build_io_spec(
    task: str,
    labels,
    text_pair: bool,
    max_length: int,
    hidden_size: int,
    num_taps: int,
    has_token_type_ids: bool,
    precision: str,
    *,
    vocab_size: int | None = None,
    type_vocab_size: int | None = None,
    max_positions: int | None = None,
    task_type: str = "classification",
    profile: dict | None = None,
) -> IOSpec:
    return IOSpec(
        task=task,
        labels=tuple(labels),
        text_pair=text_pair,
        max_length=max_length,
        hidden_size=hidden_size,
        num_taps=num_taps,
        has_token_type_ids=has_token_type_ids,
        precision=precision,
        backbone=backbone_io(hidden_size, num_taps, has_token_type_ids),
        adapter=adapter_io(hidden_size, num_taps, len(labels)),
        vocab_size=vocab_size,
        type_vocab_size=type_vocab_size,
        max_positions=max_positions,
        task_type=task_type,
        profile=dict(profile or {}),
    )


def save_io_spec(spec: IOSpec, directory: str | Path) -> Path:
    path = Path(directory) / IO_SPEC_FILE
    path.write_text(json.dumps(asdict(spec), indent=2))
    return path


def _model_io(d: dict) -> ModelIO:
    def tensors(items):
        return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), tuple(t.get("axes") or ())) for t in items)

    return ModelIO(inputs=tensors(d["inputs"]), outputs=tensors(d["outputs"]))


def load_io_spec(directory: str | Path) -> IOSpec:
    """Read `io_spec.json` from an export directory, refusing other format versions."""
    path = Path(directory) / IO_SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make export RUN=...` to produce the ONNX artifacts first")
    d = json.loads(path.read_text())
    if d.get("format_version") != IO_SPEC_VERSION:
        raise ValueError(
            f"{path}: format_version {d.get('format_version')} != {IO_SPEC_VERSION}; re-export with this version"
        )
    d["backbone"], d["adapter"] = _model_io(d["backbone"]), _model_io(d["adapter"])
    d["labels"] = tuple(d["labels"])
    return IOSpec(**d)
