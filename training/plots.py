"""Training curves as a PNG: loss per logged step and validation accuracy per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, out_png: Path, title: str) -> Path:
    """Title, tight layout, 110 dpi PNG, figure closed: how every plot of the project is written."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_curves(log_path: Path, out_png: Path, title: str = "") -> Path:
    steps, losses, epochs, accs, metric = [], [], [], [], "val_accuracy"
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec:
            steps.append(rec["step"])
            losses.append(rec["task_loss"])
        elif rec.get("event") == "eval":
            epochs.append(rec["epoch"])
            metric = next(k for k in rec if k.startswith("val_") and k != "val_loss")
            accs.append(rec[metric])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, losses, lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax2.plot(epochs, accs, marker="o")
    ax2.set(xlabel="epoch", ylabel=f"validation {metric[4:]}", title=f"validation {metric[4:]}")
    return save_figure(fig, out_png, title)


def plot_router(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Four panels per epoch, one line per MoE block: gate entropy, max expert load, prior spread,
    expert weight similarity. None when the run has no MoE (nothing is written)."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    router = [r for r in records if r.get("event") == "router"]
    if not router:
        return None
    panels = (
        ("entropy", "gate entropy (nats)"),
        ("max_load", "largest expert load share"),
        ("prior_spread", "prior spread (std over experts)"),
        ("expert_similarity", "expert weight cosine"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (key, label) in zip(axes, panels):
        for j in range(len(router[0]["blocks"])):
            xs, ys = [], []
            for r in router:
                b = r["blocks"][j]
                value = max(b["load"]) if key == "max_load" else b.get(key)
                if value is not None:
                    xs.append(r["epoch"])
                    ys.append(value)
            if ys:
                ax.plot(xs, ys, marker="o", lw=1, label=f"block {router[0]['blocks'][j]['block']}")
        ax.set(xlabel="epoch", title=label)
    axes[0].axhline(router[0]["blocks"][0]["entropy_uniform"], ls=":", c="grey", label="uniform")
    axes[0].legend(fontsize=6)
    return save_figure(fig, out_png, title)


def plot_noise(log_path: Path, out_png: Path, title: str = "") -> Path | None:
    """GNP-IQ per re-quantization event: mean mu and sigma (= softplus(rho)) over tensors, and the
    relative quantization error (paper Eq. 4) before and after. None when the run had no event."""
    events = [
        r for r in (json.loads(line) for line in Path(log_path).read_text().splitlines()) if r.get("event") == "requant"
    ]
    if not events:
        return None
    x = [e["index"] + 1 for e in events]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(x, [e["mu_mean"] for e in events], marker="o", label="mu (mean over tensors)")
    ax1.plot(x, [e["sigma_mean"] for e in events], marker="s", label="sigma = softplus(rho)")
    ax1.set(xlabel="re-quantization event", ylabel="units of the row scale s", title="learned noise")
    ax1.legend(fontsize=7)
    ax2.plot(x, [e["rel_error_before"] for e in events], marker="o", label="before")
    ax2.plot(x, [e["rel_error_after"] for e in events], marker="s", label="after")
    ax2.set(xlabel="re-quantization event", ylabel="relative error (Eq. 4)", title="quantization error")
    ax2.legend(fontsize=7)
    return save_figure(fig, out_png, title)
