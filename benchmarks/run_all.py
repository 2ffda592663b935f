"""`make bench`: every benchmark of a trained + exported run -> docs/BENCHMARKS.md and docs/bench_*.png.

    python -m benchmarks.run_all --run runs/default [--skip-runtimes] [--skip-export-bench] [--skip-serving]
    python -m benchmarks.run_all --render-only          # redraw BENCHMARKS.md from the JSON already in docs/

Steps:
  runtimes      one example per call through PyTorch eager, ONNX Runtime accuracy level 1 and 4, and
                the Triton ensemble (embedded tritonserver on free 127.0.0.1 ports), the four taking
                turns per example in one run; plus each runtime's accuracy on the held-out split
                -> docs/bench_runtimes.json, bench_latency_runtimes.png, bench_latency_hist.png
  export bench  benchmarks/export_bench.py (batch 1 and 32, seq 128) -> docs/export_bench.json/.md
  serving bench benchmarks/serving_bench.py (concurrency 1 and 16) -> docs/serving_bench.json/.md
  render        the above plus every other producer's own section (each renders its own JSON:
                soak, memory, experiments.compare, experiments.ablation, gpu_inference) ->
                docs/BENCHMARKS.md (+ bench_gpu_memory.png). An absent input is stated as not
                measured, never filled in; a producer whose JSON does not match its schema fails.
Timings are medians (p99 next to them); runtimes are compared only as ratios from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import plots
from benchmarks.report import absent, load_json

DOCS = Path("docs")
RUNTIMES_JSON = "bench_runtimes.json"
PNG = {
    "runtimes": "bench_latency_runtimes.png",
    "hist": "bench_latency_hist.png",
    "gpu_memory": "bench_gpu_memory.png",
}


# ---------------------------------------------------------------- measuring


def check_run(run: Path) -> None:
    """The run must be trained and exported; SystemExit with the command that makes it so."""
    from contracts.artifacts import ArtifactError
    from serving.artifacts import load_run
    from training.checkpoint import read_checkpoint_config

    try:
        read_checkpoint_config(run / "checkpoint")
        load_run(run)
    except (ArtifactError, FileNotFoundError, ValueError) as e:
        raise SystemExit(
            f"error: {str(e).splitlines()[0]}\n{run} must be trained and exported first: `make train export RUN={run}`"
        ) from None


def measure_runtimes(run: Path, requests: int, warmup: int, threads: int | None, serve: bool) -> dict:
    """Latency per runtime (interleaved, one run) and accuracy per runtime on the held-out split."""
    import torch

    from contracts.machine import environment
    from regress.measure import (
        PyTorchClassifier,
        in_chunks,
        latency_summary,
        load_heldout,
        served_client,
        time_interleaved,
    )
    from serving.reference import InProcessClassifier

    data = load_heldout(run)
    pt = PyTorchClassifier(run / "checkpoint", threads)
    ort = {level: InProcessClassifier(run, threads or 0, level, runtime="qdq") for level in (1, 4)}
    logits = {
        "PyTorch eager": in_chunks(pt.logits, data.texts, data.pairs),
        "ORT level 1": in_chunks(ort[1].logits, data.texts, data.pairs),
        "ORT level 4": in_chunks(ort[4].logits, data.texts, data.pairs),
    }
    accuracy = {k: float((v.argmax(-1) == data.y).mean()) for k, v in logits.items()}
    calls = {
        "PyTorch eager": lambda i: pt.logits(*data.example(i)),
        "ORT level 1": lambda i: ort[1].classify(*data.example(i)),
        "ORT level 4": lambda i: ort[4].classify(*data.example(i)),
    }
    if serve:
        with served_client(run, threads=threads) as client:
            served = client.classify(data.export.task, data.texts, data.pairs)
            accuracy["Triton ensemble"] = float(
                np.mean([data.labels.index(p.label) == t for p, t in zip(served, data.y)])
            )
            calls["Triton ensemble"] = lambda i: client.classify(data.export.task, *data.example(i))
            ms = time_interleaved(calls, requests, warmup)
    else:
        ms = time_interleaved(calls, requests, warmup)
    summary = {k: latency_summary(v) for k, v in ms.items()}
    base = summary["PyTorch eager"]["p50_ms"]
    return {
        "run": str(run),
        "task": data.export.task,
        "backbone": data.meta["run"]["backbone"]["name"],
        "precision": data.export.spec.precision,
        "heldout_rows": len(data.texts),
        "requests": requests,
        "warmup": warmup,
        "threads": {"requested": threads, "torch": torch.get_num_threads()},
        "environment": environment(),
        "accuracy": accuracy,
        "summary": summary,
        "p50_vs_pytorch": {k: v["p50_ms"] / base for k, v in summary.items()},
        "latencies_ms": {k: [round(float(x), 4) for x in v] for k, v in ms.items()},
    }


def run_step(name: str, argv: list[str]) -> dict:
    """One benchmark script as a subprocess (its own torch threads and memory); its output is shown."""
    print(f"[bench] {name}: {shlex.join(argv)}", flush=True)
    code = subprocess.run([sys.executable, *argv]).returncode
    print(f"[bench] {name}: {'done' if code == 0 else f'FAILED (exit code {code})'}", flush=True)
    return {
        "status": "Measured in this run" if code == 0 else f"FAILED in this run (exit code {code})",
        "command": "python " + shlex.join(argv),
    }


# ---------------------------------------------------------------- rendering


def _status(steps: dict, key: str, default: str) -> str:
    return steps.get(key, {}).get("status", default)


def section_runtimes(data: dict | None, docs: Path, command: str) -> list[str]:
    out = ["## Latency and accuracy per runtime", ""]
    if not data:
        return out + absent(f"{docs / RUNTIMES_JSON}", "make bench RUN=runs/<name>")
    env, s = data["environment"], data["summary"]
    out += [
        f"Run `{data['run']}` ({data['backbone']}, task `{data['task']}`, {data['precision']}); {data['requests']} "
        f"requests per runtime after {data['warmup']} warmup, one example per request, the runtimes taking turns "
        f"per example; torch threads {data['threads']['torch']}, ONNX Runtime threads "
        f"{data['threads']['requested'] or 'default (all cores)'}. {env['cpu']}, {env['cpu_count']} CPUs, "
        f"{env['date']}. Command: `{command}`.",
        "",
        "| runtime | p50 ms | p99 ms | mean ms | p50 vs PyTorch eager | held-out accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in s.items():
        out.append(
            f"| {name} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['mean_ms']:.2f} "
            f"| {data['p50_vs_pytorch'][name]:.2f}x | {data['accuracy'].get(name, float('nan')):.4f} |"
        )
    if "Triton ensemble" not in s:
        out += ["", "Triton ensemble: not measured in this run (--skip-serving)."]
    out += [
        "",
        "PyTorch eager is the checkpoint as trained (int8 codes dequantized in every forward, HF tokenizer); "
        "ORT level N is the exported graphs in-process with `session.qdq_matmulnbits_accuracy_level=N` (the "
        "serving tokenizer); the Triton ensemble is tokenizer -> backbone -> adapter -> postprocess over gRPC "
        "on 127.0.0.1.",
        "",
        f"![latency per runtime]({PNG['runtimes']})",
        "",
    ]
    if "Triton ensemble" in s:
        out += [f"![served latency histogram]({PNG['hist']})", ""]
    return out


def render(docs: Path, run_cmd: str, steps: dict) -> str:
    runtimes = load_json(docs / RUNTIMES_JSON)
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{run_cmd}` on "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Timings are medians "
        "(p99 or p90 beside them), and runtimes are compared only as ratios measured in the same run on the same "
        "machine; absolute times from different machines or runs are not comparable. Each section names its source "
        "file, machine, date and command; a section whose input is absent says so.",
        "",
    ]
    from benchmarks import export_bench_report, gpu_inference, memory_report, serving_bench, soak
    from experiments import ablation_report, report

    parts += section_runtimes(runtimes, docs, (runtimes or {}).get("command", run_cmd))
    parts += export_bench_report.summary(docs, _status(steps, "export", "Not re-measured in this run"))
    parts += serving_bench.summary(
        docs, _status(steps, "serving", "Not re-measured in this run"), steps.get("serving", {}).get("command")
    )
    for producer in (soak, memory_report, report, ablation_report, gpu_inference):  # each renders its own JSON
        parts += producer.summary(docs)
    parts += [
        "## Regression",
        "",
        "`make regress RUN=runs/<name>` re-measures accuracy, label agreement, parity and "
        "sizes from the artifacts and compares them with `runs/<name>/baseline.json` (`ARGS=--serve` adds the "
        "served ensemble, `ARGS=--latency` latency ratios); see README.md.",
        "",
    ]
    return "\n".join(parts)


def draw(docs: Path, run_cmd: str) -> list[Path]:
    """Every figure whose input exists; returns the PNGs written."""
    written = []
    rt = load_json(docs / RUNTIMES_JSON)
    if rt:
        foot = plots.footer_text(rt["environment"], rt.get("command", run_cmd))
        written.append(
            plots.latency_bars(
                rt["summary"],
                foot,
                docs / PNG["runtimes"],
                f"{rt['backbone']} / {rt['task']}: one example per request (x = p50 / PyTorch eager p50)",
            )
        )
        if "Triton ensemble" in rt["latencies_ms"]:
            written.append(
                plots.latency_histogram(
                    np.array(rt["latencies_ms"]["Triton ensemble"]),
                    foot,
                    docs / PNG["hist"],
                    f"Triton ensemble latency ({rt['backbone']} / {rt['task']})",
                )
            )
    mem = load_json(docs / "gpu_training_memory.json")
    if mem and "methods" in mem:
        env = {"gpu": mem.get("gpu"), "date": mem.get("date"), "versions": {"torch": mem.get("torch")}}
        written.append(
            plots.memory_bars(
                {k: m["peak_memory_gib"] for k, m in mem["methods"].items()},
                plots.footer_text(env, "see docs/gpu_training_memory.json 'command'"),
                docs / PNG["gpu_memory"],
                "peak training memory per method (GPU; setup in the JSON)",
                "torch.cuda.max_memory_allocated over training steps, GiB",
            )
        )
    return written


# ---------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run_all",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, help="trained and exported run (runs/<name>); required unless --render-only")
    p.add_argument(
        "--docs", type=Path, default=DOCS, help="where the JSON inputs are and BENCHMARKS.md goes (default: docs)"
    )
    p.add_argument("--requests", type=int, default=200, help="timed requests per runtime / per serving-bench cell")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per runtime first")
    p.add_argument(
        "--threads", type=int, help="torch and ONNX Runtime threads (default: the libraries' default, all cores)"
    )
    p.add_argument("--export-repeats", type=int, default=20, help="timed calls per export-bench cell")
    p.add_argument(
        "--extra-onnx",
        type=Path,
        nargs="*",
        default=[],
        help="more exports of RUN's checkpoint for the export bench (e.g. runs/default_w8a8/onnx)",
    )
    p.add_argument("--skip-runtimes", action="store_true", help="do not re-measure latency/accuracy per runtime")
    p.add_argument("--skip-export-bench", action="store_true", help="do not run benchmarks/export_bench.py")
    p.add_argument(
        "--skip-serving", action="store_true", help="no tritonserver: no Triton runtime, no serving_bench.py"
    )
    p.add_argument(
        "--render-only", action="store_true", help="measure nothing; redraw BENCHMARKS.md and plots from docs/*.json"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cmd = "python -m benchmarks.run_all " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not a.render_only:
        if a.run is None:
            raise SystemExit("error: --run runs/<name> is required (or --render-only)")
        if a.requests < 1 or a.warmup < 0:
            raise SystemExit("error: --requests must be >= 1 and --warmup >= 0")
        check_run(a.run)
    a.docs.mkdir(parents=True, exist_ok=True)
    steps: dict = {}
    threads = ["--threads", str(a.threads)] if a.threads else []
    if not a.render_only and not a.skip_runtimes:
        print(
            "[bench] runtimes: PyTorch eager, ORT level 1 and 4" + ("" if a.skip_serving else ", Triton ensemble"),
            flush=True,
        )
        result = measure_runtimes(a.run, a.requests, a.warmup, a.threads, serve=not a.skip_serving)
        result["command"] = cmd
        (a.docs / RUNTIMES_JSON).write_text(json.dumps(result, indent=1) + "\n")
        steps["runtimes"] = {"status": "Measured in this run", "command": cmd}
    if not a.render_only and not a.skip_export_bench:
        steps["export"] = run_step(
            "export bench",
            [
                "-m",
                "benchmarks.export_bench",
                "--run",
                str(a.run),
                *threads,
                "--repeats",
                str(a.export_repeats),
                "--out-json",
                str(a.docs / "export_bench.json"),
                "--out-md",
                str(a.docs / "export_bench.md"),
                *(["--extra-onnx", *map(str, a.extra_onnx)] if a.extra_onnx else []),
            ],
        )
    if not a.render_only and not a.skip_serving:
        ort = ["--ort-threads", str(a.threads)] if a.threads else []
        steps["serving"] = run_step(
            "serving bench",
            [
                "-m",
                "benchmarks.serving_bench",
                "--run",
                str(a.run),
                *ort,
                "--requests",
                str(a.requests),
                "--out-dir",
                str(a.docs),
            ],
        )
    pngs = draw(a.docs, cmd)
    (a.docs / "BENCHMARKS.md").write_text(render(a.docs, cmd, steps))
    print(f"[bench] wrote {a.docs / 'BENCHMARKS.md'} and {', '.join(p.name for p in pngs) or 'no figures'}")
    failed = [k for k, s in steps.items() if s["status"].startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
