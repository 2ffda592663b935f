"""`make export`: checkpoint -> onnx/ (+ engines/), as a chain of small path-to-artifact steps.

Steps: load the verified checkpoint; export backbone (in the chosen precision) and adapter;
static TensorRT check (fails the export); Polygraphy lint; parity against PyTorch on held-out
rows of the exported graph and of the CPU graphs ONNX Runtime serves from it (`parity_runs`:
int8 is served where its accuracy gate passed, else exact); `polygraphy run --onnxrt`
against outputs saved from PyTorch; size against an fp32 export; TensorRT engines where it
exists. Everything lands atomically in `onnx/` with a manifest; a failed gate leaves no `onnx/`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from contracts.artifacts import atomic_directory
from contracts.parity_report import PARITY_FILE, ExportReport
from training.backbone import usable_positions
from training.checkpoint import CALIBRATION_FILE, HELDOUT_FILE, load_checkpoint, read_examples
from training.data import make_loader
from training.moe import routing_margin

from . import polygraphy_checks, tensorrt_build
from .io_spec import IOSpec, build_io_spec, save_io_spec
from .onnx_export import DEFAULT_OPSET, export_adapter, export_backbone, onnx_size_bytes
from .ort_session import EXACT_ACCURACY_LEVEL
from .parity import GATES, check_parity, runtime_gate, to_examples
from .qdq import PRECISIONS
from .report import format_report, gate_failures, next_steps
from .trt_check import check_tensorrt_compatible


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
    accept: dict[str, float] = field(default_factory=dict)  # parity limits the user relaxed (--accept key=value)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 19 <= self.opset <= 25:
            raise ValueError(
                f"opset must be in [19, 25] (fp16 scales need 19; TensorRT parses up to 25), got {self.opset}"
            )
        if self.calibration not in ("minmax", "percentile", "entropy"):
            raise ValueError("calibration must be minmax, percentile or entropy")
        if self.tensorrt not in ("auto", "off"):
            raise ValueError("tensorrt must be auto or off")
        GATES[self.precision].with_overrides(self.accept)  # unknown limit names are an error now, not after export


def io_spec_for(meta: dict, precision: str, encoder=None, cfg: ExportConfig | None = None) -> IOSpec:
    """The I/O spec of a checkpoint: names, named axes, input bounds (from the encoder) and the TensorRT
    optimization profile (from the export config), the one source every later stage reads."""
    b, bounds = meta["backbone"], {}
    if encoder is not None:
        c = encoder.config
        bounds = {
            "vocab_size": c.vocab_size,
            "type_vocab_size": getattr(c, "type_vocab_size", None) if b["has_token_type_ids"] else None,
            "max_positions": usable_positions(encoder),
        }
    profile = (
        {"batch": [cfg.min_batch, cfg.opt_batch, cfg.max_batch], "sequence": [cfg.min_seq, cfg.opt_seq, cfg.max_seq]}
        if cfg is not None
        else None
    )
    return build_io_spec(
        meta["task"],
        meta["labels"],
        meta["text_pair"],
        meta["max_length"],
        b["hidden_size"],
        len(b["tap_layers"]) + 1,
        b["has_token_type_ids"],
        precision,
        **bounds,
        task_type=meta.get("task_type", "classification"),
        profile=profile,
    )


def served_runtime(parity: dict) -> str:
    """int8 where its accuracy gate passed, else exact: the int8 graph with calibrated activations is the
    fastest on CPU (docs/export_bench.md), and exact is the fallback equal to the checkpoint."""
    return "int8" if parity["cpu_int8"].passed else "exact"


def parity_runs(cfg: ExportConfig, gate) -> list[tuple[str, str, object]]:
    """(report key, runtime, gate) for each graph parity judges: the exported file (TensorRT's input, `qdq`)
    and the two CPU rewrites ONNX Runtime may serve (`export.cpu_graph`). `exact` must pass the
    precision's gate; `int8` quantizes the activations of an int8-weight graph, so there it is judged
    by accuracy like w8a8 (`export.parity.runtime_gate`) and served only where it passed."""
    int8_gate = runtime_gate(cfg.precision, "int8").with_overrides(cfg.accept)
    return [
        (f"accuracy_level_{EXACT_ACCURACY_LEVEL}", "qdq", gate),
        ("cpu_exact", "exact", gate),
        ("cpu_int8", "int8", int8_gate),
    ]


def batches(rows, labels, tokenizer, max_length, n_batches, batch_size=16, pad_to_max_length=False):
    loader = make_loader(
        to_examples(rows, labels), tokenizer, max_length, batch_size, shuffle=False, pad_to_max_length=pad_to_max_length
    )
    return [b for _, b in zip(range(n_batches), loader)]


def calibration_feeds(spec: IOSpec, ckpt: Path, tokenizer, meta) -> list[dict]:
    """16 batches of 16 training rows (checkpoint/calibration.jsonl), padded to max_length."""
    calib = batches(
        read_examples(ckpt, CALIBRATION_FILE), meta["labels"], tokenizer, meta["max_length"], 16, pad_to_max_length=True
    )  # histogram calibrators need one shape across batches
    names = [t.name for t in spec.backbone.inputs]
    return [{k: b[k].numpy() for k in names} for b in calib]


def write_backbone(model, spec: IOSpec, out: Path, cfg: ExportConfig, ckpt: Path, tokenizer, meta) -> Path:
    """backbone.onnx in cfg.precision; w8a8 goes through a float-linear export and ORT's static calibrator.

    int8-weight graphs also get the activation ranges of their linears (`export.int8_ranges`, in the
    model metadata) so the CPU `int8` graph quantizes with fixed ranges.
    """
    path = out / "backbone.onnx"
    if cfg.precision != "w8a8":
        export_backbone(model, spec.backbone, path, cfg.precision, cfg.opset)
        if cfg.precision == "int8-weight" and (ckpt / CALIBRATION_FILE).is_file():
            from .int8_ranges import calibrate, store

            store(path, calibrate(path, calibration_feeds(spec, ckpt, tokenizer, meta), cfg.threads))
        return path
    from .w8a8 import quantize_w8a8

    feeds = calibration_feeds(spec, ckpt, tokenizer, meta)
    with tempfile.TemporaryDirectory() as tmp:
        float_linears = export_backbone(model, spec.backbone, Path(tmp) / "float.onnx", "w8a8", cfg.opset)
        return quantize_w8a8(float_linears, path, feeds, cfg.calibration)


def reference_batches(model, spec: IOSpec, rows, tokenizer, meta, cfg: ExportConfig, min_margin: float = 1e-4):
    """Batches for `polygraphy run` whose every real token is clear of a routing near-tie (PyTorch log-gate gap).

    Polygraphy compares element-wise at a fixed tolerance, so a row where rounding may pick another
    expert does not belong in its reference set; routing at ties is judged by the parity gate.
    `min_margin` (a log-gap, training.moe.routing_margin) is 100x what fp32 rounding moves the
    adapter's router logits by (~1e-6).
    """
    clear = []
    for b in batches(rows, meta["labels"], tokenizer, meta["max_length"], len(rows) // 16 + 1):
        with torch.no_grad():
            hs, cls = model.tap(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            _, aux = model.adapter(hs, cls, b["attention_mask"])
        ok = torch.ones(len(b["labels"]), dtype=torch.bool)
        for a in aux:
            if "gates" in a:
                margin = routing_margin(a["gates"], a["indices"].shape[-1])  # (B, T)
                ok &= ((margin >= min_margin) | (b["attention_mask"] == 0)).all(-1)
        clear += [{k: v[i : i + 1] for k, v in b.items()} for i in torch.nonzero(ok).flatten().tolist()]
        if len(clear) >= 16 * cfg.polygraphy_batches:
            break
    pad = len(clear) and max(int(c["attention_mask"].shape[1]) for c in clear)
    return [_stack(clear[i : i + 16], pad) for i in range(0, min(len(clear), 16 * cfg.polygraphy_batches), 16)]


def _stack(rows: list[dict], length: int) -> dict:
    """Single-row batches of varied lengths -> one batch padded to `length` (pad id 0, mask 0)."""

    def pad(t):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]))

    return {k: torch.cat([pad(r[k]) if r[k].dim() == 2 else r[k] for r in rows]) for k in rows[0]}


def polygraphy_parity(model, spec: IOSpec, out: Path, rows, tokenizer, meta, cfg: ExportConfig) -> dict:
    """`polygraphy run --onnxrt` on both graphs against outputs saved from PyTorch (tie-free rows)."""
    lossy = GATES[cfg.precision].backbone_max_rel is None
    results = {}
    bb_in, bb_out, ad_in, ad_out = [], [], [], []
    for b in reference_batches(model, spec, rows, tokenizer, meta, cfg):
        feeds = {t.name: b[t.name].numpy() for t in spec.backbone.inputs}
        with torch.no_grad():
            hs, cls = model.tap(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            logits = model.adapter(hs, cls, b["attention_mask"])[0]
        bb_in.append(feeds)
        bb_out.append({"hidden_states": hs.numpy(), "cls_states": cls.numpy()})
        ad_in.append(
            {"hidden_states": hs.numpy(), "cls_states": cls.numpy(), "attention_mask": feeds["attention_mask"]}
        )
        ad_out.append({"logits": logits.numpy()})
    if not ad_in:
        return {g: {"skipped": "no held-out row is clear of routing near-ties"} for g in ("adapter", "backbone")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ins, outs, atol in (
            ("adapter", ad_in, ad_out, 1e-4),
            ("backbone", bb_in, bb_out, None if lossy else 1e-2),
        ):
            if not atol:
                results[name] = {
                    "skipped": f"{cfg.precision} is lossy by design: judged by accuracy and label agreement"
                }
                continue
            i_json, o_json = polygraphy_checks.save_reference_outputs(outs, ins, Path(tmp) / name)
            results[name] = polygraphy_checks.polygraphy_run_onnxrt(out / f"{name}.onnx", i_json, o_json, atol, 1e-3)
            results[name]["rows"] = sum(len(i["attention_mask"]) for i in ins)
    return results


def fp32_size(model, spec: IOSpec, opset: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return onnx_size_bytes(export_backbone(model, spec.backbone, Path(tmp) / "fp32.onnx", "fp32", opset))


@contextlib.contextmanager
def staged_engines(run_dir: Path):
    """A temporary engines directory, published as run_dir/engines only when the block succeeds (the gate passed).

    Engines of an earlier export do not match the graphs just published: when this export builds none
    (no TensorRT here), an existing run_dir/engines is moved aside to engines.stale-<time>, not deleted,
    so that serving never picks them up."""
    final = run_dir / "engines"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-engines-", dir=run_dir))
    try:
        if (final / "timing.cache").is_file():
            shutil.copy2(final / "timing.cache", tmp)  # TensorRT reuses its kernel timings
        yield tmp
        if any(tmp.glob("*.plan")):
            old = run_dir / f".old-engines-{os.getpid()}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        elif any(final.glob("*.plan")):
            os.replace(final, run_dir / f"engines.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_engines(engines: Path, onnx_dir: Path, spec: IOSpec, cfg: ExportConfig) -> dict:
    """TensorRT engines into `engines` (staged_engines) where tensorrt imports; otherwise one line saying so."""
    if cfg.tensorrt == "off":
        return {"available": False, "built": [], "note": "disabled with --tensorrt off"}
    if not tensorrt_build.tensorrt_available():
        return {
            "available": False,
            "built": [],
            "note": "tensorrt is not installed here: no engines built (install the `gpu` extra on a GPU machine)",
        }
    built = []
    for name, io in (("backbone", spec.backbone), ("adapter", spec.adapter)):
        profiles = tensorrt_build.optimization_profiles(io, spec.profile)
        built.append(
            str(
                tensorrt_build.build_engine(
                    onnx_dir / f"{name}.onnx", engines, profiles, cfg.precision, engines / "timing.cache"
                )
            )
        )
    return {"available": True, "built": built}


def run_export(run_dir: Path, cfg: ExportConfig, log=print) -> ExportReport:
    """Export `run_dir/checkpoint` into `run_dir/onnx`; returns the report (also `onnx/parity.json`)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint"
    t0 = time.perf_counter()
    model, run_cfg, meta, tokenizer = load_checkpoint(ckpt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = io_spec_for(meta, cfg.precision, model.tap.encoder, cfg)
    rows = read_examples(ckpt, HELDOUT_FILE)[: cfg.parity_rows]
    gate = GATES[cfg.precision].with_overrides(cfg.accept)
    report = ExportReport(
        precision=cfg.precision, task=meta["task"], config=asdict(cfg), accepted_overrides=dict(cfg.accept)
    )
    with (
        staged_engines(run_dir) as engines,
        atomic_directory(run_dir / "onnx", "onnx", {"precision": cfg.precision}) as out,
    ):
        log(f"[export] {cfg.precision} backbone + adapter -> {run_dir / 'onnx'}")
        write_backbone(model, spec, out, cfg, ckpt, tokenizer, meta)
        export_adapter(model, spec.adapter, out / "adapter.onnx", cfg.opset)
        save_io_spec(spec, out)
        tokenizer.save_pretrained(out / "tokenizer")
        shutil.copy(ckpt / HELDOUT_FILE, out / HELDOUT_FILE)
        report.sizes = {
            "backbone_bytes": onnx_size_bytes(out / "backbone.onnx"),
            "adapter_bytes": onnx_size_bytes(out / "adapter.onnx"),
        }
        if cfg.compare_fp32_size:
            report.sizes["backbone_fp32_bytes"] = fp32_size(model, spec, cfg.opset)
            report.sizes["backbone_ratio_vs_fp32"] = (
                report.sizes["backbone_bytes"] / report.sizes["backbone_fp32_bytes"]
            )
        log("[export] static TensorRT check, polygraphy lint")
        report.tensorrt_check = {
            g: [asdict(f) for f in check_tensorrt_compatible(out / f"{g}.onnx")] for g in ("backbone", "adapter")
        }
        report.lint = {g: polygraphy_checks.polygraphy_lint(out / f"{g}.onnx") for g in ("backbone", "adapter")}
        for lint in report.lint.values():  # name the files where they will live after the atomic rename
            for key in ("report", "command"):
                lint[key] = lint[key].replace(str(out), str(run_dir / "onnx"))
        log(f"[export] parity on {len(rows)} held-out rows: the exported graph and the CPU graphs served from it")
        report.parity = {
            key: check_parity(
                model,
                tokenizer,
                rows,
                meta["labels"],
                meta["max_length"],
                out / "backbone.onnx",
                out / "adapter.onnx",
                cfg.precision,
                EXACT_ACCURACY_LEVEL,
                cfg.threads,
                gate=runtime_gate,
                task_type=meta.get("task_type", "classification"),
                runtime=runtime,
            )
            for key, runtime, runtime_gate in parity_runs(cfg, gate)
        }
        report.served_runtime = served_runtime(report.parity)
        log("[export] polygraphy run --onnxrt against saved PyTorch outputs")
        report.polygraphy_run = polygraphy_parity(model, spec, out, rows, tokenizer, meta, cfg)
        report.tensorrt = build_engines(engines, out, spec, cfg)  # published with onnx/ only if the gate passes
        report.tensorrt["built"] = [p.replace(str(engines), str(run_dir / "engines")) for p in report.tensorrt["built"]]
        report.export_time_s = time.perf_counter() - t0
        report.failures = gate_failures(report)
        report.passed = not report.failures
        if not report.passed:
            failed = run_dir / "onnx-failed-parity.json"
            report.next_steps = next_steps(report, run_dir, failed)
            report.save(failed)
            raise ExportError(
                "export gates failed:\n  "
                + "\n  ".join(report.failures)
                + "\n\n"
                + format_report(report)
                + "\n\n"
                + "\n".join(report.next_steps)
            )
        report.save(out / PARITY_FILE)
    log(format_report(report))
    return report
