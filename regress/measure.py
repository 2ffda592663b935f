"""Re-measure a run from its artifacts: the checkpoint in PyTorch, the graphs in ONNX Runtime, the ensemble in tritonserver.

Every figure is recomputed, so a bad re-export is caught even when the numbers written at export
time look fine. The held-out split saved with the checkpoint (`checkpoint/heldout.jsonl`) is the
data; `--serve` classifies it through a real tritonserver on free 127.0.0.1 ports, and `--latency`
times the paths one example per call, interleaved in one run (only ratios are compared).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts.artifacts import ArtifactError
from contracts.machine import environment


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
    return np.concatenate(
        [fn(texts[i : i + size], None if pairs is None else pairs[i : i + size]) for i in range(0, len(texts), size)]
    )


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
        enc = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.meta["max_length"], return_tensors="pt"
        )
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
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "requests": int(ms.size),
    }


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
    y: np.ndarray  # (N,) label indices, or scores for regression

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta["labels"])

    @property
    def task_type(self) -> str:
        return self.meta.get("task_type", "classification")

    @property
    def metric(self) -> str:
        """The task's primary metric: accuracy, or Pearson correlation for regression."""
        return "pearson" if self.task_type == "regression" else "accuracy"

    def score(self, logits: np.ndarray) -> float:
        """The primary metric of logits (N, C) against the held-out labels."""
        from training.metrics import task_metrics

        pred = logits[:, 0] if self.task_type == "regression" else logits.argmax(-1)
        return task_metrics(pred.tolist(), self.y.tolist(), self.task_type, len(self.labels))[self.metric]

    def example(self, i: int) -> tuple[list[str], list[str] | None]:
        """Example i (cycling) as a batch of one: the unit of every latency measurement."""
        k = i % len(self.texts)
        return [self.texts[k]], None if self.pairs is None else [self.pairs[k]]


def load_heldout(run: str | Path, rows: int | None = None) -> Heldout:
    """Verify checkpoint/ and onnx/ (manifests, io_spec, graph I/O, labels) and read the held-out split."""
    from training.checkpoint import HELDOUT_FILE, read_checkpoint_config, read_examples

    run = Path(run)
    ckpt = run / "checkpoint"
    meta = read_checkpoint_config(ckpt)  # verifies checkpoint/manifest.json
    export = _load_export(run)
    if tuple(meta["labels"]) != tuple(export.spec.labels):
        raise ArtifactError(
            f"{export.export_dir}/io_spec.json labels {list(export.spec.labels)} differ from "
            f"{ckpt}/config.json {meta['labels']}: the export is stale; re-run `make export`"
        )
    examples = read_examples(ckpt, HELDOUT_FILE)[:rows]
    if not examples:
        raise ArtifactError(f"{ckpt / HELDOUT_FILE} holds no rows; re-run `make train`")
    labels = list(meta["labels"])
    return Heldout(
        run,
        meta,
        export,
        [r["text"] for r in examples],
        [r["text_pair"] for r in examples] if meta["text_pair"] else None,
        np.array(
            [float(r["label"]) if meta.get("task_type") == "regression" else labels.index(r["label"]) for r in examples]
        ),
    )


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


def _agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).mean())


def _recorded_figures(data: Heldout, m: dict) -> dict:
    """Figures written at train/export time (metrics.json, parity.json) and artifact sizes; returns metrics.json."""
    from contracts.parity_report import PARITY_FILE, ExportReport, ReportError
    from serving.artifacts import onnx_files

    recorded = _read_json(data.run / "checkpoint" / "metrics.json", "re-run `make train`")
    try:
        gated = ExportReport.load(data.export.export_dir / PARITY_FILE).gated()
    except ReportError as e:
        raise ArtifactError(str(e)) from None
    m[f"{data.metric}.checkpoint"] = float(
        (recorded.get("test_metrics") or {}).get(data.metric, recorded.get("test_accuracy", 0.0))
    )
    if gated.end_to_end.label_agreement is not None:
        m["agreement.export"] = gated.end_to_end.label_agreement
    m["parity.export_forced_route_max_abs"] = gated.end_to_end.forced_route_max_abs
    for graph in ("backbone", "adapter"):
        m[f"size.{graph}_bytes"] = float(sum(p.stat().st_size for p in onnx_files(data.export.graph(graph))))
    m["data.heldout_rows"] = float(len(data.texts))
    return recorded


def _served_figures(data: Heldout, pt: np.ndarray, ort1: np.ndarray, inproc, opts: Options, figs: Figures) -> None:
    """The held-out split through a real tritonserver: accuracy, agreement, parity (+ latency ratio)."""
    labels = data.labels
    with served_client(data.run, opts.max_batch_size, opts.threads) as client:
        preds = client.classify(data.export.task, data.texts, data.pairs)
        if data.task_type == "regression":  # served as a score
            scores = np.array([[p.score] for p in preds])  # (N, 1)
            figs.metrics[f"{data.metric}.served"] = data.score(scores)
            figs.metrics["parity.served_probabilities_max_abs"] = float(np.abs(scores - ort1).max())
        else:
            probs = np.array([[p.probabilities[k] for k in labels] for p in preds])  # (N, C)
            figs.metrics["accuracy.served"] = data.score(probs)
            figs.metrics["agreement.served"] = _agreement(probs, pt)
            figs.metrics["parity.served_probabilities_max_abs"] = float(np.abs(probs - softmax(ort1)).max())
        if opts.latency:
            ms = time_interleaved(
                {
                    "onnxruntime": lambda i: inproc.classify(*data.example(i)),
                    "triton": lambda i: client.classify(data.export.task, *data.example(i)),
                },
                opts.latency_requests,
                opts.warmup,
            )
            figs.metrics["latency.served_over_inprocess_p50"] = float(
                np.median(ms["triton"]) / np.median(ms["onnxruntime"])
            )
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
        fast = InProcessClassifier(data.run, opts.threads or 0, FAST_ACCURACY_LEVEL, runtime="qdq")
        ort1, ort4 = in_chunks(inproc.logits, data.texts, data.pairs), in_chunks(fast.logits, data.texts, data.pairs)
    m[f"{data.metric}.pytorch"], m[f"{data.metric}.onnxruntime"] = data.score(pt), data.score(ort1)
    m[f"{data.metric}.onnxruntime_level4"] = data.score(ort4)
    if data.task_type == "classification":
        m["agreement.onnxruntime"], m["agreement.onnxruntime_level4"] = _agreement(ort1, pt), _agreement(ort4, pt)
    row_err = np.abs(ort1 - pt).max(-1)  # (N,): a route flip at a near-tie moves one row, not the quantile
    m["parity.logits_p99_abs"], m["parity.logits_max_abs"] = float(np.quantile(row_err, 0.99)), float(row_err.max())
    if opts.latency:
        ms = time_interleaved(
            {
                "pytorch": lambda i: pytorch.logits(*data.example(i)),
                "onnxruntime": lambda i: inproc.classify(*data.example(i)),
            },
            opts.latency_requests,
            opts.warmup,
        )
        m["latency.ort_over_pytorch_p50"] = float(np.median(ms["onnxruntime"]) / np.median(ms["pytorch"]))
        figs.info["latency_in_process"] = {k: latency_summary(v) for k, v in ms.items()}
        figs.latencies_ms.update({f"in_process/{k}": v for k, v in ms.items()})
    if opts.serve:
        _served_figures(data, pt, ort1, inproc, opts, figs)
    figs.info.update(
        run=str(data.run),
        task=data.export.task,
        precision=data.export.spec.precision,
        cpu_runtime=inproc.runtime,  # the graph the server runs (export/cpu_graph.py); sets the gate
        labels=list(data.labels),
        heldout_sha256=_manifest_sha(data.run / "checkpoint", HELDOUT_FILE),
        threads=opts.threads,
        checkpoint_device=recorded.get("device"),
        measure_s=time.perf_counter() - t0,
        environment=environment(),
    )
    return figs


def _manifest_sha(directory: Path, name: str) -> str | None:
    manifest = json.loads((directory / "manifest.json").read_text())
    return manifest["files"].get(name, {}).get("sha256")
