"""The export report (`onnx/parity.json`): one typed definition that export writes and serving and regress read.

A report is a tree of dataclasses serialised with `dataclasses.asdict`; `ExportReport.load` reads it
back and refuses a file of another format, so no reader walks a nested dict by string paths.
The parity gate and why it has this shape: docs/METHOD.md, section 3, "The parity gate".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_FORMAT = 2
PARITY_FILE = "parity.json"


GATE_EXPLANATION = (
    "backbone_max_rel: each backbone output vs PyTorch, max |error| / max |value| over real tokens",
    "adapter_max_abs: the adapter on PyTorch's hidden states with ONNX Runtime's expert choices forced "
    "into PyTorch; fp32 rounding only",
    "tie_margin: on identical inputs a token may be routed differently only where PyTorch's k-th and "
    "(k+1)-th gate values differ by less than this (a near-tie); otherwise the router is wrong",
    "forced_route_max_abs: text -> logits with ONNX Runtime's routes forced; strict",
    "logits_quantile_max: text -> logits with native routes, that quantile of per-row max |error|; a route "
    "flip at a near-tie moves one row, so the maximum is reported, not gated",
    "min_label_agreement, max_metric_drop: the answers themselves (agreement: classification only; the metric "
    "is the task's primary one, accuracy or Pearson)",
    "None disables a check (lossy precisions); --accept LIMIT=VALUE relaxes one (accepted_overrides)",
)


class ReportError(ValueError):
    """parity.json is missing, unreadable or of another format."""


@dataclass(frozen=True)
class ParityGate:
    """The limits one precision is held to; None disables a check (lossy precisions).

    Routing is a discontinuous function of the hidden states: where two experts' gate values are
    nearly tied, fp32 rounding alone can choose the other expert. The gate therefore compares the
    adapter with ONNX Runtime's expert choices forced into PyTorch (strict: fp32 rounding), accepts
    a differing choice only at a near-tie, and judges the whole pipeline by label agreement,
    accuracy and a quantile of per-row logits errors instead of one maximum.
    """

    adapter_max_abs: float | None = 1e-4  # logits, identical inputs, ORT's routes forced in PyTorch
    tie_margin: float = 1e-4  # a route flip on identical inputs is legitimate below this log-gap of gate values (training.moe.routing_margin)
    backbone_max_rel: float | None = 1e-3  # per output: max |error| / max |reference| over real tokens
    forced_route_max_abs: float | None = 1e-3  # end to end, ORT's routes forced in PyTorch
    logits_quantile: float = 0.99
    logits_quantile_max: float | None = 1e-3  # end to end, native routes: that quantile of per-row max |error|
    min_label_agreement: float = 0.995
    max_metric_drop: float = 0.005  # the primary metric (accuracy, Pearson), absolute: 0.005 = half a point

    def with_overrides(self, overrides: dict[str, float]) -> ParityGate:
        """A copy with some limits replaced (`--accept key=value`); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown parity limit(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class TensorError:
    """One backbone output against PyTorch, over real (unpadded) tokens."""

    max_abs: float = 0.0
    max_reference: float = 0.0
    rms_rel: float = 0.0

    @property
    def max_rel(self) -> float:
        return self.max_abs / max(self.max_reference, 1e-30)


@dataclass
class RouteFlip:
    """One token whose top-k expert set differs between PyTorch and ONNX Runtime."""

    row: int
    block: int
    token: int
    pytorch_experts: list[int]
    onnx_experts: list[int]
    margin: float  # PyTorch's gap between the k-th and (k+1)-th gate value: how near the tie was


@dataclass
class RowError:
    """A held-out row with a large end-to-end logits error: what to look at when the gate fails."""

    row: int
    text: str
    logits_max_abs: float
    route_flips: int
    label_pytorch: str
    label_onnx: str


@dataclass
class AdapterParity:
    """The adapter graph on PyTorch's own hidden states (identical inputs)."""

    forced_route_max_abs: float = 0.0  # ORT's expert choices forced into PyTorch: should be fp32 rounding
    native_max_abs: float = 0.0  # each side routes itself: a route flip shows here
    route_flip_tokens: int = 0
    route_flip_rows: int = 0
    non_tie_flips: int = 0  # flips at a gap above the gate's tie_margin: a routing bug
    routes_observable: bool = True  # the graph's TopK nodes matched the MoE blocks


@dataclass
class EndToEndParity:
    """ONNX backbone + ONNX adapter against the PyTorch checkpoint, text in, logits out."""

    max_abs: float = 0.0
    quantile_abs: float = 0.0  # the gate's logits_quantile of per-row max |error|
    median_abs: float = 0.0
    forced_route_max_abs: float = 0.0
    route_flip_tokens: int = 0  # caused by the backbone's rounding (PyTorch adapter on ORT's hidden states)
    route_flip_rows: int = 0
    label_agreement: float | None = 1.0  # None for regression
    metric: str = "accuracy"  # the task's primary metric
    metric_pytorch: float = 0.0
    metric_onnxruntime: float = 0.0


@dataclass
class ParityResult:
    """Parity at one ONNX Runtime accuracy level, with the gate it was judged by."""

    accuracy_level: int
    rows: int
    gate: ParityGate
    backbone: dict[str, TensorError] = field(default_factory=dict)
    adapter: AdapterParity = field(default_factory=AdapterParity)
    end_to_end: EndToEndParity = field(default_factory=EndToEndParity)
    worst_rows: list[RowError] = field(default_factory=list)
    route_flips: list[RouteFlip] = field(default_factory=list)  # the first ones, adapter then end to end
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    runtime: str = "qdq"  # export.cpu_graph: the graph as exported (qdq) or a CPU rewrite of it (exact, int8)


@dataclass
class ExportReport:
    """Everything `make export` checked, in `onnx/parity.json` (and `onnx-failed-parity.json` on failure)."""

    precision: str
    task: str
    config: dict  # export.pipeline.ExportConfig as a dict (incl. the TensorRT optimization profile)
    accepted_overrides: dict[str, float] = field(default_factory=dict)  # gate limits the user relaxed
    sizes: dict[str, float] = field(default_factory=dict)
    tensorrt_check: dict[str, list] = field(default_factory=dict)
    lint: dict[str, dict] = field(default_factory=dict)
    parity: dict[str, ParityResult] = field(default_factory=dict)  # "accuracy_level_1", "cpu_exact", "cpu_int8"
    served_runtime: str = "exact"  # the CPU graph the server runs (export.pipeline.served_runtime)
    polygraphy_run: dict[str, dict] = field(default_factory=dict)
    tensorrt: dict = field(default_factory=dict)
    export_time_s: float = 0.0
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    gate_explanation: list[str] = field(default_factory=lambda: list(GATE_EXPLANATION))
    format: int = REPORT_FORMAT

    def gated(self, level: int = 1) -> ParityResult:
        """The parity result at `level` (1, exact, is the one the gate judges)."""
        return self.parity[f"accuracy_level_{level}"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default)

    def save(self, path: Path) -> Path:
        Path(path).write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> ExportReport:
        path = Path(path)
        if not path.is_file():
            raise ReportError(f"{path} is missing: re-run `make export`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{path} is not valid JSON ({e}); re-run `make export`") from None
        if not isinstance(raw, dict) or raw.get("format") != REPORT_FORMAT:
            raise ReportError(
                f"{path} is not a format-{REPORT_FORMAT} export report; re-run `make export` with this version"
            )
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ExportReport:
        raw = dict(raw)
        raw["parity"] = {k: _parity_from_dict(v) for k, v in raw.get("parity", {}).items()}
        return cls(**raw)


def _parity_from_dict(d: dict) -> ParityResult:
    d = dict(d)
    d["gate"] = ParityGate(**d["gate"])
    d["backbone"] = {k: TensorError(**v) for k, v in d.get("backbone", {}).items()}
    d["adapter"] = AdapterParity(**d.get("adapter", {}))
    d["end_to_end"] = EndToEndParity(**d.get("end_to_end", {}))
    d["worst_rows"] = [RowError(**r) for r in d.get("worst_rows", [])]
    d["route_flips"] = [RouteFlip(**r) for r in d.get("route_flips", [])]
    return ParityResult(**d)


def _json_default(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    return str(o)
