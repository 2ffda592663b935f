"""Latency and throughput of the served ensemble vs in-process ONNX Runtime, on the same texts.

    python -m benchmarks.serving_bench --run runs/default [--texts FILE] [--requests 200]

One request = one example. For each concurrency (default 1 and 16) it measures p50/p99 latency and
throughput of (a) tokenizer + backbone + adapter + softmax in this process (serving/reference.py,
the same tokenization and ONNX Runtime options as the server) and (b) the Triton ensemble over gRPC
(or HTTP) on 127.0.0.1, started here on free ports unless --url names a running server. Ratios are
from this one run. Results go to docs/serving_bench.json and docs/serving_bench.md. Texts come from
--texts (one per line, or CSV/JSONL with a `text` [and `text_pair`] column), else from the run's
test split (onnx/heldout.jsonl or checkpoint/heldout.jsonl, written by `make train` / `make export`).
The client threads share this Python process (and its GIL) with nothing else; at high concurrency
they add some latency of their own to the Triton figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import datetime
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.report import absent, load_json
from export.cpu_graph import RUNTIMES
from serving.client import Client
from serving.config import ServeConfig
from serving.reference import InProcessClassifier
from serving.repository import PROJECT_ROOT, generate_repository
from serving.server import ServerOptions, TritonServer
from training.checkpoint import HELDOUT_FILE

SPLIT_CANDIDATES = (f"onnx/{HELDOUT_FILE}", f"checkpoint/{HELDOUT_FILE}")  # the test split, saved by train/export


def read_texts(path: Path) -> tuple[list[str], list[str] | None]:
    """Examples from a .jsonl / .csv (columns text[, text_pair]) or a plain one-per-line file."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if str(r.get("text") or "").strip()]
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and all(r.get("text_pair") for r in rows) else None
    return texts, pairs


def load_texts(run: Path, texts_file: str | None) -> tuple[list[str], list[str] | None, str]:
    if texts_file:
        return (*read_texts(Path(texts_file)), texts_file)
    for rel in SPLIT_CANDIDATES:
        if (run / rel).is_file():
            return (*read_texts(run / rel), str(run / rel))
    raise SystemExit(f"no test split under {run} ({', '.join(SPLIT_CANDIDATES)}); pass --texts FILE")


def measure(call, n: int, concurrency: int) -> dict:
    """Run call(i) for i < n on `concurrency` threads; latency of each call and total wall time."""
    latencies = np.zeros(n)

    def timed(i: int) -> None:
        t0 = time.perf_counter()
        call(i)
        latencies[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, range(n)))
    wall = time.perf_counter() - t0
    return {
        "requests": n,
        "concurrency": concurrency,
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "mean_ms": 1e3 * float(latencies.mean()),
        "throughput_rps": n / wall,
    }


def bench_pair(classify_inproc, make_client, task, texts, pairs, n, warmup, concurrency) -> dict:
    """In-process and served figures at one concurrency, plus their ratios."""

    def example(i):
        k = i % len(texts)
        return [texts[k]], None if pairs is None else [pairs[k]]

    local = threading.local()

    def served(i):
        if not hasattr(local, "client"):
            local.client = make_client()
        local.client.classify(task, *example(i))

    measure(lambda i: classify_inproc(*example(i)), warmup, concurrency)
    inproc = measure(lambda i: classify_inproc(*example(i)), n, concurrency)
    measure(served, warmup, concurrency)
    triton = measure(served, n, concurrency)
    return {
        "concurrency": concurrency,
        "in_process": inproc,
        "triton": triton,
        "ratio_p50": triton["p50_ms"] / inproc["p50_ms"],
        "ratio_p99": triton["p99_ms"] / inproc["p99_ms"],
        "ratio_throughput": triton["throughput_rps"] / inproc["throughput_rps"],
    }


def run_benchmark(
    run: str | Path,
    texts: list[str],
    pairs: list[str] | None,
    *,
    requests: int = 200,
    warmup: int = 10,
    concurrencies=(1, 16),
    protocol: str = "grpc",
    url: str | None = None,
    cfg: ServeConfig | None = None,
) -> dict:
    """Measure everything; start a server on free 127.0.0.1 ports unless `url` is given."""
    cfg = cfg or ServeConfig()
    reference = InProcessClassifier(
        run, threads=cfg.ort_threads, accuracy_level=cfg.accuracy_level, runtime=cfg.cpu_runtime
    )
    task = reference.run.task
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        server = None
        if url is None:
            repo = Path(tmp) / "model_repository"
            generate_repository([run], repo, cfg)
            server = TritonServer(
                ServerOptions.on_free_ports(repository=repo, log_file=Path(tmp) / "tritonserver.log")
            ).start()
            url = server.grpc_url if protocol == "grpc" else server.http_url
        try:
            rows = [
                bench_pair(reference.classify, lambda: Client(url, protocol), task, texts, pairs, requests, warmup, c)
                for c in concurrencies
            ]
        finally:
            if server is not None:
                server.stop()
    return {
        "task": task,
        "run": str(run),
        "protocol": protocol,
        "examples": len(texts),
        "results": rows,
        "serve_config": cfg.to_dict(),
        "cpu_runtime": reference.runtime,  # what `auto` resolved to: the graph the server ran
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }


def to_markdown(result: dict) -> str:
    lines = [
        f"# Serving benchmark: task `{result['task']}` ({result['run']})",
        "",
        f"One example per request; {result['results'][0]['in_process']['requests']} requests per cell; "
        f"Triton over {result['protocol']} on 127.0.0.1; {result['machine']['cpus']} CPUs "
        f"({result['machine']['platform']}). Ratios are Triton / in-process from the same run. "
        f"ONNX Runtime CPU graph: `{result.get('cpu_runtime', 'qdq')}` (export/cpu_graph.py).",
        "",
        "| concurrency | path | p50 ms | p99 ms | req/s |",
        "|---|---|---|---|---|",
    ]
    for r in result["results"]:
        for name in ("in_process", "triton"):
            m = r[name]
            lines.append(
                f"| {r['concurrency']} | {name} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['throughput_rps']:.1f} |"
            )
        lines.append(
            f"| {r['concurrency']} | **ratio** | {r['ratio_p50']:.2f}x | {r['ratio_p99']:.2f}x | "
            f"{r['ratio_throughput']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path, name: str = "serving_bench") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(to_markdown(result))
    return json_path, md_path


def summary(docs: Path, status: str = "Not re-measured in this run", command: str | None = None) -> list[str]:
    """This benchmark's section of docs/BENCHMARKS.md, from docs/serving_bench.json (its own schema)."""
    path = docs / "serving_bench.json"
    data = load_json(path)
    out = ["## Triton ensemble vs in-process ONNX Runtime under load", ""]
    if not data:
        return out + absent("docs/serving_bench.json", "python -m benchmarks.serving_bench --run runs/<name>")
    mc = data["machine"]
    date = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out += [
        f"{status}. From `docs/serving_bench.json` (file written {date}; {mc['cpus']} CPUs, {mc['platform']}; run "
        f"`{data['run']}`, {data['protocol']}); command `{command or 'python -m benchmarks.serving_bench --run ' + data['run']}`. "
        "Full table: [serving_bench.md](serving_bench.md).",
        "",
        "| concurrency | in-process p50 / p99 ms | Triton p50 / p99 ms | Triton / in-process p50 | in-process req/s | Triton req/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        a, b = r["in_process"], r["triton"]
        out.append(
            f"| {r['concurrency']} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} "
            f"| {r['ratio_p50']:.2f}x | {a['throughput_rps']:.1f} | {b['throughput_rps']:.1f} |"
        )
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="exported run (runs/<name>)")
    p.add_argument("--texts", help="examples file (.txt one per line, .csv/.jsonl with a text column)")
    p.add_argument("--requests", type=int, default=200, help="measured requests per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured requests before each cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--url", help="use a running server at host:port instead of starting one")
    p.add_argument("--max-queue-delay-us", type=int, default=ServeConfig.max_queue_delay_us)
    p.add_argument("--ort-threads", type=int, default=0)
    p.add_argument(
        "--cpu-runtime",
        choices=("auto", *RUNTIMES),
        default="auto",
        help="graph ONNX Runtime serves (export/cpu_graph.py); auto: what the export's parity gate chose",
    )
    p.add_argument("--out-dir", default=str(PROJECT_ROOT / "docs"))
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        p.error("--requests must be in [1, 100000]")
    texts, pairs, source = load_texts(Path(args.run), args.texts)
    cfg = ServeConfig(
        max_queue_delay_us=args.max_queue_delay_us, ort_threads=args.ort_threads, cpu_runtime=args.cpu_runtime
    )
    result = run_benchmark(
        args.run,
        texts,
        pairs,
        requests=args.requests,
        warmup=args.warmup,
        concurrencies=tuple(args.concurrency),
        protocol=args.protocol,
        url=args.url,
        cfg=cfg,
    )
    result["texts"] = source
    print(to_markdown(result))
    for path in write_report(result, Path(args.out_dir)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
