"""CPU latency of the exported graphs (ONNX Runtime) against PyTorch eager, on the same texts.

    python -m benchmarks.export_bench --run runs/default [--extra-onnx runs/default_w8a8/onnx]
                                      [--threads 2 [1 ...]] [--repeats N] [--runs 3]

Backbone + adapter, token ids in, logits out, at batch 1 and 32 with every sequence padded or
truncated to exactly 128 tokens (random real texts from checkpoint/heldout.jsonl). Engines:
  torch int8      the checkpoint as trained: GNP-IQ int8 backbone dequantized on the fly (eager fp32)
  torch fp32      the same weights dequantized once into plain nn.Linear/nn.Embedding (reference)
  ort P qdq       onnx/backbone.onnx + adapter.onnx (P = their precision) as exported (TensorRT's input)
  ort P exact     the same files, int8 weights folded to float once at load (export/cpu_graph.py)
  ort P int8      the same files, int8 GEMMs on the trained codes, activations quantized at run time
                  (the one the server picks for this export is marked "(served)", from parity.json)
  ort Q exact/int8  each --extra-onnx directory: another export of the same checkpoint (e.g. w8a8), in
                  both CPU runtimes (for w8a8, `int8` also runs the attention in float, fused)
torch and ONNX Runtime both run on --threads threads (default 2; several values give one table
each). The engines take turns: --rounds rounds, each giving every engine --warmup untimed calls and
then a block of --repeats/--rounds timed ones, so a slow spell of a shared machine hits all engines
(the rounds stop early after --cell-seconds per engine, keeping >= 5 calls each). Each cell is the
median and p90 of its timed calls. The whole measurement runs --runs times; a cell reports the
median over runs and every run's own ratio to torch fp32 (the spread). Also records backbone.onnx
size against an fp32 export, each engine's max |logits - torch int8| on the timed batch, the
held-out accuracy of each graph from the exports' parity.json, and the CPU's instruction sets
(int8 kernels differ between AVX2, AVX512-VNNI and AMX).
Writes --out-json and --out-md.

Contention probe: where other processes hold the cores, a multi-threaded op waits for its other
threads to be scheduled, so every parallel region costs a scheduler time slice (milliseconds, not
microseconds). Before and after each table a small LayerNorm is timed at N threads and at 1 thread;
when N threads are several times slower than 1, the table is flagged as contended.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.export_bench_report import (  # noqa: E402
    SEQ,  # noqa: E402  (one definition)
    table_section,
    write_markdown,
)
from export.cpu_graph import RUNTIMES

BATCHES = (1, 32)


def cpu_isa() -> str:
    """The instruction sets int8 and fp32 kernels pick from, as /proc/cpuinfo names them."""
    wanted = {
        "avx2": "AVX2",
        "avx512f": "AVX-512",
        "avx512_vnni": "AVX512-VNNI",
        "avx_vnni": "AVX-VNNI",
        "avx512_bf16": "AVX512-BF16",
        "amx_int8": "AMX-INT8",
        "amx_bf16": "AMX-BF16",
    }
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(name for flag, name in wanted.items() if flag in flags) or "none of AVX2/AVX-512/VNNI/AMX"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def make_batch(rows: list[dict], tokenizer, batch: int, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """`batch` random held-out texts, each padded or truncated to exactly SEQ tokens."""
    rng = random.Random(seed)
    picked = [rng.choice(rows) for _ in range(batch)]
    texts = [r["text"] for r in picked]
    pairs = [r.get("text_pair") for r in picked]
    enc = tokenizer(
        texts,
        pairs if any(p is not None for p in pairs) else None,
        padding="max_length",
        truncation=True,
        max_length=SEQ,
        return_tensors="pt",
    )
    out = {k: enc[k] for k in names}
    assert out["input_ids"].shape == (batch, SEQ)
    return out


def time_in_rounds(fns: dict, repeats: int, warmup: int, cell_seconds: float, rounds: int):
    """({engine: [ms per call]}, {engine: last output}) with the engines taking turns.

    Each of `rounds` rounds gives every engine a block of repeats/rounds timed calls after `warmup`
    untimed ones (which also absorb the other runtime's spinning threads). A slow spell of a shared
    machine then lands on every engine rather than on one cell, so the ratios hold better. Stops
    early once every engine has >= 5 calls and the rounds took longer than cell_seconds per engine.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict = {}
    block = max(1, -(-repeats // rounds))
    start = time.perf_counter()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                outputs[name] = fn()
            for _ in range(block):
                t0 = time.perf_counter()
                outputs[name] = fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        if min(map(len, times.values())) >= 5 and time.perf_counter() - start > cell_seconds * len(fns):
            break
    return times, outputs


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def torch_engines(model) -> dict:
    """torch int8 (as trained) and torch fp32 (dequantized once) callables: batch -> logits (numpy)."""
    from export.qdq import convert_for_export_

    fp32 = copy.deepcopy(model)
    convert_for_export_(fp32.tap.encoder, "fp32")
    fp32.eval()

    def runner(m):
        def run(batch):
            with torch.inference_mode():
                return m(batch)[0].numpy()

        return run

    return {"torch int8": runner(model), "torch fp32": runner(fp32)}


def ort_engines(onnx_dir: Path, threads: int, runtimes=RUNTIMES) -> dict:
    """backbone.onnx -> adapter.onnx as each CPU runtime runs them (export/cpu_graph.py): batch -> logits.

    Named `ort <precision> <runtime>`; the runtime the server picks for this export (parity.json) is
    marked `(served)`.
    """
    from export.ort_session import make_session
    from serving.artifacts import load_run

    engines = {}
    precision = _manifest_precision(onnx_dir) or "onnx"
    served = load_run(onnx_dir).served_runtime()  # the rule the server applies to this export
    for runtime in runtimes:
        backbone = make_session(onnx_dir / "backbone.onnx", threads, runtime=runtime)
        adapter = make_session(onnx_dir / "adapter.onnx", threads, runtime=runtime)
        names = [i.name for i in backbone.get_inputs()]

        def run(batch, backbone=backbone, adapter=adapter, names=names):
            feeds = {k: batch[k].numpy() for k in names}
            hs, cls = backbone.run(None, feeds)
            return adapter.run(
                None, {"hidden_states": hs, "cls_states": cls, "attention_mask": feeds["attention_mask"]}
            )[0]

        engines[f"ort {precision} {runtime}{' (served)' if runtime == served else ''}"] = run
    return engines


def export_accuracy(onnx_dir: Path) -> dict:
    """Held-out metric of PyTorch and of each ONNX Runtime graph the export's parity gate ran (parity.json)."""
    report = onnx_dir / "parity.json"
    if not report.is_file():
        return {}
    raw = json.loads(report.read_text())
    out = {"precision": raw.get("precision"), "served_runtime": raw.get("served_runtime")}
    for key, p in raw.get("parity", {}).items():
        e = p["end_to_end"]
        out[key] = {
            "runtime": p.get("runtime", "qdq"),
            "metric": e["metric"],
            "pytorch": e["metric_pytorch"],
            "onnxruntime": e["metric_onnxruntime"],
            "label_agreement": e["label_agreement"],
            "rows": p["rows"],
            "passed": p["passed"],
        }
    return out


def backbone_sizes(run: Path, model, meta: dict) -> dict:
    """backbone.onnx bytes against an fp32 export (from parity.json, else exported here)."""
    from export.onnx_export import export_backbone, onnx_size_bytes
    from export.pipeline import io_spec_for

    onnx_dir = run / "onnx"
    size = onnx_size_bytes(onnx_dir / "backbone.onnx")
    parity = json.loads((onnx_dir / "parity.json").read_text()) if (onnx_dir / "parity.json").is_file() else {}
    fp32 = parity.get("sizes", {}).get("backbone_fp32_bytes")
    source = "parity.json"
    if not fp32:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = onnx_size_bytes(
                export_backbone(model, io_spec_for(meta, "fp32").backbone, Path(tmp) / "b.onnx", "fp32")
            )
        source = "exported here"
    return {
        "backbone_onnx_bytes": size,
        "backbone_fp32_onnx_bytes": fp32,
        "ratio": size / fp32,
        "fp32_size_source": source,
        "precision": parity.get("precision") or _manifest_precision(onnx_dir),
    }


def _manifest_precision(onnx_dir: Path) -> str | None:
    m = onnx_dir / "manifest.json"
    return json.loads(m.read_text()).get("precision") if m.is_file() else None


def contention_probe(threads: int) -> dict:
    """ms per small LayerNorm at `threads` and at 1 thread; contended when N threads are far slower."""
    x, ln = torch.randn(1, SEQ, 384), torch.nn.LayerNorm(384)

    def ms(n: int) -> float:
        torch.set_num_threads(n)
        with torch.inference_mode():
            ln(x)
            t0 = time.perf_counter()
            for _ in range(50):
                ln(x)
        return (time.perf_counter() - t0) / 50 * 1e3

    one, many = ms(1), ms(threads)
    torch.set_num_threads(threads)
    return {
        "layernorm_ms_1_thread": one,
        "layernorm_ms_n_threads": many,
        "contended": threads > 1 and many > 4 * one + 0.05,
    }


def measure(
    engines: dict, batches: dict, repeats: int, warmup: int, cell_seconds: float, rounds: int = 4, log=print
) -> list[dict]:
    """Every engine on every batch, in rounds; ratios against the torch rows of the same batch size."""
    rows = []
    for bs, batch in batches.items():
        cell = {}
        all_times, outputs = time_in_rounds(
            {name: (lambda fn=fn, batch=batch: fn(batch)) for name, fn in engines.items()},
            repeats,
            warmup,
            cell_seconds,
            rounds,
        )
        for name, times in all_times.items():
            diff = float(np.abs(outputs[name] - outputs["torch int8"]).max())
            cell[name] = {
                "threads": torch.get_num_threads(),
                "engine": name,
                "batch": bs,
                "seq": SEQ,
                "median_ms": statistics.median(times),
                "p90_ms": p90(times),
                "repeats": len(times),
                "max_abs_logits_vs_torch_int8": diff,
            }
            log(
                f"[bench] batch {bs:>2} {name:<12} median {cell[name]['median_ms']:9.2f} ms  "
                f"p90 {cell[name]['p90_ms']:9.2f} ms  ({len(times)} repeats)"
            )
        for r in cell.values():
            r["speedup_vs_torch_int8"] = cell["torch int8"]["median_ms"] / r["median_ms"]
            r["speedup_vs_torch_fp32"] = cell["torch fp32"]["median_ms"] / r["median_ms"]
            r["latency_ratio_vs_torch_fp32"] = r["median_ms"] / cell["torch fp32"]["median_ms"]
            r["sequences_per_s"] = 1e3 * bs / r["median_ms"]
            rows.append(r)
    return rows


def combine_runs(runs: list[list[dict]]) -> list[dict]:
    """Per (batch, engine): the median over runs of each run's median, with every run's figures kept.

    Each run's ratio to torch fp32 comes from that run alone; `ratio_runs` lists them, so the
    spread between runs is read off the table rather than assumed.
    """
    out = []
    for cells in zip(*runs):
        first = dict(cells[0])
        medians = [c["median_ms"] for c in cells]
        ratios = [c["latency_ratio_vs_torch_fp32"] for c in cells]
        first.update(
            median_ms=statistics.median(medians),
            p90_ms=statistics.median(c["p90_ms"] for c in cells),
            repeats=sum(c["repeats"] for c in cells),
            median_ms_runs=medians,
            ratio_runs=ratios,
            latency_ratio_vs_torch_fp32=statistics.median(ratios),
            speedup_vs_torch_fp32=statistics.median(c["speedup_vs_torch_fp32"] for c in cells),
            speedup_vs_torch_int8=statistics.median(c["speedup_vs_torch_int8"] for c in cells),
            max_abs_logits_vs_torch_int8=max(c["max_abs_logits_vs_torch_int8"] for c in cells),
        )
        first["sequences_per_s"] = 1e3 * first["batch"] / first["median_ms"]
        out.append(first)
    return out


def run_tables(a, torch_fns: dict, batches: dict) -> list[dict]:
    """One table per thread count, each bracketed by a contention probe; --runs measurements combined."""
    tables = []
    for n in a.threads:
        torch.set_num_threads(n)
        before = contention_probe(n)
        engines = {**torch_fns, **ort_engines(a.run / "onnx", n)}
        for extra in a.extra_onnx:
            engines.update(ort_engines(extra, n, runtimes=("exact", "int8")))
        runs = []
        for i in range(a.runs):
            print(f"[bench] {n} thread(s): run {i + 1} of {a.runs}")
            runs.append(measure(engines, batches, a.repeats, a.warmup, a.cell_seconds, a.rounds))
        results = combine_runs(runs)
        tables.append({"threads": n, "probe_before": before, "probe_after": contention_probe(n), "results": results})
    return tables


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.export_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run directory with checkpoint/ and onnx/")
    p.add_argument(
        "--extra-onnx",
        type=Path,
        nargs="*",
        default=[],
        help="more export directories of the same checkpoint to time (their `exact` and `int8` runtimes) "
        "(e.g. a w8a8 export: runs/default_w8a8/onnx)",
    )
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="one table per value (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per engine and batch size")
    p.add_argument(
        "--runs", type=int, default=3, help="repeat the whole measurement this many times; the table gives the spread"
    )
    p.add_argument("--rounds", type=int, default=4, help="the engines take turns in this many blocks of calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each block")
    p.add_argument("--cell-seconds", type=float, default=30.0, help="stop a cell after this long (>= 5 repeats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", type=Path, default=Path("docs/export_bench.json"))
    p.add_argument("--out-md", type=Path, default=Path("docs/export_bench.md"))
    p.add_argument("--note", default="", help="a line added to the markdown (e.g. what the run is)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from training.checkpoint import load_checkpoint, read_examples

    if not (a.run / "onnx" / "backbone.onnx").is_file():
        print(
            f"error: {a.run / 'onnx' / 'backbone.onnx'} is missing: run `make export RUN={a.run}` first",
            file=sys.stderr,
        )
        return 2
    for extra in a.extra_onnx:
        if not (extra / "backbone.onnx").is_file():
            print(f"error: --extra-onnx {extra} has no backbone.onnx", file=sys.stderr)
            return 2
    model, cfg, meta, tokenizer = load_checkpoint(a.run / "checkpoint")
    rows = read_examples(a.run / "checkpoint")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if meta["backbone"]["has_token_type_ids"] else [])
    batches = {bs: make_batch(rows, tokenizer, bs, names, a.seed + bs) for bs in BATCHES}
    env = {
        "machine": f"{platform.node()} {platform.machine()}",
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": versions(),
    }
    t0 = time.perf_counter()
    tables = run_tables(a, torch_engines(model), batches)
    result = {
        "command": "python -m benchmarks.export_bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "run": str(a.run),
        "backbone": cfg.backbone.name,
        "task": meta["task"],
        "threads": a.threads,
        "repeats": a.repeats,
        "rounds": a.rounds,
        "warmup": a.warmup,
        "cell_seconds": a.cell_seconds,
        "seq": SEQ,
        "environment": env,
        "measure_time_s": time.perf_counter() - t0,
        "sizes": backbone_sizes(a.run, model, meta),
        "accuracy": {str(d): export_accuracy(d) for d in [a.run / "onnx", *a.extra_onnx]},
        "runs": a.runs,
        "tables": tables,
        "note": a.note,
    }
    for block in tables:
        print("\n".join(table_section(block)))
    s = result["sizes"]
    print(
        f"backbone.onnx {s['backbone_onnx_bytes']:,} bytes = {s['ratio']:.3f} x fp32 ({s['backbone_fp32_onnx_bytes']:,})"
    )
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2))
    write_markdown(a.out_md, result)
    print(f"[bench] wrote {a.out_json} and {a.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
