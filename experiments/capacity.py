"""`python -m experiments.capacity`: spend the memory GNP-IQ saves on a wider side network or more experts?

Validation accuracy of MP-ISMoE against side width (reduction r) and expert count N, on one task
over seeds, beside each configuration's accounted training memory at the all-mpnet-base-v2
architecture (benchmarks/memory.py, batch 32) and the budget it must stay under: LST at r = 8.
Also the LayerNorm mode (frozen vs truncated). Writes DOCS/capacity.{json,md}; the defaults are
chosen from validation accuracy only, among configurations within the budget.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from training.cli import add_set_argument

from .harness import ROOT, run_training, training_command

CONFIGS = {  # label: overrides over configs/default.yaml
    "r8 N4 (default)": [],
    "r8 N8": ["moe.num_experts=8"],
    "r8 N16": ["moe.num_experts=16"],
    "r4 N4": ["side.reduction=4"],
    "r8 N4, truncated LayerNorm": ["quant.layernorm=truncated"],
}


def memory_rows(configs: dict, out: Path, threads: int) -> dict[str, float]:
    """Accounted GiB per configuration (and LST r=8) from benchmarks.memory at batch 32."""
    variants = [f"{label}|mp_ismoe|{','.join(o)}" for label, o in configs.items()]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--batch-sizes",
        "32",
        "--steps",
        "2",
        "--threads",
        str(threads),
        "--only",
        "LST",
        *configs,
        "--out",
        str(out),
        *[a for v in variants for a in ("--variant", v)],
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    return {r["label"]: r["accounted"] / 2**30 for r in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.capacity",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    add_set_argument(p, "config override for every run (repeatable)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/capacity"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    results = {}
    for label, overrides in CONFIGS.items():
        runs = {}
        for seed in args.seeds:
            out = args.out_dir / label.replace(" ", "_").replace(",", "") / f"seed{seed}"
            if (out / "metrics.json").is_file():
                runs[seed] = json.loads((out / "metrics.json").read_text())
                continue
            cmd = training_command(
                ROOT / "configs" / "default.yaml", out, [*overrides, f"train.seed={seed}", *args.overrides]
            )
            r = run_training(cmd, out, f"{label}/seed{seed}", echo="[train] test")
            if r["status"] == "ok":
                runs[seed] = r["metrics"]
        results[label] = {
            "overrides": overrides,
            "val": {s: m["val_accuracy"] for s, m in runs.items()},
            "test": {s: m["test_accuracy"] for s, m in runs.items()},
        }
    memory = memory_rows(CONFIGS, args.out_dir / "memory", args.threads)
    budget = memory["LST"]
    for label, r in results.items():
        r["accounted_gib"] = memory.get(label)
        r["within_budget"] = r["accounted_gib"] is not None and r["accounted_gib"] <= budget
    chosen = max(
        (lb for lb, r in results.items() if r["within_budget"] and r["val"]),
        key=lambda lb: statistics.fmean(results[lb]["val"].values()),
    )
    report = {
        "command": "python -m experiments.capacity " + shlex.join(sys.argv[1:] if argv is None else argv),
        "budget_gib": budget,
        "seeds": args.seeds,
        "results": results,
        "chosen": chosen,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Side width and expert count under LST's memory budget",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Budget: LST at r = 8, {budget:.3f} GiB accounted (all-mpnet-base-v2 architecture, batch 32, bf16; "
        "docs/memory.md). Accuracy: MiniLM on Rotten Tomatoes with configs/default.yaml"
        + (f" and `{' '.join(args.overrides)}`" if args.overrides else "")
        + f", seeds {args.seeds}; "
        "mean (x100) over seeds. Chosen by validation accuracy only.",
        "",
        "| configuration | accounted GiB | within budget | val accuracy | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for label, r in results.items():
        val, test = (statistics.fmean(r[k].values()) if r[k] else float("nan") for k in ("val", "test"))
        lines.append(
            f"| {label} | {r['accounted_gib']:.3f} | {'yes' if r['within_budget'] else 'no'} | "
            f"{100 * val:.2f} | {100 * test:.2f} |"
        )
    lines += ["", f"Highest validation accuracy within the budget: **{chosen}**.", ""]
    (args.docs / "capacity.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
