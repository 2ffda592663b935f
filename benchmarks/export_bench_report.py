"""docs/export_bench.md and the BENCHMARKS.md section from the export benchmark's JSON (benchmarks/export_bench.py)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import absent, load_json

SEQ = 128  # the sequence length every cell runs at (benchmarks/export_bench.py)


def format_table(rows: list[dict]) -> list[str]:
    head = (
        "| batch | engine | median ms | p90 ms | repeats | latency / torch fp32 | each run | x vs torch int8 "
        "| x vs torch fp32 | seq/s | max abs logits vs torch int8 |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        each = " / ".join(f"{x:.2f}" for x in r.get("ratio_runs", [r["latency_ratio_vs_torch_fp32"]]))
        lines.append(
            f"| {r['batch']} | {r['engine']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['repeats']} "
            f"| **{r['latency_ratio_vs_torch_fp32']:.2f}** | {each} | {r['speedup_vs_torch_int8']:.2f} "
            f"| {r['speedup_vs_torch_fp32']:.2f} "
            f"| {r['sequences_per_s']:.1f} | {r['max_abs_logits_vs_torch_int8']:.2e} |"
        )
    return lines


def table_section(block: dict) -> list[str]:
    n = block["threads"]
    lines = [
        f"## {n} thread{'s' if n > 1 else ''}",
        "",
        f"torch: {n} intra-op thread(s), 1 inter-op; ONNX Runtime: {n} intra-op thread(s), 1 inter-op.",
        "",
    ]
    probes = (block["probe_before"], block["probe_after"])
    if any(p["contended"] for p in probes):
        seen = " / ".join(
            f"{p['layernorm_ms_n_threads']:.2f} ms at {n} threads vs {p['layernorm_ms_1_thread']:.3f} ms at 1 thread"
            for p in probes
        )
        lines += [
            f"**Contended.** A 128x384 LayerNorm took {seen} (before / after): other processes held these "
            "cores, so every parallel region waited for a time slice. This table measures the machine's "
            "scheduling more than the models; read the 1-thread table, or re-run on idle cores.",
            "",
        ]
    return lines + format_table(block["results"]) + [""]


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def accuracy_section(accuracy: dict) -> list[str]:
    """Held-out metric of each graph its export's parity gate ran (from parity.json), beside the timings."""
    rows = [
        f"| `{d}` ({a['precision']}) | {key} ({p['runtime']}) | {p['pytorch']:.4f} | {p['onnxruntime']:.4f} "
        f"| {p['onnxruntime'] - p['pytorch']:+.4f} | {_fraction(p['label_agreement'])} "
        f"| {'passed' if p['passed'] else 'FAILED'}{' (served)' if p['runtime'] == a.get('served_runtime') else ''} |"
        for d, a in accuracy.items()
        for key, p in a.items()
        if isinstance(p, dict)
    ]
    if not rows:
        return []
    return [
        "Held-out accuracy of each graph (from the export's parity.json; PyTorch = the checkpoint):",
        "",
        "| export | graph (runtime) | PyTorch | ONNX Runtime | difference | label agreement | gate |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def write_markdown(path: Path, result: dict) -> None:
    s, e = result["sizes"], result["environment"]
    lines = [
        "# Export benchmark: ONNX Runtime vs PyTorch eager (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date']}  ",
        f"Machine: {e['machine']}, {e['cpu']}, {e['cpu_count']} logical CPUs visible, load average at start "
        f"{', '.join(f'{x:.1f}' for x in e['load_average'])} (1/5/15 min)  ",
        f"Instruction sets: {e.get('isa', 'not recorded')}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items()) + "  ",
        f"Run: `{result['run']}` ({result['backbone']}, {result['task']}, precision {s['precision']})",
        "",
        f"Each call is token ids -> logits (backbone then adapter) on sequences of exactly {SEQ} tokens (random "
        f"held-out texts, padded/truncated); the engines take turns in {result.get('rounds', 1)} round(s), each a "
        f"block of calls after {result['warmup']} untimed one(s); up to {result['repeats']} timed calls per cell "
        f"(cap {result['cell_seconds']} s per engine); the whole measurement ran {result.get('runs', 1)} time(s) "
        f"in this process, {result['measure_time_s']:.0f} s in all. A cell is the median over runs of each run's "
        "median; `latency / torch fp32` is the median of the runs' own ratios, `each run` lists them (the spread). "
        "`x vs ...` is the ratio of median latencies (higher = faster than that PyTorch engine).",
        "",
    ]
    for block in result["tables"]:
        lines += table_section(block)
    lines += accuracy_section(result.get("accuracy", {}))
    lines += [
        "| size | bytes |",
        "|---|---|",
        f"| backbone.onnx (+ .data), {s['precision']} | {s['backbone_onnx_bytes']:,} |",
        f"| fp32 backbone export ({s['fp32_size_source']}) | {s['backbone_fp32_onnx_bytes']:,} |",
        f"| ratio | {s['ratio']:.3f} |",
        "",
        "Engines: `torch int8` = the checkpoint as trained (int8 codes dequantized on the fly in every "
        "forward); `torch fp32` = the same weights dequantized once into nn.Linear/nn.Embedding; "
        "`ort P R` = the graphs exported in precision P as ONNX Runtime runs them in CPU runtime R "
        "(export/cpu_graph.py): `qdq` the file as exported (TensorRT's input), `exact` int8 weights folded to "
        "float once at load, `int8` int8 GEMMs on the trained codes with activations quantized at run time; "
        "`(served)` marks the one the server runs for that export. Issue 17 targets: served <= 0.8 at "
        "batch 1 and 32; w8a8 <= 0.6 at batch 32.",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    path.write_text("\n".join(lines) + "\n")


def summary(docs: Path, status: str = "Not re-measured in this run") -> list[str]:
    """This benchmark's section of docs/BENCHMARKS.md, from docs/export_bench.json (its own schema)."""
    data = load_json(docs / "export_bench.json")
    out = ["## Exported graphs vs PyTorch (batch 1 and 32, sequence 128)", ""]
    if not data:
        return out + absent("docs/export_bench.json", "python -m benchmarks.export_bench --run runs/<name>")
    e, s = data["environment"], data["sizes"]
    out += [
        f"{status}. From `docs/export_bench.json` ({data['date']} UTC, {e['cpu']} [{e.get('isa', 'ISA not recorded')}], "
        f"{e['cpu_count']} CPUs, "
        f"threads {data['threads']}, run `{data['run']}`); command `{data['command']}`. Full table: "
        "[export_bench.md](export_bench.md).",
        "",
        "| batch | engine | median ms | p90 ms | latency / torch fp32 | x vs torch int8 | max abs logits vs torch int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    tables = data.get("tables") or [
        {"threads": data["threads"], "results": data["results"]}
    ]  # one table per thread count
    for t in tables:
        out += [
            f"| {r['batch']} ({t['threads']} thr) | {r['engine']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['latency_ratio_vs_torch_fp32']:.2f} | {r['speedup_vs_torch_int8']:.2f} | {r['max_abs_logits_vs_torch_int8']:.2e} |"
            for r in t["results"]
        ]
    out += [
        "",
        f"backbone.onnx ({s['precision']}): {s['backbone_onnx_bytes']:,} bytes = {s['ratio']:.3f} x the fp32 "
        f"export ({s['backbone_fp32_onnx_bytes']:,} bytes).",
        "",
    ]
    return out
