"""The regression rules: which metric is compared how, with which tolerance, and the printed table.

Tolerances: built-in defaults (per precision where None: the export gate of that precision,
contracts.parity_report / export.parity.GATES) < the baseline's "tolerances" < --tolerances.
  accuracy.*   drop vs baseline <= `accuracy` (absolute, 0.005 = 0.5 point); pearson.* (regression) alike
  agreement.*  label agreement with the PyTorch checkpoint >= `agreement`, `agreement_level4` for ORT level 4
  parity.*     `parity` bounds the 0.99 quantile of per-row logits errors vs PyTorch (a route flip at a
               near-tie moves one row, not the quantile), `forced_parity` the export's error with ONNX
               Runtime's expert choices forced, `served_parity` served vs in-process probabilities
  size.*       growth vs baseline <= `size` (0.05 = 5%)
  latency.*    ratio <= baseline ratio * (1 + `latency`)
  data.*       held-out rows equal to the baseline's (otherwise accuracies are not comparable)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TOLERANCES: dict[str, float | None] = {
    "accuracy": 0.005,
    "agreement": None,
    "agreement_level4": 0.98,
    "parity": None,
    "forced_parity": None,
    "served_parity": 1e-4,
    "latency": 0.25,
    "size": 0.05,
}


@dataclass(frozen=True)
class Rule:
    kind: str  # drop | min | max | ratio | growth | equal
    tolerance: str | None = None


RULES = {
    "accuracy.checkpoint": Rule("drop", "accuracy"),  # metrics.json, written by `make train`
    "accuracy.pytorch": Rule("drop", "accuracy"),  # the checkpoint re-evaluated here
    "accuracy.onnxruntime": Rule("drop", "accuracy"),  # exported graphs, ORT accuracy level 1
    "accuracy.onnxruntime_level4": Rule("drop", "accuracy"),
    "accuracy.served": Rule("drop", "accuracy"),
    **{
        f"pearson.{k}": Rule("drop", "accuracy")
        for k in (  # regression tasks: the same rule on Pearson's r
            "checkpoint",
            "pytorch",
            "onnxruntime",
            "onnxruntime_level4",
            "served",
        )
    },
    "agreement.onnxruntime": Rule("min", "agreement"),
    "agreement.onnxruntime_level4": Rule("min", "agreement_level4"),
    "agreement.served": Rule("min", "agreement"),
    "agreement.export": Rule("min", "agreement"),  # parity.json, written by `make export`
    "parity.logits_p99_abs": Rule("max", "parity"),
    "parity.export_forced_route_max_abs": Rule("max", "forced_parity"),
    "parity.served_probabilities_max_abs": Rule("max", "served_parity"),
    "size.backbone_bytes": Rule("growth", "size"),
    "size.adapter_bytes": Rule("growth", "size"),
    "latency.ort_over_pytorch_p50": Rule("ratio", "latency"),
    "latency.served_over_inprocess_p50": Rule("ratio", "latency"),
    "data.heldout_rows": Rule("equal"),
}
ABSOLUTE = ("min", "max")  # checked against a fixed limit, with or without a baseline


@dataclass
class Row:
    metric: str
    baseline: float | None
    current: float | None
    limit: float | None
    status: str  # PASS | FAIL | NEW | NOT RUN | INFO
    tolerance: float | None = None


def resolve_tolerances(
    precision: str, stored: dict | None, cli: dict | None, runtime: str = "exact"
) -> dict[str, float | None]:
    """Defaults (per precision and served CPU runtime where None) < the baseline's tolerances < command line."""
    from export.parity import GATES, runtime_gate

    gate = runtime_gate(precision, runtime) if precision in GATES else GATES["int8-weight"]
    tol = dict(DEFAULT_TOLERANCES)
    tol["agreement"] = gate.min_label_agreement
    # level 4 adds int8 activations to weight-only graphs; it cannot be held closer than level 1
    tol["agreement_level4"] = min(tol["agreement_level4"], gate.min_label_agreement)
    tol["parity"] = gate.logits_quantile_max
    tol["forced_parity"] = gate.forced_route_max_abs
    tol.update(stored or {})
    tol.update(cli or {})
    return tol


def check(metric: str, baseline: float | None, current: float | None, tol: dict) -> Row:
    """One metric against its rule; NEW / NOT RUN when one side is missing."""
    rule = RULES.get(metric, Rule("info"))
    t = tol.get(rule.tolerance) if rule.tolerance else None
    if current is None:
        return Row(metric, baseline, None, None, "NOT RUN", t)
    if rule.kind in ABSOLUTE:
        if t is None:
            return Row(metric, baseline, current, None, "INFO")
        ok = current >= t if rule.kind == "min" else current <= t
        return Row(metric, baseline, current, t, "PASS" if ok else "FAIL", t)
    if baseline is None or rule.kind == "info":
        return Row(metric, baseline, current, None, "NEW" if baseline is None else "INFO", t)
    limit = {
        "drop": lambda: baseline - t,
        "ratio": lambda: baseline * (1 + t),
        "growth": lambda: baseline * (1 + t),
        "equal": lambda: baseline,
    }[rule.kind]()
    eps = 1e-9 * max(1.0, abs(limit))  # float noise in a JSON round trip must not fail a check
    ok = {
        "drop": current >= limit - eps,
        "ratio": current <= limit + eps,
        "growth": current <= limit + eps,
        "equal": abs(current - limit) <= eps,
    }[rule.kind]
    return Row(metric, baseline, current, limit, "PASS" if ok else "FAIL", t)


def compare(baseline: dict[str, float], current: dict[str, float], tol: dict) -> list[Row]:
    names = list(RULES) + sorted((set(baseline) | set(current)) - set(RULES))
    return [check(n, baseline.get(n), current.get(n), tol) for n in names if n in baseline or n in current]


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    kind = metric.split(".", 1)[0]
    if kind == "size" or kind == "data":
        return f"{int(round(v)):,}"
    if kind == "parity":
        return f"{v:.3g}"
    return f"{v:.3f}" if kind == "latency" else f"{v:.4f}"


def _delta(r: Row) -> str:
    if r.baseline is None or r.current is None:
        return "-"
    kind = r.metric.split(".", 1)[0]
    if kind in ("size", "latency") and r.baseline:
        return f"{100 * (r.current / r.baseline - 1):+.1f}%"
    if kind in ("accuracy", "agreement", "pearson"):
        return f"{100 * (r.current - r.baseline):+.2f} pt"
    return f"{r.current - r.baseline:+.3g}"


def _limit(r: Row) -> str:
    kind = RULES.get(r.metric, Rule("info")).kind
    if r.status == "NOT RUN":
        served, timed = "served" in r.metric, r.metric.startswith("latency.")
        return {
            (True, True): "needs --serve --latency",
            (True, False): "needs --serve",
            (False, True): "needs --latency",
        }.get((served, timed), "not measured")
    if r.limit is None:
        return "-"
    text = {
        "drop": f">= {_fmt(r.metric, r.limit)} (-{100 * (r.tolerance or 0):.2f} pt)",
        "min": f">= {_fmt(r.metric, r.limit)}",
        "max": f"<= {_fmt(r.metric, r.limit)}",
        "ratio": f"<= {_fmt(r.metric, r.limit)} (+{100 * (r.tolerance or 0):.0f}%)",
        "growth": f"<= {_fmt(r.metric, r.limit)} (+{100 * (r.tolerance or 0):.0f}%)",
        "equal": f"== {_fmt(r.metric, r.limit)}",
    }
    return text[kind]


def format_table(rows: list[Row]) -> str:
    head = f"{'metric':<38} {'baseline':>12} {'current':>12} {'delta':>10}  {'limit':<26} result"
    lines = [head, "-" * len(head)]
    lines += [
        f"{r.metric:<38} {_fmt(r.metric, r.baseline):>12} {_fmt(r.metric, r.current):>12} {_delta(r):>10}  "
        f"{_limit(r):<26} {r.status}"
        for r in rows
    ]
    failed = [r.metric for r in rows if r.status == "FAIL"]
    checked = sum(r.status in ("PASS", "FAIL") for r in rows)
    lines.append(
        f"{len(failed)} of {checked} checks FAILED: {', '.join(failed)}" if failed else f"all {checked} checks passed"
    )
    return "\n".join(lines)
