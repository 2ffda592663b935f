"""The figures of docs/BENCHMARKS.md. Each states, under the plot, the machine, versions, date and
the command that reproduces it; each takes plain dicts/arrays so it can be redrawn from saved JSON.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RUNTIME_ORDER = ("PyTorch eager", "ORT level 1", "ORT level 4", "Triton ensemble")


def footer_text(env: dict, command: str) -> str:
    """Two lines: machine + versions + date, and the command to reproduce."""
    v = env.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "nvidia-pytriton") if v.get(k))
    machine = f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} CPUs" if "gpu" not in env else env["gpu"]
    lines = textwrap.wrap(f"reproduce: {command}", 125, subsequent_indent="  ", break_on_hyphens=False)
    if len(lines) > 4:
        lines = lines[:3] + ["  ... (the full command is in the JSON file this figure is drawn from)"]
    return "\n".join([f"{machine}; {versions}; {env.get('date', '?')}", *lines])


def _finish(fig, footer: str, png: Path) -> Path:
    fig.text(0.01, 0.005, footer, fontsize=6.5, color="0.35", va="bottom", ha="left", family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.028 * (footer.count("\n") + 1), 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def latency_bars(summary: dict[str, dict], footer: str, png: Path, title: str) -> Path:
    """p50 bars per runtime with a p99 marker; the x-factor against the first runtime on each bar."""
    names = [n for n in RUNTIME_ORDER if n in summary] + [n for n in summary if n not in RUNTIME_ORDER]
    p50 = np.array([summary[n]["p50_ms"] for n in names])
    p99 = np.array([summary[n]["p99_ms"] for n in names])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bars = ax.bar(names, p50, color=[f"C{i}" for i in range(len(names))], label="p50 (median)")
    ax.scatter(names, p99, marker="_", s=600, color="black", label="p99", zorder=3)
    for bar, v in zip(bars, p50):
        ax.annotate(
            f"{v:.1f} ms\n{v / p50[0]:.2f}x",
            (bar.get_x() + bar.get_width() / 2, v),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set(ylabel="latency per request, ms (one example)", title=title)
    ax.set_ylim(0, max(p99.max(), p50.max()) * 1.25)
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, footer, png)


def latency_histogram(ms: np.ndarray, footer: str, png: Path, title: str) -> Path:
    """Distribution of single-request latencies with p50 and p99 lines."""
    ms = np.asarray(ms, dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    hi = np.percentile(ms, 99.5)
    ax.hist(np.clip(ms, None, hi), bins=40, color="C3", alpha=0.8)
    for q, style in ((50, "-"), (99, "--")):
        v = np.percentile(ms, q)
        ax.axvline(v, color="black", ls=style, lw=1)
        ax.annotate(
            f"p{q} {v:.1f} ms", (v, ax.get_ylim()[1] * 0.92), xytext=(4, 0), textcoords="offset points", fontsize=8
        )
    ax.set(
        xlabel=f"latency, ms ({ms.size} requests; the top 0.5% clipped into the last bin)",
        ylabel="requests",
        title=title,
    )
    return _finish(fig, footer, png)


def accuracy_vs_memory(points: list[dict], footer: str, png: Path, title: str) -> Path:
    """One point per method: peak training memory (x) against test accuracy (y)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, p in enumerate(points):
        ax.scatter(p["memory_gib"], p["accuracy"], s=60, color=f"C{i}")
        ax.annotate(p["name"], (p["memory_gib"], p["accuracy"]), xytext=(6, 4), textcoords="offset points")
    kinds = sorted({p["memory_kind"] for p in points})
    ax.set(xlabel=f"peak training memory, GiB ({', '.join(kinds)})", ylabel="test accuracy", title=title)
    ax.margins(0.25)
    return _finish(fig, footer, png)


def memory_bars(methods: dict[str, float], footer: str, png: Path, title: str, xlabel: str) -> Path:
    """Horizontal bars of peak training memory per method (GPU runs: no accuracy to pair it with)."""
    names = list(methods)
    values = [methods[n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 2.0))
    ax.barh(names, values, color=[f"C{i}" for i in range(len(names))])
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set(xlabel=xlabel, title=title)
    ax.margins(x=0.15)
    return _finish(fig, footer, png)


# ---------------------------------------------------------------- docs/method_diagram.png


def _box(ax, x, y, w, h, text, color, fontsize=8, style="round,pad=0.3"):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec="0.3", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, a, b, text="", style="-|>", ls="-", color="0.25", fontsize=7, offset=(0, 1.2)):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, lw=0.9, ls=ls, color=color))
    if text:
        ax.text(
            (a[0] + b[0]) / 2 + offset[0],
            (a[1] + b[1]) / 2 + offset[1],
            text,
            ha="center",
            fontsize=fontsize,
            color=color,
        )


def _method_panel(ax) -> None:
    ax.set(xlim=(0, 100), ylim=(0, 62), title="Training and the exported graphs: backbone.onnx -> adapter.onnx")
    ax.axis("off")
    rows = [
        ("embeddings\n(int8 rows, gathered then dequantized)", 3, "0"),
        ("layer 1", 16, "1"),
        ("layer 2", 27, "2"),
        ("layer L", 43, "L"),
    ]
    ax.text(14, 38, "...", ha="center", fontsize=12)
    ax.text(
        14,
        53.5,
        "frozen backbone (GNP-IQ)\nint8 codes + per-row s, z;\nLayerNorm and biases fp32",
        ha="center",
        fontsize=8,
    )
    for text, y, i in rows:
        _box(ax, 3, y, 22, 7, text, "#dbe8f6")
        _arrow(ax, (25.6, y + 2.5), (33, y + 2.5), "tap" if i == "1" else "", offset=(0, 0.6))
        _box(ax, 33, y + 0.7, 10, 3.6, f"down_{i}: D -> D/r", "#fdebd0", fontsize=7)
        side = "side input h" if i == "0" else f"side block {i}: attention\n+ ISMoE (top-k of N experts)"
        _box(ax, 52, y, 22, 7, side, "#d5f5e3", fontsize=7)
        _arrow(ax, (43.6, y + 2.5), (52, y + 2.5), f"gate g_{i}" if i == "1" else "", offset=(0, 0.6))
        if i != "0":
            _arrow(
                ax,
                (25.6, y + 5.8),
                (52, y + 5.8),
                "[CLS] vector -> router prior c" if i == "1" else "",
                ls="--",
                color="#a04000",
                offset=(0, 0.6),
            )
    for y0, y1 in ((10.3, 16), (23.3, 27), (34.3, 43)):
        _arrow(ax, (63, y0), (63, y1))
    _box(ax, 79, 43, 18, 7, "pool, upsample to D\n(+ pooled backbone)\n-> head -> logits", "#f9e79f", fontsize=7)
    _arrow(ax, (74.6, 46.5), (79, 46.5))
    ax.text(
        88,
        3,
        "ladder:\n h = g_i*h + (1-g_i)*down_i(h_i)\n g_i = sigmoid(alpha_i/0.1), alpha_i=0\n\n"
        "ISMoE router, fp32:\n p  = softmax(W_g x)\n c  = softmax(h_cls r^T/sqrt(D))\n g' = (p + c) / 2\n"
        " top-k of g', renormalised\n all N experts computed densely,\n combined by a scattered gate\n\n"
        "trained: side network, head,\nLayerNorm affines (truncated);\nbackbone runs under no_grad",
        fontsize=6.5,
        ha="center",
        va="bottom",
        family="monospace",
        multialignment="left",
        bbox={"fc": "white", "ec": "0.6", "boxstyle": "round,pad=0.4"},
    )


def _ensemble_panel(ax) -> None:
    ax.set(xlim=(0, 100), ylim=(0, 30), title="Serving: the Triton ensemble <task> (one backbone shared by every task)")
    ax.axis("off")
    chain = [
        ("text\n(+ text_pair)", 1, "#eeeeee"),
        ("tokenizer\npython: tokenizers", 17, "#fdebd0"),
        ("backbone\nONNX Runtime (cpu) or\ntensorrt_plan (gpu)", 35, "#dbe8f6"),
        ("adapter_<task>\nsame backend", 56, "#d5f5e3"),
        ("postprocess_<task>\nsoftmax, arg-max", 74, "#f9e79f"),
    ]
    for text, x, color in chain:
        _box(ax, x, 15, 14 if x != 35 else 17, 8, text, color, fontsize=7)
    for (_, x0, _), (_, x1, _) in zip(chain, chain[1:]):
        _arrow(ax, (x0 + (14 if x0 != 35 else 17) + 0.6, 19), (x1, 19))
    _box(ax, 91, 15, 8, 8, "label,\nprobs", "#eeeeee", fontsize=7)
    _arrow(ax, (88.6, 19), (91, 19))
    _box(ax, 56, 2, 14, 7, "adapter_<task2>", "#d5f5e3", fontsize=7)
    _box(ax, 74, 2, 14, 7, "postprocess_<task2>", "#f9e79f", fontsize=7)
    _arrow(ax, (52.6, 16), (56, 6), "ensemble <task2>", offset=(-7, -2.5))
    _arrow(ax, (70.6, 5.5), (74, 5.5))
    ax.text(
        26,
        6,
        "ids, mask (B, T)  ->  hidden_states (B, K, T, D), cls_states (B, K-1, D)  ->  logits (B, C)",
        fontsize=6.5,
        ha="center",
        family="monospace",
    )


def method_diagram(png: Path) -> Path:
    """docs/method_diagram.png: the MP-ISMoE model and the Triton ensemble."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8.2), gridspec_kw={"height_ratios": [2.1, 1]})
    _method_panel(top)
    _ensemble_panel(bottom)
    fig.text(
        0.01,
        0.005,
        "drawn by benchmarks/plots.py: python -m benchmarks.plots --method-diagram docs/method_diagram.png",
        fontsize=6.5,
        color="0.35",
        family="monospace",
    )
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description="Redraw the method diagram.")
    parser.add_argument("--method-diagram", type=Path, default=Path("docs/method_diagram.png"))
    print(method_diagram(parser.parse_args().method_diagram))
