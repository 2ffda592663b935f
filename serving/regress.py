"""`make regress`: re-measure a run from its artifacts and compare it with `RUN/baseline.json`.

    python -m serving.regress --run runs/default [--serve] [--latency] [--update]

Every figure is recomputed from the artifacts, so a bad re-export is caught even when the
numbers written at export time look fine: the checkpoint is re-evaluated in PyTorch and the
exported graphs are run in-process with ONNX Runtime (the serving code path, serving/reference.py)
on the held-out split saved with the checkpoint (`checkpoint/heldout.jsonl`). The figures written
at train/export time (metrics.json, parity.json) are compared too. `--serve` starts a real
tritonserver on free 127.0.0.1 ports on a repository generated into a temporary directory and
classifies the held-out split through the ensemble. `--latency` times PyTorch eager, in-process
ONNX Runtime (and, with --serve, the ensemble) one example per call, interleaved in one run, and
compares only their ratios; absolute times are recorded under "info" and never compared.

Checks (tolerances: built-in defaults < the baseline's "tolerances" < --tolerances):
  accuracy.*   drop vs baseline <= `accuracy` (absolute, 0.005 = 0.5 point)
  agreement.*  label agreement with the PyTorch checkpoint >= `agreement` (default: the export gate
               of the run's precision, export/parity.py), `agreement_level4` for ORT level 4
  parity.*     max abs error <= `parity` (logits vs PyTorch; default: the export gate) or
               `served_parity` (served vs in-process probabilities)
  size.*       growth vs baseline <= `size` (0.05 = 5%)
  latency.*    ratio <= baseline ratio * (1 + `latency`)
  data.*       held-out rows equal to the baseline's (otherwise accuracies are not comparable)
Exit codes: 0 all checks pass, 1 a check failed (or --update refused), 2 missing/corrupt artifact,
missing baseline or bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from training.artifacts import ArtifactError

BASELINE_FILE = "baseline.json"
REPORT_FILE = "regress.json"
BASELINE_FORMAT = 1
DEFAULT_TOLERANCES: dict[str, float | None] = {
    "accuracy": 0.005, "agreement": None, "agreement_level4": 0.98, "parity": None,
    "served_parity": 1e-4, "latency": 0.25, "size": 0.05,
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
    "agreement.onnxruntime": Rule("min", "agreement"),
    "agreement.onnxruntime_level4": Rule("min", "agreement_level4"),
    "agreement.served": Rule("min", "agreement"),
    "agreement.export": Rule("min", "agreement"),  # parity.json, written by `make export`
    "parity.logits_max_abs": Rule("max", "parity"),
    "parity.export_logits_max_abs": Rule("max", "parity"),
    "parity.served_probabilities_max_abs": Rule("max", "served_parity"),
    "size.backbone_bytes": Rule("growth", "size"),
    "size.adapter_bytes": Rule("growth", "size"),
    "latency.ort_over_pytorch_p50": Rule("ratio", "latency"),
    "latency.served_over_inprocess_p50": Rule("ratio", "latency"),
    "data.heldout_rows": Rule("equal"),
}
ABSOLUTE = ("min", "max")  # checked against a fixed limit, with or without a baseline


class RegressError(RuntimeError):
    """A usage or verification problem (not a regression): one line naming the file."""


# ---------------------------------------------------------------- measuring

def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {fix}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None


@contextlib.contextmanager
def _reading(path: Path, fix: str):
    """Turn any failure to load `path` (protobuf, ONNX Runtime, safetensors) into one ArtifactError line."""
    try:
        yield
    except (ArtifactError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise many types for a garbled file
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} could not be loaded ({first}); {fix}") from e


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))  # (N, C)
    return z / z.sum(-1, keepdims=True)


def in_chunks(fn: Callable, texts: list[str], pairs: list[str] | None, size: int = 64) -> np.ndarray:
    """fn(texts, pairs) -> (B, C) applied chunk by chunk; (N, C)."""
    return np.concatenate([fn(texts[i:i + size], None if pairs is None else pairs[i:i + size])
                           for i in range(0, len(texts), size)])


class PyTorchClassifier:
    """The checkpoint in PyTorch eager: texts -> logits, tokenized like training evaluation."""

    def __init__(self, ckpt: Path, threads: int | None = None):
        import torch

        from training.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        with _reading(ckpt, "re-run `make train`"):
            self.model, _, self.meta, self.tokenizer = load_checkpoint(ckpt)
        self._torch = torch

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        enc = self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.meta["max_length"],
                             return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}  # (B, T)
        with self._torch.no_grad():
            return self.model(batch)[0].float().numpy()  # (B, C)


@dataclass
class Figures:
    """What one regress run measured: compared metrics, recorded-only info, raw latencies (ms)."""

    metrics: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    latencies_ms: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Options:
    rows: int | None = None
    threads: int | None = None
    serve: bool = False
    latency: bool = False
    latency_requests: int = 100
    warmup: int = 10
    max_batch_size: int = 32


def time_interleaved(calls: dict[str, Callable[[int], object]], n: int, warmup: int) -> dict[str, np.ndarray]:
    """Milliseconds of call(i) for each path, the paths taking turns per example (same load for all)."""
    for call in calls.values():
        for i in range(warmup):
            call(i)
    out = {name: np.zeros(n) for name in calls}
    for i in range(n):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(i)
            out[name][i] = 1e3 * (time.perf_counter() - t0)
    return out


def latency_summary(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "requests": int(ms.size)}


@contextlib.contextmanager
def served_client(run: Path, max_batch_size: int = 32, threads: int | None = None):
    """A tritonserver on free 127.0.0.1 ports serving `run` from a temporary repository; yields a gRPC Client."""
    from serving.client import Client
    from serving.config import ServeConfig
    from serving.repository import generate_repository
    from serving.server import ServerOptions, TritonServer

    with tempfile.TemporaryDirectory(prefix="regress-") as tmp:
        repo = Path(tmp) / "model_repository"
        generate_repository([run], repo, ServeConfig(max_batch_size=max_batch_size, ort_threads=threads or 0))
        options = ServerOptions.on_free_ports(repository=repo, log_file=Path(tmp) / "tritonserver.log")
        with TritonServer(options) as server, Client(server.grpc_url, "grpc") as client:
            yield client


@dataclass
class Heldout:
    """A verified run and its held-out split (checkpoint/heldout.jsonl) as texts, pairs and label indices."""

    run: Path
    meta: dict  # checkpoint/config.json
    export: object  # serving.artifacts.ExportedRun
    texts: list[str]
    pairs: list[str] | None
    y: np.ndarray  # (N,) label indices

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    def example(self, i: int) -> tuple[list[str], list[str] | None]:
        """Example i (cycling) as a batch of one: the unit of every latency measurement."""
        k = i % len(self.texts)
        return [self.texts[k]], None if self.pairs is None else [self.pairs[k]]


def load_heldout(run: str | Path, rows: int | None = None) -> Heldout:
    """Verify checkpoint/ and onnx/ (manifests, io_spec, graph I/O, labels) and read the held-out split."""
    from serving.artifacts import load_run
    from training.checkpoint import HELDOUT_FILE, read_checkpoint_config, read_examples

    run = Path(run)
    ckpt = run / "checkpoint"
    meta = read_checkpoint_config(ckpt)  # verifies checkpoint/manifest.json
    export = _load_export(run)
    if tuple(meta["labels"]) != tuple(export.spec.labels):
        raise ArtifactError(f"{export.export_dir}/io_spec.json labels {list(export.spec.labels)} differ from "
                            f"{ckpt}/config.json {meta['labels']}: the export is stale; re-run `make export`")
    examples = read_examples(ckpt, HELDOUT_FILE)[:rows]
    if not examples:
        raise ArtifactError(f"{ckpt / HELDOUT_FILE} holds no rows; re-run `make train`")
    labels = list(meta["labels"])
    return Heldout(run, meta, export, [r["text"] for r in examples],
                   [r["text_pair"] for r in examples] if meta["text_pair"] else None,
                   np.array([labels.index(r["label"]) for r in examples]))


def _load_export(run: Path):
    """serving.artifacts.load_run (manifest, io_spec, graph I/O), with an unparsable graph named in one line."""
    import onnx

    from serving.artifacts import GRAPHS, load_run

    try:
        return load_run(run)
    except (ArtifactError, FileNotFoundError, ValueError):
        raise
    except Exception:  # noqa: BLE001 - e.g. protobuf's DecodeError from a garbled graph with a rewritten manifest
        export_dir = run / "onnx" if (run / "onnx").is_dir() else run
        for graph in GRAPHS:
            with _reading(export_dir / f"{graph}.onnx", "re-run `make export`"):
                onnx.load(str(export_dir / f"{graph}.onnx"), load_external_data=False)
        raise


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(-1) == y).mean())


def _recorded_figures(data: Heldout, m: dict) -> dict:
    """Figures written at train/export time (metrics.json, parity.json) and artifact sizes; returns metrics.json."""
    from export.ort_session import EXACT_ACCURACY_LEVEL
    from serving.artifacts import onnx_files

    recorded = _read_json(data.run / "checkpoint" / "metrics.json", "re-run `make train`")
    parity = _read_json(data.export.export_dir / "parity.json", "re-run `make export`")
    m["accuracy.checkpoint"] = float(recorded["test_accuracy"])
    level1 = parity.get("parity", {}).get(f"accuracy_level_{EXACT_ACCURACY_LEVEL}", {})
    if "label_agreement" in level1:
        m["agreement.export"] = float(level1["label_agreement"])
    if "logits" in level1.get("max_abs_error", {}):
        m["parity.export_logits_max_abs"] = float(level1["max_abs_error"]["logits"])
    for graph in ("backbone", "adapter"):
        m[f"size.{graph}_bytes"] = float(sum(p.stat().st_size for p in onnx_files(data.export.graph(graph))))
    m["data.heldout_rows"] = float(len(data.texts))
    return recorded


def _served_figures(data: Heldout, pt: np.ndarray, ort1: np.ndarray, inproc, opts: Options, figs: Figures) -> None:
    """The held-out split through a real tritonserver: accuracy, agreement, parity (+ latency ratio)."""
    labels = data.labels
    with served_client(data.run, opts.max_batch_size, opts.threads) as client:
        preds = client.classify(data.export.task, data.texts, data.pairs)
        probs = np.array([[p.probabilities[k] for k in labels] for p in preds])  # (N, C)
        served = np.array([labels.index(p.label) for p in preds])
        figs.metrics["accuracy.served"] = float((served == data.y).mean())
        figs.metrics["agreement.served"] = float((served == pt.argmax(-1)).mean())
        figs.metrics["parity.served_probabilities_max_abs"] = float(np.abs(probs - softmax(ort1)).max())
        if opts.latency:
            ms = time_interleaved({"onnxruntime": lambda i: inproc.classify(*data.example(i)),
                                   "triton": lambda i: client.classify(data.export.task, *data.example(i))},
                                  opts.latency_requests, opts.warmup)
            figs.metrics["latency.served_over_inprocess_p50"] = float(np.median(ms["triton"]) / np.median(ms["onnxruntime"]))
            figs.info["latency_served"] = {k: latency_summary(v) for k, v in ms.items()}
            figs.latencies_ms.update({f"served/{k}": v for k, v in ms.items()})


def measure(run: str | Path, opts: Options) -> Figures:
    """Every figure of `run` (runs/<name>), recomputed from its checkpoint/ and onnx/."""
    from export.ort_session import EXACT_ACCURACY_LEVEL, FAST_ACCURACY_LEVEL
    from serving.reference import InProcessClassifier
    from training.checkpoint import HELDOUT_FILE

    t0 = time.perf_counter()
    data = load_heldout(run, opts.rows)
    figs = Figures()
    m = figs.metrics
    recorded = _recorded_figures(data, m)
    pytorch = PyTorchClassifier(data.run / "checkpoint", opts.threads)
    pt = in_chunks(pytorch.logits, data.texts, data.pairs)  # (N, C)
    with _reading(data.export.graph("backbone"), "re-run `make export`"):
        inproc = InProcessClassifier(data.run, opts.threads or 0, EXACT_ACCURACY_LEVEL)
        fast = InProcessClassifier(data.run, opts.threads or 0, FAST_ACCURACY_LEVEL)
        ort1, ort4 = in_chunks(inproc.logits, data.texts, data.pairs), in_chunks(fast.logits, data.texts, data.pairs)
    m["accuracy.pytorch"], m["accuracy.onnxruntime"] = _accuracy(pt, data.y), _accuracy(ort1, data.y)
    m["accuracy.onnxruntime_level4"] = _accuracy(ort4, data.y)
    m["agreement.onnxruntime"] = _accuracy(ort1, pt.argmax(-1))
    m["agreement.onnxruntime_level4"] = _accuracy(ort4, pt.argmax(-1))
    m["parity.logits_max_abs"] = float(np.abs(ort1 - pt).max())
    if opts.latency:
        ms = time_interleaved({"pytorch": lambda i: pytorch.logits(*data.example(i)),
                               "onnxruntime": lambda i: inproc.classify(*data.example(i))}, opts.latency_requests, opts.warmup)
        m["latency.ort_over_pytorch_p50"] = float(np.median(ms["onnxruntime"]) / np.median(ms["pytorch"]))
        figs.info["latency_in_process"] = {k: latency_summary(v) for k, v in ms.items()}
        figs.latencies_ms.update({f"in_process/{k}": v for k, v in ms.items()})
    if opts.serve:
        _served_figures(data, pt, ort1, inproc, opts, figs)
    figs.info.update(run=str(data.run), task=data.export.task, precision=data.export.spec.precision,
                     labels=list(data.labels), heldout_sha256=_manifest_sha(data.run / "checkpoint", HELDOUT_FILE),
                     threads=opts.threads, checkpoint_device=recorded.get("device"),
                     measure_s=time.perf_counter() - t0, environment=environment())
    return figs


def _manifest_sha(directory: Path, name: str) -> str | None:
    manifest = json.loads((directory / "manifest.json").read_text())
    return manifest["files"].get(name, {}).get("sha256")


def environment() -> dict:
    """Machine, versions and date: stated next to every figure."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
               platform.processor() or platform.machine())
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnx", "transformers", "numpy", "tritonclient", "nvidia-pytriton"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---------------------------------------------------------------- comparing

@dataclass
class Row:
    metric: str
    baseline: float | None
    current: float | None
    limit: float | None
    status: str  # PASS | FAIL | NEW | NOT RUN | INFO
    tolerance: float | None = None


def resolve_tolerances(precision: str, stored: dict | None, cli: dict | None) -> dict[str, float | None]:
    """Defaults (per precision where None) < the baseline's tolerances < command-line tolerances."""
    from export.parity import TOLERANCES

    gate = TOLERANCES.get(precision, TOLERANCES["int8-weight"])
    tol = dict(DEFAULT_TOLERANCES)
    tol["agreement"] = gate.min_label_agreement
    # level 4 adds int8 activations to weight-only graphs; it cannot be held closer than level 1
    tol["agreement_level4"] = min(tol["agreement_level4"], gate.min_label_agreement)
    tol["parity"] = (gate.max_abs or {}).get("logits")
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
    limit = {"drop": lambda: baseline - t, "ratio": lambda: baseline * (1 + t), "growth": lambda: baseline * (1 + t),
             "equal": lambda: baseline}[rule.kind]()
    eps = 1e-9 * max(1.0, abs(limit))  # float noise in a JSON round trip must not fail a check
    ok = {"drop": current >= limit - eps, "ratio": current <= limit + eps, "growth": current <= limit + eps,
          "equal": abs(current - limit) <= eps}[rule.kind]
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
    if kind in ("accuracy", "agreement"):
        return f"{100 * (r.current - r.baseline):+.2f} pt"
    return f"{r.current - r.baseline:+.3g}"


def _limit(r: Row) -> str:
    kind = RULES.get(r.metric, Rule("info")).kind
    if r.status == "NOT RUN":
        served, timed = "served" in r.metric, r.metric.startswith("latency.")
        return {(True, True): "needs --serve --latency", (True, False): "needs --serve",
                (False, True): "needs --latency"}.get((served, timed), "not measured")
    if r.limit is None:
        return "-"
    text = {"drop": f">= {_fmt(r.metric, r.limit)} (-{100 * (r.tolerance or 0):.2f} pt)",
            "min": f">= {_fmt(r.metric, r.limit)}", "max": f"<= {_fmt(r.metric, r.limit)}",
            "ratio": f"<= {_fmt(r.metric, r.limit)} (+{100 * (r.tolerance or 0):.0f}%)",
            "growth": f"<= {_fmt(r.metric, r.limit)} (+{100 * (r.tolerance or 0):.0f}%)",
            "equal": f"== {_fmt(r.metric, r.limit)}"}
    return text[kind]


def format_table(rows: list[Row]) -> str:
    head = f"{'metric':<38} {'baseline':>12} {'current':>12} {'delta':>10}  {'limit':<26} result"
    lines = [head, "-" * len(head)]
    lines += [f"{r.metric:<38} {_fmt(r.metric, r.baseline):>12} {_fmt(r.metric, r.current):>12} {_delta(r):>10}  "
              f"{_limit(r):<26} {r.status}" for r in rows]
    failed = [r.metric for r in rows if r.status == "FAIL"]
    checked = sum(r.status in ("PASS", "FAIL") for r in rows)
    lines.append(f"{len(failed)} of {checked} checks FAILED: {', '.join(failed)}" if failed
                 else f"all {checked} checks passed")
    return "\n".join(lines)


# ---------------------------------------------------------------- baseline file and CLI

def load_baseline(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegressError(f"{path} is not valid JSON ({e}); fix it or rewrite it with --update") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT or not isinstance(data.get("metrics"), dict):
        raise RegressError(f"{path} is not a format-{BASELINE_FORMAT} regression baseline (no 'metrics'); "
                           "rewrite it with --update")
    return data


def parse_tolerances(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in DEFAULT_TOLERANCES:
            raise RegressError(f"--tolerances {item!r}: unknown key {key!r}; known: {', '.join(DEFAULT_TOLERANCES)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise RegressError(f"--tolerances {item!r}: {value!r} is not a number") from None
        if out[key] < 0 or (key.startswith("agreement") and out[key] > 1):
            raise RegressError(f"--tolerances {item!r}: must be >= 0 (agreement in [0, 1])")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving.regress", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory with checkpoint/ and onnx/ (runs/<name>)")
    p.add_argument("--baseline", type=Path, help=f"baseline file (default: RUN/{BASELINE_FILE})")
    p.add_argument("--update", action="store_true", help="rewrite the baseline with this run's figures (deliberately)")
    p.add_argument("--force", action="store_true", help="with --update: write even if an absolute check fails")
    p.add_argument("--serve", action="store_true", help="also classify the held-out split through a real tritonserver")
    p.add_argument("--latency", action="store_true", help="also measure latency ratios (PyTorch, ORT, served with --serve)")
    p.add_argument("--latency-requests", type=int, default=100, help="timed single-example calls per path")
    p.add_argument("--tolerances", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"override tolerances; keys: {', '.join(DEFAULT_TOLERANCES)}")
    p.add_argument("--rows", type=int, help="use only the first N held-out rows (must match the baseline)")
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: all cores)")
    p.add_argument("--report", type=Path, help=f"JSON report of this check (default: RUN/{REPORT_FILE})")
    return p.parse_args(argv)


def _describe(baseline: dict, path: Path) -> str:
    env = baseline.get("environment", {})
    return (f"baseline {path}: written {env.get('date', '?')} on {env.get('host', '?')} "
            f"({env.get('cpu_count', '?')} CPUs); command `{baseline.get('command', '?')}`")


def write_baseline(path: Path, figs: Figures, tolerances: dict, command: str) -> None:
    data = {"format": BASELINE_FORMAT, "command": command, "environment": figs.info.get("environment"),
            "tolerances": tolerances, "metrics": figs.metrics,
            "info": {k: v for k, v in figs.info.items() if k != "environment"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def run(args: argparse.Namespace, command: str) -> int:
    if args.latency_requests < 1 or (args.rows is not None and args.rows < 1):
        raise RegressError("--latency-requests and --rows must be >= 1")
    cli_tol = parse_tolerances(args.tolerances)
    path = args.baseline or args.run / BASELINE_FILE
    try:
        baseline = load_baseline(path) if path.is_file() else None
    except RegressError as e:
        if not args.update:
            raise
        print(f"note: {e}; --update replaces it")
        baseline = None
    if baseline is None and not args.update:
        raise RegressError(f"no baseline at {path}: create one from this run with "
                           f"`python -m serving.regress --run {args.run} --update` (or `make regress RUN={args.run} "
                           f"ARGS=--update`), after checking the run is good")
    opts = Options(rows=args.rows, threads=args.threads, serve=args.serve, latency=args.latency,
                   latency_requests=args.latency_requests)
    figs = measure(args.run, opts)
    stored = (baseline or {}).get("tolerances") or {}
    tol = resolve_tolerances(figs.info["precision"], stored, cli_tol)
    rows = compare((baseline or {}).get("metrics", {}), figs.metrics, tol)
    print(f"regression check of {args.run} ({figs.info['task']}, {figs.info['precision']}, "
          f"{int(figs.metrics['data.heldout_rows'])} held-out rows)")
    if baseline:
        print(_describe(baseline, path))
        if baseline.get("info", {}).get("heldout_sha256") not in (None, figs.info["heldout_sha256"]):
            print("note: the held-out split differs from the baseline's (the run was retrained on another split?)")
        if args.latency and baseline.get("info", {}).get("threads") != args.threads:
            print(f"note: the baseline's latency was measured with --threads {baseline.get('info', {}).get('threads')}, "
                  f"this run with {args.threads}: latency ratios are comparable only at equal thread counts")
    print("tolerances: " + ", ".join(f"{k} {v:g}" + (" (cli)" if k in cli_tol else " (baseline)" if k in stored else "")
                                     for k, v in tol.items() if v is not None))
    print(format_table(rows))
    report = args.report or args.run / REPORT_FILE
    failed = [r.metric for r in rows if r.status == "FAIL"]
    report.write_text(json.dumps({"baseline": str(path), "command": command, "tolerances": tol,
                                  "passed": not failed, "failed": failed, "rows": [r.__dict__ for r in rows],
                                  "metrics": figs.metrics, "info": figs.info}, indent=2) + "\n")
    if not args.update:
        return 1 if failed else 0
    absolute = [r.metric for r in rows if r.status == "FAIL" and RULES.get(r.metric, Rule("info")).kind in ABSOLUTE]
    if absolute and not args.force:
        print(f"refusing to write a baseline: {', '.join(absolute)} fail their absolute limits "
              "(fix the run, or pass --force to record it anyway)")
        return 1
    dropped = sorted(set((baseline or {}).get("metrics", {})) - set(figs.metrics))
    write_baseline(path, figs, {**stored, **cli_tol}, command)
    print(f"baseline {'rewritten deliberately' if baseline else 'created'}: {path} ({len(figs.metrics)} metrics)"
          + (f"; dropped, not measured in this run: {', '.join(dropped)}" if dropped else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m serving.regress " + shlex.join(sys.argv[1:] if argv is None else argv)
    from serving.errors import RepositoryError, ServerError

    try:
        return run(args, command)
    except (RegressError, ArtifactError, FileNotFoundError, ValueError, RepositoryError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
