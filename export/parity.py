"""Parity of the exported graphs with the PyTorch checkpoint on held-out rows, sound where routing is not continuous.

Top-k routing is a step function of the hidden states: where two experts' gate values are nearly
tied, fp32 rounding alone picks the other expert, and the logits jump. A max-abs logits gate over
a thousand rows therefore fails whenever one near-tie exists, although nothing is wrong. The
checks (limits in `contracts.parity_report.ParityGate`, per precision in `GATES`):

1. backbone: each output against PyTorch relative to its own magnitude, over real tokens;
2. adapter on identical inputs (PyTorch's hidden states), with ONNX Runtime's expert choices
   forced into PyTorch: fp32 rounding only. A token routed differently must be a near-tie
   (PyTorch's log-gap between the k-th and (k+1)-th gate value below `tie_margin`), else the graph routes wrongly;
3. end to end (text -> logits): with ORT's routes forced, strict; with each side routing
   itself, judged by label agreement, accuracy and a quantile of per-row errors. Route flips
   and the worst rows are reported so a failed gate says where to look.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from contracts.parity_report import (
    AdapterParity,
    EndToEndParity,
    ParityGate,
    ParityResult,
    RouteFlip,
    RowError,
    TensorError,
)
from training.data import Example, make_loader
from training.metrics import PRIMARY, predictions, task_metrics
from training.moe import MoEBlock, forced_routes, routing_margin

from .ort_session import make_session
from .routes import expose_routes

_LOSSY = dict(backbone_max_rel=None, forced_route_max_abs=None, logits_quantile_max=None)
GATES = {
    "int8-weight": ParityGate(),
    "fp32": ParityGate(),
    "fp16": ParityGate(**{**_LOSSY, "logits_quantile_max": 5e-2}, min_label_agreement=0.98, max_metric_drop=0.01),
    # w8a8 is judged by accuracy (within one point). Int8 activations flip ~5% of the labels that sit
    # near the decision boundary without moving accuracy; 0.93 agreement catches a broken graph
    # (quantized MatMul outputs gave 0.87), not ordinary int8 noise.
    "w8a8": ParityGate(**_LOSSY, min_label_agreement=0.93, max_metric_drop=0.01),
    "int4-weight": ParityGate(**_LOSSY, min_label_agreement=0.90, max_metric_drop=0.03),
}
MAX_FLIPS_LISTED, WORST_ROWS = 20, 10


def runtime_gate(precision: str, runtime: str) -> ParityGate:
    """The gate a graph is judged by as `runtime` runs it: the CPU `int8` rewrite of an int8-weight graph
    quantizes activations, so it is judged by accuracy like w8a8; every other graph by its precision's gate."""
    return GATES["w8a8"] if runtime == "int8" and precision == "int8-weight" else GATES[precision]


def to_examples(rows: list[dict], labels: list[str]) -> list[Example]:
    """Held-out rows as Examples: a label name becomes its index; a regression score stays a float."""
    index = {label: i for i, label in enumerate(labels)}
    return [
        Example(
            r["text"],
            r.get("text_pair"),
            float(r["label"]) if isinstance(r["label"], (int, float)) else index[r["label"]],
        )
        for r in rows
    ]


def moe_blocks(model) -> list[MoEBlock]:
    adapter = model.adapter
    return [b.ffn for b in adapter.blocks if isinstance(b.ffn, MoEBlock)] if adapter.side_enabled else []


def route_flips(
    reference: list[torch.Tensor], other: list[np.ndarray], gates: list[torch.Tensor], mask: np.ndarray, row_offset: int
) -> list[RouteFlip]:
    """Real tokens whose expert set differs; reference/other (B, T, k) per block, gates (B, T, N)."""
    flips = []
    for b, (ref, oth, g) in enumerate(zip(reference, other, gates)):
        r, o = np.sort(ref.numpy(), -1), np.sort(oth, -1)  # (B, T, k)
        differ = (r != o).any(-1) & (mask > 0)  # (B, T)
        if differ.any():
            margin = routing_margin(g, r.shape[-1]).numpy()  # (B, T)
            flips += [
                RouteFlip(row_offset + int(i), b, int(t), r[i, t].tolist(), o[i, t].tolist(), float(margin[i, t]))
                for i, t in zip(*np.nonzero(differ))
            ]
    return flips


class _Tally:
    """Running figures over batches."""

    def __init__(self):
        self.backbone: dict[str, TensorError] = {}
        self._sq: dict[str, list[float]] = {}
        self.adapter, self.e2e = AdapterParity(), EndToEndParity()
        self.adapter_flips: list[RouteFlip] = []
        self.e2e_flips: list[RouteFlip] = []
        self.row_err, self.pred_t, self.pred_o, self.y = [], [], [], []

    def add_backbone(self, name: str, ref: np.ndarray, out: np.ndarray, real: np.ndarray) -> None:
        """ref/out (B, ..., T, D) or (B, K-1, D); `real` selects the compared entries (broadcast)."""
        err = np.abs(ref - out) * real
        t = self.backbone.setdefault(name, TensorError())
        t.max_abs = max(t.max_abs, float(err.max(initial=0.0)))
        t.max_reference = max(t.max_reference, float((np.abs(ref) * real).max(initial=0.0)))
        sq = self._sq.setdefault(name, [0.0, 0.0])
        sq[0] += float((err.astype(np.float64) ** 2).sum())
        sq[1] += float(((ref * real).astype(np.float64) ** 2).sum())
        t.rms_rel = (sq[0] / max(sq[1], 1e-30)) ** 0.5


def _run_adapter(session, route_names, hs, cls, mask):
    out = session.run(["logits", *route_names], {"hidden_states": hs, "cls_states": cls, "attention_mask": mask})
    return out[0], out[1:]


def _compare_batch(model, blocks, backbone, adapter, route_names, feeds, labels, offset, tally) -> None:
    mask = feeds["attention_mask"]  # (B, T)
    hs_o, cls_o = backbone.run(None, feeds)
    t_mask = torch.from_numpy(mask)
    with torch.no_grad():
        hs_t, cls_t = model.tap(
            torch.from_numpy(feeds["input_ids"]),
            t_mask,
            None if "token_type_ids" not in feeds else torch.from_numpy(feeds["token_type_ids"]),
        )
        logits_t, aux = model.adapter(hs_t, cls_t, t_mask)
        idx_t = [a["indices"] for a in aux if "indices" in a]
        gates_t = [a["gates"] for a in aux if "gates" in a]
        tally.add_backbone("hidden_states", hs_t.numpy(), hs_o, mask[:, None, :, None].astype(np.float32))
        tally.add_backbone("cls_states", cls_t.numpy(), cls_o, np.float32(1.0))
        observable = len(route_names) == len(blocks) > 0
        # identical inputs: the adapter graph alone
        logits_a, routes_a = _run_adapter(adapter, route_names, hs_t.numpy(), cls_t.numpy(), mask)
        logits_af = _forced(model, blocks, routes_a, hs_t, cls_t, t_mask) if observable else logits_t.numpy()
        a = tally.adapter
        a.forced_route_max_abs = max(a.forced_route_max_abs, float(np.abs(logits_a - logits_af).max()))
        a.native_max_abs = max(a.native_max_abs, float(np.abs(logits_a - logits_t.numpy()).max()))
        a.routes_observable = observable
        # end to end: both ONNX graphs
        logits_e, routes_e = _run_adapter(adapter, route_names, hs_o, cls_o, mask)
        logits_ef = _forced(model, blocks, routes_e, hs_t, cls_t, t_mask) if observable else logits_t.numpy()
    if observable:
        tally.adapter_flips += route_flips(idx_t, routes_a, gates_t, mask, offset)
        tally.e2e_flips += route_flips(idx_t, routes_e, gates_t, mask, offset)
    tally.e2e.forced_route_max_abs = max(tally.e2e.forced_route_max_abs, float(np.abs(logits_e - logits_ef).max()))
    tally.row_err.append(np.abs(logits_e - logits_t.numpy()).max(-1))  # (B,)
    tally.pred_t.append(logits_t.numpy())  # (B, C); labels or scores are read off in _result
    tally.pred_o.append(logits_e)
    tally.y.append(labels)


def _forced(model, blocks, routes: list[np.ndarray], hs, cls, mask) -> np.ndarray:
    with forced_routes(blocks, [torch.from_numpy(r) for r in routes]):
        return model.adapter(hs, cls, mask)[0].numpy()


def _judge(result: ParityResult) -> list[str]:
    """The gate's failures, each a sentence saying which check and by how much."""
    g, a, e, fails = result.gate, result.adapter, result.end_to_end, []
    if g.backbone_max_rel is not None:
        fails += [
            f"backbone {n}: max abs error {t.max_abs:.3g} is {t.max_rel:.3g} of its largest value "
            f"{t.max_reference:.3g} > {g.backbone_max_rel:g}"
            for n, t in result.backbone.items()
            if t.max_rel > g.backbone_max_rel
        ]
    adapter_err = a.forced_route_max_abs if a.routes_observable else a.native_max_abs
    if g.adapter_max_abs is not None and adapter_err > g.adapter_max_abs:
        how = "with ONNX Runtime's expert choices forced" if a.routes_observable else "(routes not observable)"
        fails.append(
            f"adapter on identical inputs {how}: logits max abs error {adapter_err:.3g} > {g.adapter_max_abs:g}"
        )
    if a.non_tie_flips:
        fails.append(
            f"adapter routes {a.non_tie_flips} token(s) to other experts where PyTorch's log-gate gap is above "
            f"tie_margin {g.tie_margin:g}: the exported router is wrong"
        )
    if g.forced_route_max_abs is not None and e.forced_route_max_abs > g.forced_route_max_abs:
        fails.append(
            f"end to end with ONNX Runtime's routes forced: logits max abs error "
            f"{e.forced_route_max_abs:.3g} > {g.forced_route_max_abs:g}"
        )
    if g.logits_quantile_max is not None and e.quantile_abs > g.logits_quantile_max:
        fails.append(
            f"end to end: {g.logits_quantile:g} quantile of per-row logits error {e.quantile_abs:.3g} > "
            f"{g.logits_quantile_max:g}"
        )
    if e.label_agreement is not None and e.label_agreement < g.min_label_agreement:
        fails.append(f"label agreement {e.label_agreement:.4f} < {g.min_label_agreement}")
    if e.metric_pytorch - e.metric_onnxruntime > g.max_metric_drop:
        fails.append(f"{e.metric} drop {e.metric_pytorch - e.metric_onnxruntime:.4f} > {g.max_metric_drop}")
    return fails


def _result(
    tally: _Tally, gate: ParityGate, level: int, texts: list[str], labels: list[str], task_type: str
) -> ParityResult:
    err = np.concatenate(tally.row_err)  # (N,)
    lt, lo, y = (np.concatenate(v) for v in (tally.pred_t, tally.pred_o, tally.y))  # (N, C), (N, C), (N,)
    pt, po = (np.asarray(predictions(torch.from_numpy(x), task_type)) for x in (lt, lo))
    e = tally.e2e
    e.max_abs, e.median_abs = float(err.max()), float(np.median(err))
    e.quantile_abs = float(np.quantile(err, gate.logits_quantile))
    e.metric = PRIMARY[task_type]
    e.metric_pytorch = task_metrics(pt.tolist(), y.tolist(), task_type, len(labels))[e.metric]
    e.metric_onnxruntime = task_metrics(po.tolist(), y.tolist(), task_type, len(labels))[e.metric]
    e.label_agreement = float((pt == po).mean()) if task_type == "classification" else None
    e.route_flip_tokens, e.route_flip_rows = len(tally.e2e_flips), len({f.row for f in tally.e2e_flips})
    a = tally.adapter
    a.route_flip_tokens, a.route_flip_rows = len(tally.adapter_flips), len({f.row for f in tally.adapter_flips})
    a.non_tie_flips = sum(f.margin > gate.tie_margin for f in tally.adapter_flips)
    flips_per_row: dict[int, int] = {}
    for f in tally.e2e_flips:
        flips_per_row[f.row] = flips_per_row.get(f.row, 0) + 1
    name = (lambda v: labels[int(v)]) if task_type == "classification" else (lambda v: f"{float(v):.4g}")
    worst = [
        RowError(int(i), texts[i][:200], float(err[i]), flips_per_row.get(int(i), 0), name(pt[i]), name(po[i]))
        for i in np.argsort(-err)[:WORST_ROWS]
    ]
    listed = sorted(tally.adapter_flips, key=lambda f: -f.margin)[: MAX_FLIPS_LISTED // 2]
    listed += tally.e2e_flips[: MAX_FLIPS_LISTED - len(listed)]
    result = ParityResult(level, len(err), gate, tally.backbone, a, e, worst, listed)
    result.failures = _judge(result)
    result.passed = not result.failures
    return result


def check_parity(
    model,
    tokenizer,
    rows: list[dict],
    labels: list[str],
    max_length: int,
    backbone_path,
    adapter_path,
    precision: str,
    accuracy_level: int = 1,
    threads: int | None = None,
    batch_size: int = 64,
    gate: ParityGate | None = None,
    task_type: str = "classification",
    runtime: str = "qdq",
) -> ParityResult:
    """Run the checkpoint and the two ONNX graphs (as `runtime` runs them) on `rows`; return the judged result."""
    gate = gate or GATES[precision]
    model.eval()
    blocks = moe_blocks(model)
    backbone = make_session(backbone_path, threads, accuracy_level, runtime=runtime)
    inputs = [i.name for i in backbone.get_inputs()]
    tally = _Tally()
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        route_names = expose_routes(Path(adapter_path), Path(tmp) / "adapter_routes.onnx")
        adapter = make_session(Path(tmp) / "adapter_routes.onnx", threads, accuracy_level, runtime=runtime)
        loader = make_loader(to_examples(rows, labels), tokenizer, max_length, batch_size, shuffle=False)
        offset = 0
        for batch in loader:
            feeds = {k: batch[k].numpy() for k in inputs}
            _compare_batch(model, blocks, backbone, adapter, route_names, feeds, batch["labels"].numpy(), offset, tally)
            offset += len(batch["labels"])
    result = _result(tally, gate, accuracy_level, [r["text"] for r in rows], labels, task_type)
    result.runtime = runtime
    return result
