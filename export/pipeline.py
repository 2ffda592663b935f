"""`make export`: checkpoint -> onnx/ (+ engines/), as a chain of small path-to-artifact steps.

Steps: load the verified checkpoint; export backbone (in the chosen precision) and adapter;
static TensorRT check (fails the export); Polygraphy lint; parity against PyTorch on held-out
rows at ONNX Runtime accuracy levels 1 (the gate) and 4 (reported); `polygraphy run --onnxrt`
against outputs saved from PyTorch; size against an fp32 export; TensorRT engines where it
exists. Everything lands atomically in `onnx/` with a manifest; a failed gate leaves no `onnx/`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.artifacts import atomic_directory
from training.checkpoint import CALIBRATION_FILE, HELDOUT_FILE, load_checkpoint, read_examples
from training.data import make_loader

from . import polygraphy_checks, tensorrt_build
from .io_spec import IOSpec, build_io_spec, save_io_spec
from .onnx_export import DEFAULT_OPSET, export_adapter, export_backbone, onnx_size_bytes
from .ort_session import EXACT_ACCURACY_LEVEL, FAST_ACCURACY_LEVEL
from .parity import TOLERANCES, check_parity, to_examples
from .qdq import PRECISIONS
from .trt_check import check_tensorrt_compatible

PARITY_FILE = "parity.json"


class ExportError(RuntimeError):
    """An export gate failed; the message says which and where the report is."""


@dataclass
class ExportConfig:
    precision: str = "int8-weight"
    opset: int = DEFAULT_OPSET
    parity_rows: int | None = None  # None: the whole held-out split
    threads: int | None = None
    polygraphy_batches: int = 2
    compare_fp32_size: bool = True
    calibration: str = "minmax"  # w8a8 activation calibration: minmax | percentile | entropy
    tensorrt: str = "auto"  # auto (build where tensorrt imports) | off
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    min_seq: int = 2
    opt_seq: int = 64
    max_seq: int = 128

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 19 <= self.opset <= 25:
            raise ValueError(f"opset must be in [19, 25] (fp16 scales need 19; TensorRT parses up to 25), got {self.opset}")
        if self.calibration not in ("minmax", "percentile", "entropy"):
            raise ValueError("calibration must be minmax, percentile or entropy")
        if self.tensorrt not in ("auto", "off"):
            raise ValueError("tensorrt must be auto or off")


def io_spec_for(meta: dict, precision: str) -> IOSpec:
    b = meta["backbone"]
    return build_io_spec(meta["task"], meta["labels"], meta["text_pair"], meta["max_length"], b["hidden_size"],
                         len(b["tap_layers"]) + 1, b["has_token_type_ids"], precision)


def batches(rows, labels, tokenizer, max_length, n_batches, batch_size=16, pad_to_max_length=False):
    loader = make_loader(to_examples(rows, labels), tokenizer, max_length, batch_size, shuffle=False,
                         pad_to_max_length=pad_to_max_length)
    return [b for _, b in zip(range(n_batches), loader)]


def write_backbone(model, spec: IOSpec, out: Path, cfg: ExportConfig, ckpt: Path, tokenizer, meta) -> Path:
    """backbone.onnx in cfg.precision; w8a8 goes through a float-linear export and ORT's static calibrator."""
    path = out / "backbone.onnx"
    if cfg.precision != "w8a8":
        return export_backbone(model, spec.backbone, path, cfg.precision, cfg.opset)
    from .w8a8 import quantize_w8a8

    calib = batches(read_examples(ckpt, CALIBRATION_FILE), meta["labels"], tokenizer, meta["max_length"], 16,
                    pad_to_max_length=True)  # histogram calibrators need one shape across batches
    names = [t.name for t in spec.backbone.inputs]
    feeds = [{k: b[k].numpy() for k in names} for b in calib]
    with tempfile.TemporaryDirectory() as tmp:
        float_linears = export_backbone(model, spec.backbone, Path(tmp) / "float.onnx", "w8a8", cfg.opset)
        return quantize_w8a8(float_linears, path, feeds, cfg.calibration)


def polygraphy_parity(model, spec: IOSpec, out: Path, rows, tokenizer, meta, cfg: ExportConfig) -> dict:
    """`polygraphy run --onnxrt` on both graphs against outputs saved from PyTorch."""
    tol = TOLERANCES[cfg.precision].max_abs
    results = {}
    ref = batches(rows, meta["labels"], tokenizer, meta["max_length"], cfg.polygraphy_batches)
    bb_in, bb_out, ad_in, ad_out = [], [], [], []
    for b in ref:
        feeds = {t.name: b[t.name].numpy() for t in spec.backbone.inputs}
        with torch.no_grad():
            hs, cls = model.tap(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            logits = model.adapter(hs, cls, b["attention_mask"])[0]
        bb_in.append(feeds)
        bb_out.append({"hidden_states": hs.numpy(), "cls_states": cls.numpy()})
        ad_in.append({"hidden_states": hs.numpy(), "cls_states": cls.numpy(), "attention_mask": feeds["attention_mask"]})
        ad_out.append({"logits": logits.numpy()})
    with tempfile.TemporaryDirectory() as tmp:
        for name, ins, outs, atol in (("adapter", ad_in, ad_out, 1e-4), ("backbone", bb_in, bb_out, tol and max(tol.values()))):
            if not atol:
                results[name] = {"skipped": f"{cfg.precision} is lossy by design: judged by accuracy and label agreement"}
                continue
            i_json, o_json = polygraphy_checks.save_reference_outputs(outs, ins, Path(tmp) / name)
            results[name] = polygraphy_checks.polygraphy_run_onnxrt(out / f"{name}.onnx", i_json, o_json, atol, 1e-3)
    return results


def fp32_size(model, spec: IOSpec, opset: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return onnx_size_bytes(export_backbone(model, spec.backbone, Path(tmp) / "fp32.onnx", "fp32", opset))


def build_engines(run_dir: Path, onnx_dir: Path, spec: IOSpec, cfg: ExportConfig) -> dict:
    """TensorRT engines where tensorrt imports; otherwise one line saying so."""
    if cfg.tensorrt == "off":
        return {"available": False, "built": [], "note": "disabled with --tensorrt off"}
    if not tensorrt_build.tensorrt_available():
        return {"available": False, "built": [],
                "note": "tensorrt is not installed here: no engines built (install the `gpu` extra on a GPU machine)"}
    engines = run_dir / "engines"
    engines.mkdir(exist_ok=True)
    built = []
    for name, io in (("backbone", spec.backbone), ("adapter", spec.adapter)):
        profiles = tensorrt_build.optimization_profiles(tensorrt_build.input_specs_from_io(io), cfg.min_batch,
                                                        cfg.opt_batch, cfg.max_batch, cfg.min_seq, cfg.opt_seq, cfg.max_seq)
        built.append(str(tensorrt_build.build_engine(onnx_dir / f"{name}.onnx", engines, profiles, cfg.precision,
                                                     engines / "timing.cache")))
    return {"available": True, "built": built}


def run_export(run_dir: Path, cfg: ExportConfig, log=print) -> dict:
    """Export `run_dir/checkpoint` into `run_dir/onnx`; returns the parity report."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint"
    t0 = time.perf_counter()
    model, run_cfg, meta, tokenizer = load_checkpoint(ckpt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = io_spec_for(meta, cfg.precision)
    rows = read_examples(ckpt, HELDOUT_FILE)[: cfg.parity_rows]
    report: dict = {"precision": cfg.precision, "config": asdict(cfg), "task": meta["task"]}
    with atomic_directory(run_dir / "onnx", "onnx", {"precision": cfg.precision}) as out:
        log(f"[export] {cfg.precision} backbone + adapter -> {run_dir / 'onnx'}")
        write_backbone(model, spec, out, cfg, ckpt, tokenizer, meta)
        export_adapter(model, spec.adapter, out / "adapter.onnx", cfg.opset)
        save_io_spec(spec, out)
        tokenizer.save_pretrained(out / "tokenizer")
        shutil.copy(ckpt / HELDOUT_FILE, out / HELDOUT_FILE)
        report["sizes"] = {"backbone_bytes": onnx_size_bytes(out / "backbone.onnx"),
                           "adapter_bytes": onnx_size_bytes(out / "adapter.onnx")}
        if cfg.compare_fp32_size:
            report["sizes"]["backbone_fp32_bytes"] = fp32_size(model, spec, cfg.opset)
            report["sizes"]["backbone_ratio_vs_fp32"] = report["sizes"]["backbone_bytes"] / report["sizes"]["backbone_fp32_bytes"]
        log("[export] static TensorRT check, polygraphy lint")
        report["tensorrt_check"] = {g: [asdict(f) for f in check_tensorrt_compatible(out / f"{g}.onnx")]
                                    for g in ("backbone", "adapter")}
        report["lint"] = {g: polygraphy_checks.polygraphy_lint(out / f"{g}.onnx") for g in ("backbone", "adapter")}
        for lint in report["lint"].values():  # name the files where they will live after the atomic rename
            for key in ("report", "command"):
                lint[key] = lint[key].replace(str(out), str(run_dir / "onnx"))
        log(f"[export] parity on {len(rows)} held-out rows (ONNX Runtime accuracy levels {EXACT_ACCURACY_LEVEL} and {FAST_ACCURACY_LEVEL})")
        report["parity"] = {f"accuracy_level_{lvl}": check_parity(model, tokenizer, rows, meta["labels"], meta["max_length"],
                                                                  out / "backbone.onnx", out / "adapter.onnx", cfg.precision,
                                                                  lvl, cfg.threads)
                            for lvl in (EXACT_ACCURACY_LEVEL, FAST_ACCURACY_LEVEL)}
        log("[export] polygraphy run --onnxrt against saved PyTorch outputs")
        report["polygraphy_run"] = polygraphy_parity(model, spec, out, rows, tokenizer, meta, cfg)
        report["tensorrt"] = build_engines(run_dir, out, spec, cfg)
        report["export_time_s"] = time.perf_counter() - t0
        report["passed"], report["failures"] = gate(report)
        (out / PARITY_FILE).write_text(json.dumps(report, indent=2, default=_json_default))
        if not report["passed"]:
            failed = run_dir / "onnx-failed-parity.json"
            failed.write_text(json.dumps(report, indent=2, default=_json_default))
            raise ExportError("export gates failed: " + "; ".join(report["failures"]) + f" (full report: {failed})")
    log(format_report(report))
    return report


def gate(report: dict) -> tuple[bool, list[str]]:
    """The checks that fail an export: TensorRT compatibility errors, lint errors, exact parity, polygraphy."""
    failures = []
    for g, findings in report["tensorrt_check"].items():
        failures += [f"{g}.onnx {f['node']} ({f['op']}): {f['problem']}" for f in findings if f.get("level", "error") == "error"]
    for g, lint in report["lint"].items():
        if not lint["passed"]:
            failures.append(f"{g}.onnx: polygraphy lint: {lint.get('errors')}")
    failures += [f"parity: {f}" for f in report["parity"][f"accuracy_level_{EXACT_ACCURACY_LEVEL}"]["failures"]]
    for g, r in report["polygraphy_run"].items():
        if "passed" in r and not r["passed"]:
            failures.append(f"polygraphy run --onnxrt on {g}.onnx failed: {r['log_tail'][-300:]}")
    return not failures, failures


def format_report(report: dict) -> str:
    lines = [f"{'check':<44} {'result':>14}", "-" * 59]
    for lvl, p in report["parity"].items():
        err = p["max_abs_error"].get("logits", float("nan"))
        lines.append(f"{'logits max abs error (' + lvl + ')':<44} {err:>14.3g}")
        lines.append(f"{'label agreement (' + lvl + ')':<44} {p['label_agreement']:>14.4f}")
        lines.append(f"{'accuracy pytorch / onnxruntime (' + lvl + ')':<44} {p['accuracy_pytorch']:.4f} / {p['accuracy_onnxruntime']:.4f}")
    s = report["sizes"]
    if "backbone_ratio_vs_fp32" in s:
        lines.append(f"{'backbone.onnx size vs fp32 export':<44} {s['backbone_ratio_vs_fp32']:>14.3f}")
    for g, r in report["polygraphy_run"].items():
        lines.append(f"{'polygraphy run --onnxrt ' + g:<44} {('passed' if r.get('passed') else r.get('skipped', 'FAILED'))[:14]:>14}")
    for g, f in report["tensorrt_check"].items():
        lines.append(f"{'static TensorRT check ' + g:<44} {('ok' if not f else f'{len(f)} findings'):>14}")
    lines.append(f"{'TensorRT engines':<44} {'built' if report['tensorrt']['available'] else 'not built':>14}")
    if not report["tensorrt"]["available"]:
        lines.append(f"  {report['tensorrt']['note']}")
    lines.append(f"{'overall':<44} {'PASSED' if report['passed'] else 'FAILED':>14}")
    return "\n".join(lines)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)
