"""The export report as the user reads it: which checks fail the export, the printed table, and what to
do after a failed gate (the worst rows, the route flips, how to accept a stated limit)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from contracts.parity_report import ExportReport

from .ort_session import EXACT_ACCURACY_LEVEL

PARITY_ROLES = {
    f"accuracy_level_{EXACT_ACCURACY_LEVEL}": "the exported graph, TensorRT's input: gate",
    "cpu_exact": "CPU graph, int8 weights folded to float: gate",
    "cpu_int8": "CPU graph, int8 GEMMs: judged by accuracy, served if it passes",
}


def gate_failures(report: ExportReport) -> list[str]:
    """The checks that fail an export: TensorRT compatibility errors, lint errors, parity (level 1), polygraphy."""
    failures = []
    for g, findings in report.tensorrt_check.items():
        failures += [
            f"{g}.onnx {f['node']} ({f['op']}): {f['problem']}" for f in findings if f.get("level", "error") == "error"
        ]
    for g, lint in report.lint.items():
        if not lint["passed"]:
            failures.append(f"{g}.onnx: polygraphy lint: {lint.get('errors')}")
    failures += [f"parity: {f}" for f in report.gated(EXACT_ACCURACY_LEVEL).failures]
    if "cpu_exact" in report.parity:
        failures += [f"parity (CPU exact graph): {f}" for f in report.parity["cpu_exact"].failures]
    for g, r in report.polygraphy_run.items():
        if "passed" in r and not r["passed"]:
            failures.append(f"polygraphy run --onnxrt on {g}.onnx failed: {r['log_tail'][-300:]}")
    return failures


def next_steps(report: ExportReport, run_dir: Path, failed: Path) -> list[str]:
    """What to look at and what to do after a failed gate."""
    p = report.gated(EXACT_ACCURACY_LEVEL)
    lines = ["worst held-out rows (end-to-end logits error, route flips, labels PyTorch/ONNX):"]
    lines += [
        f"  row {r.row}: {r.logits_max_abs:.3g}, {r.route_flips} flip(s), {r.label_pytorch}/{r.label_onnx}: "
        f"{r.text[:80]!r}"
        for r in p.worst_rows[:5]
    ]
    if p.route_flips:
        lines.append("route flips (row, block, token, experts PyTorch -> ONNX, PyTorch log-gate gap):")
        lines += [
            f"  row {f.row} block {f.block} token {f.token}: {f.pytorch_experts} -> {f.onnx_experts}, "
            f"log-gap {f.margin:.2e}"
            for f in p.route_flips[:5]
        ]
    lines += [
        f"full report: {failed}",
        "if the differences are acceptable for your use, accept a stated limit and re-export, e.g.",
        f"  make export RUN={run_dir} ARGS='--accept logits_quantile_max=2e-3'",
        "  (limits: " + ", ".join(f"{k}={v}" for k, v in asdict(p.gate).items()) + "; the accepted values are "
        "recorded in parity.json; see docs/TROUBLESHOOTING.md, 'export parity gate')",
    ]
    return lines


def format_report(report: ExportReport) -> str:
    lines = [f"{'check':<52} {'result':>16}", "-" * 69]
    for lvl, p in report.parity.items():
        e, a = p.end_to_end, p.adapter
        lines.append(f"{lvl} ({PARITY_ROLES.get(lvl, 'reported')}{'' if p.passed else ', FAILED'})")
        for name, t in p.backbone.items():
            lines.append(f"  {'backbone ' + name + ' max rel error':<50} {t.max_rel:>16.3g}")
        lines.append(f"  {'adapter logits error, routes forced':<50} {a.forced_route_max_abs:>16.3g}")
        lines.append(
            f"  {'adapter route flips (tokens, all at near-ties?)':<50} "
            f"{f'{a.route_flip_tokens} ({a.non_tie_flips == 0})':>16}"
        )
        lines.append(f"  {'end-to-end logits error, routes forced':<50} {e.forced_route_max_abs:>16.3g}")
        lines.append(
            f"  {f'end-to-end logits error p{100 * p.gate.logits_quantile:g} / max':<50} "
            f"{f'{e.quantile_abs:.3g} / {e.max_abs:.3g}':>16}"
        )
        lines.append(
            f"  {'end-to-end route flips (tokens / rows)':<50} {f'{e.route_flip_tokens} / {e.route_flip_rows}':>16}"
        )
        if e.label_agreement is not None:
            lines.append(f"  {'label agreement':<50} {e.label_agreement:>16.4f}")
        lines.append(
            f"  {e.metric + ' pytorch / onnxruntime':<50} {f'{e.metric_pytorch:.4f} / {e.metric_onnxruntime:.4f}':>16}"
        )
    s = report.sizes
    if "backbone_ratio_vs_fp32" in s:
        lines.append(f"{'backbone.onnx size vs fp32 export':<52} {s['backbone_ratio_vs_fp32']:>16.3f}")
    for g, r in report.polygraphy_run.items():
        lines.append(
            f"{'polygraphy run --onnxrt ' + g:<52} {('passed' if r.get('passed') else r.get('skipped', 'FAILED'))[:16]:>16}"
        )
    for g, f in report.tensorrt_check.items():
        lines.append(f"{'static TensorRT check ' + g:<52} {('ok' if not f else f'{len(f)} findings'):>16}")
    lines.append(f"{'TensorRT engines':<52} {'built' if report.tensorrt.get('available') else 'not built':>16}")
    if not report.tensorrt.get("available"):
        lines.append(f"  {report.tensorrt.get('note', '')}")
    if report.accepted_overrides:
        lines.append(f"accepted limits (--accept): {report.accepted_overrides}")
    lines.append(f"{'served on CPU by ONNX Runtime (export.cpu_graph)':<52} {report.served_runtime:>16}")
    lines.append(f"{'overall':<52} {'PASSED' if report.passed else 'FAILED':>16}")
    return "\n".join(lines)
