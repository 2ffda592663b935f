"""Training curves as a PNG: loss per logged step and validation accuracy per epoch."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(log_path: Path, out_png: Path, title: str = "") -> Path:
    steps, losses, epochs, accs = [], [], [], []
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec:
            steps.append(rec["step"])
            losses.append(rec["task_loss"])
        elif rec.get("event") == "eval":
            epochs.append(rec["epoch"])
            accs.append(rec["val_accuracy"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, losses, lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax2.plot(epochs, accs, marker="o")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
