"""docs/export_bench.md and the BENCHMARKS.md section from the export benchmark's JSON (benchmarks/export_bench.py)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import absent, load_json

SEQ = 128  # the sequence length every cell runs at (benchmarks/export_bench.py)


def format_table(rows: list[dict]) -> list[str]:
    head = (
        "| batch | engine | median ms | p90 ms | repeats | latency / torch fp32 | x vs torch int8 | x vs torch fp32 "
        "| seq/s | max abs logits vs torch int8 |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['engine']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['repeats']} "
            f"| {r['latency_ratio_vs_torch_fp32']:.2f} | {r['speedup_vs_torch_int8']:.2f} "
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


def write_markdown(path: Path, result: dict) -> None:
    s, e = result["sizes"], result["environment"]
    lines = [
        "# Export benchmark: ONNX Runtime vs PyTorch eager (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date']}  ",
        f"Machine: {e['machine']}, {e['cpu']}, {e['cpu_count']} logical CPUs visible, load average at start "
        f"{', '.join(f'{x:.1f}' for x in e['load_average'])} (1/5/15 min)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items()) + "  ",
        f"Run: `{result['run']}` ({result['backbone']}, {result['task']}, precision {s['precision']})",
        "",
        f"Each call is token ids -> logits (backbone then adapter) on sequences of exactly {SEQ} tokens (random "
        f"held-out texts, padded/truncated); the engines take turns in {result.get('rounds', 1)} round(s), each a "
        f"block of calls after {result['warmup']} untimed one(s); up to {result['repeats']} timed calls per cell "
        f"(cap {result['cell_seconds']} s per engine); {result['measure_time_s']:.0f} s of measuring in all. "
        "`x vs ...` is the ratio of median latencies (higher = faster than that PyTorch engine), within one "
        "thread setting of this one run.",
        "",
    ]
    for block in result["tables"]:
        lines += table_section(block)
    lines += [
        "| size | bytes |",
        "|---|---|",
        f"| backbone.onnx (+ .data), {s['precision']} | {s['backbone_onnx_bytes']:,} |",
        f"| fp32 backbone export ({s['fp32_size_source']}) | {s['backbone_fp32_onnx_bytes']:,} |",
        f"| ratio | {s['ratio']:.3f} |",
        "",
        "Engines: `torch int8` = the checkpoint as trained (int8 codes dequantized on the fly in every "
        "forward); `torch fp32` = the same weights dequantized once into nn.Linear/nn.Embedding; "
        "`ort P LN` = graphs exported in precision P, run with `session.qdq_matmulnbits_accuracy_level=N` "
        "(1: fp32 activations, exact; 4: int8 activations inside MatMulNBits; w8a8 graphs run int8 "
        "GEMMs at any level). `latency / torch fp32` is the ratio issue 3 targets (<= 0.6 at batch 32).",
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
        f"{status}. From `docs/export_bench.json` ({data['date']} UTC, {e['cpu']}, {e['cpu_count']} CPUs, "
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
