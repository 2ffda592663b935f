"""docs/memory.md, memory.png and the BENCHMARKS.md section from the memory benchmark's JSON (benchmarks/memory.py)."""

from __future__ import annotations

from pathlib import Path

CATEGORIES = ("parameters", "gradients", "optimizer", "activations")


def gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def ratios(rows: list[dict], pairs: list[dict], batch: int) -> dict:
    """MP-ISMoE's accounted bytes against full FT, LoRA and LST, and its step time against LST's (paired)."""
    at = {r["label"]: r for r in rows if r["batch"] == batch}
    ours = at["MP-ISMoE"]
    pair = next(p["median_s"] for p in pairs if p["batch"] == batch)
    return {
        "vs_full_ft": ours["accounted"] / at["full FT"]["accounted"],
        "vs_lora": ours["accounted"] / at["LoRA"]["accounted"],
        "vs_lst": ours["accounted"] / at["LST"]["accounted"],
        "step_time_vs_lst": pair["MP-ISMoE"] / pair["LST"],
        "step_time_s": pair,
    }


def render_markdown(report: dict) -> str:
    lines = [
        "# Training memory, accounted",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['environment']['cpu']}, "
        f"{report['environment']['cpu_count']} CPUs, torch {report['environment']['versions']['torch']}, "
        f"{report['environment']['date']}; {report['threads']} threads.  ",
        f"Setting: all-mpnet-base-v2 architecture (12 x 768, random weights), sequence {report['seq']}, "
        f"{'bf16 autocast' if report['amp'] == 'bf16' else 'fp32'}, AdamW; each configuration in its own process.",
        "",
        "How it is counted: `benchmarks/memory.py` (each storage once; saved activations by "
        "`saved_tensors_hooks`). Peak RSS includes the Python process, transient buffers and the "
        "allocator's slack: a cross-check, not the figure compared.",
        "",
    ]
    for batch in report["batch_sizes"]:
        rows = [r for r in report["rows"] if r["batch"] == batch]
        full = next(r for r in rows if r["label"] == "full FT")["accounted"]
        lines += [
            f"## Batch {batch}",
            "",
            "| method | parameters | gradients | optimizer | activations | accounted GiB | vs full FT | peak RSS GiB | step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['label']} | {gib(r['parameters'])} | {gib(r['gradients'])} | {gib(r['optimizer'])} | "
            f"{gib(r['activations'])} | **{gib(r['accounted'])}** | {r['accounted'] / full:.3f}x | "
            f"{r['peak_rss_gib']:.2f} | {r['step_time_s_median']:.2f} |"
            for r in rows
        ]
        q = report["ratios"][str(batch)]
        lines += [
            "",
            f"MP-ISMoE: **{q['vs_full_ft']:.3f}x** full FT, {q['vs_lora']:.3f}x LoRA, {q['vs_lst']:.3f}x LST "
            f"accounted. Step time, LST and MP-ISMoE taking turns in one process ({report['rounds']} rounds): "
            f"median {q['step_time_s']['MP-ISMoE']:.2f} s vs {q['step_time_s']['LST']:.2f} s, "
            f"**{q['step_time_vs_lst']:.2f}x** LST's. The step-time column above is each configuration alone "
            f"({report['steps'] - 1} steps after a warm-up): indicative only.",
            "",
        ]
    lines += ["GPU: " + report.get("gpu_note", "not measured in this run."), ""]
    return "\n".join(lines)


def plot(report: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = report["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in report["rows"] if r["batch"] == batch]
        bottom = [0.0] * len(rows)
        for i, cat in enumerate(CATEGORIES):
            values = [r[cat] / 2**30 for r in rows]
            ax.barh([r["label"] for r in rows], values, left=bottom, color=f"C{i}", label=cat)
            bottom = [b + v for b, v in zip(bottom, values)]
        for y, r in enumerate(rows):
            ax.annotate(
                f"{r['accounted'] / 2**30:.2f} GiB",
                (bottom[y], y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        ax.invert_yaxis()
        ax.set(xlabel="GiB (accounted)", title=f"batch {batch}, sequence {report['seq']}")
        ax.legend(fontsize=7, loc="lower right")
    from training.plots import save_figure

    return save_figure(fig, png, "Training memory at the all-mpnet-base-v2 architecture, by category")


def summary(docs: Path) -> list[str]:
    """This benchmark's section of docs/BENCHMARKS.md, from docs/memory.json (its own schema)."""
    from benchmarks.report import absent, load_json

    out = ["## Training memory by category", ""]
    data = load_json(docs / "memory.json")
    if not data or "ratios" not in data:
        return out + absent("docs/memory.json with every method", "python -m benchmarks.memory")
    out += [
        f"From `docs/memory.json` ({data['environment']['date']}; command `{data['command']}`): "
        "all-mpnet-base-v2 architecture, sequence 128, accounted bytes of parameters, gradients, optimizer "
        "state and saved activations. Details: [memory.md](memory.md).",
        "",
        "| batch | MP-ISMoE vs full FT | vs LoRA | vs LST | step time vs LST (paired) |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {b} | {q['vs_full_ft']:.3f}x | {q['vs_lora']:.3f}x | {q['vs_lst']:.3f}x | {q['step_time_vs_lst']:.2f}x |"
        for b, q in data["ratios"].items()
    ]
    return out + ["", "![training memory by category](memory.png)", ""]
