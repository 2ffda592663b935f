"""`python -m experiments.ablation`: the structure of the MP-ISMoE paper's Tables 3 and 4, on our data.

A fixed list of named variants, each a list of `--set` overrides stated in full over the base
config (so a base config cannot silently change what a row claims), run with the same seeds,
split and budget, one `python -m training` subprocess per (variant, seed). Rows that the paper's
tables share (e.g. "full MP-ISMoE" is also the "mixed precision", "learned noise", "with prior"
and "homogeneous experts" row) are trained once. Writes DOCS/ablation.md (tables + a "what our
data supports" section generated from the measured numbers only), DOCS/ablation.json and
DOCS/ablation.png. Like `experiments.compare`, this parent never imports torch, so each child's
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from experiments.ablation_report import plot, render_markdown  # noqa: E402
from experiments.ablation_variants import TABLES, VARIANTS, Variant  # noqa: E402,F401 (re-exported)
from training.cli import add_set_argument
from training.config import ConfigError, load_config

from .harness import run_training, training_command

EPILOG = (
    "variants:\n"
    + "\n".join(f"  {v.name:22s} {v.what}" for v in VARIANTS.values())
    + """

examples:
  PYTHONPATH=. python -m experiments.ablation --config configs/ablation.yaml --device cuda \\
      --set backbone.name=/path/to/all-MiniLM-L6-v2
  python -m experiments.ablation --only lst mp_ismoe --seeds 0 --set train.max_steps=20
"""
)


def collect_one(cmd: list[str], out: Path) -> dict:
    """A run trained earlier (possibly on another machine): its metrics.json, or why it is missing."""
    result = {"command": shlex.join(cmd), "wall_s": None, "out": str(out)}
    if (out / "metrics.json").is_file():
        m = json.loads((out / "metrics.json").read_text())
        return {**result, "status": "ok", "metrics": m, "wall_s": m.get("train_time_s")}
    return {**result, "status": "failed", "error": f"no metrics.json in {out} (run not finished)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std over the seeds that finished; cost columns averaged."""
    ok = [r["metrics"] for r in runs if r["status"] == "ok"]
    if not ok:
        return {"n": 0}
    acc_mean, acc_std = _mean_std([m["test_accuracy"] for m in ok])
    steps = [m["step_time_s_median"] for m in ok if m["step_time_s_median"] is not None]
    return {
        "n": len(ok),
        "test_accuracy_mean": acc_mean,
        "test_accuracy_std": acc_std,
        "test_accuracy": [m["test_accuracy"] for m in ok],
        "trainable_parameters": ok[0]["trainable_parameters"],
        "peak_memory_gib": statistics.fmean(m["peak_memory_gib"] for m in ok),
        "peak_memory_kind": ok[0]["peak_memory_kind"],
        "backbone_bytes_ratio": ok[0]["backbone_bytes_ratio"],
        "step_time_ms": 1000 * statistics.fmean(steps) if steps else None,
        "device": ok[0]["device"],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.ablation",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=Path("configs/ablation.yaml"), help="base YAML config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="NAME", help="run only these variants")
    add_set_argument(p, "override applied to every run, before the variant's own (repeatable)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="train.device for every run")
    p.add_argument("--out-dir", type=Path, default=Path("runs/ablation"), help="runs go to OUT_DIR/<variant>/seed<s>")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="where ablation.md/.json/.png go")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: aggregate the runs already under OUT_DIR (e.g. run in parallel elsewhere)",
    )
    p.add_argument("--machine", default=None, help="machine description for the report (default: this host)")
    return p.parse_args(argv)


def plan(args) -> tuple[list[str], dict[tuple[str, int], list[str]], object]:
    """Variants to run and each run's overrides, all validated here (cheap) before any training."""
    names = args.only or list(VARIANTS)
    common = args.overrides + ([f"train.device={args.device}"] if args.device else [])
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in common):
        raise ConfigError("--set train.seed: seeds are chosen with --seeds")
    runs = {(n, s): [*common, *VARIANTS[n].overrides, f"train.seed={s}"] for n in names for s in args.seeds}
    cfgs = [load_config(args.config, o) for o in runs.values()]
    return names, runs, cfgs[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(EPILOG.split("\n\nexamples")[0])
        return 0
    try:
        names, runs, cfg = plan(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0, results = time.perf_counter(), {n: [] for n in names}
    for i, ((name, seed), overrides) in enumerate(runs.items(), 1):
        out = args.out_dir / name / f"seed{seed}"
        cmd = training_command(args.config, out, overrides)
        if args.collect:
            results[name].append({"seed": seed, **collect_one(cmd, out)})
            continue
        print(f"[ablation] {i}/{len(runs)} {name} seed {seed}: log in {out / 'ablation.log'}", flush=True)
        r = run_training(cmd, out, f"{name} seed {seed}", "ablation.log", echo="[train] test accuracy")
        print(
            f"[ablation] {name} seed {seed}: "
            + (f"test acc {r['metrics']['test_accuracy']:.4f}" if r["status"] == "ok" else f"FAILED: {r['error']}")
            + f" ({r['wall_s']:.0f} s)",
            flush=True,
        )
        results[name].append({"seed": seed, **r})
    tables = [(t, [(n, lbl) for n, lbl in rows if n in results]) for t, rows in TABLES]
    variants = {
        n: {
            "what": VARIANTS[n].what,
            "overrides": list(VARIANTS[n].overrides),
            "runs": results[n],
            "summary": summarize(results[n]),
        }
        for n in names
    }
    ok = [r["metrics"] for rs in results.values() for r in rs if r["status"] == "ok"]
    t, d = cfg.train, cfg.data
    report = {
        "command": "python -m experiments.ablation " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": args.machine or f"{platform.node()} {platform.platform()}, {os.cpu_count()} CPUs",
        "wall_s": time.perf_counter() - t0,
        "seeds": args.seeds,
        "common_overrides": args.overrides,
        "devices": sorted({m["device"] for m in ok}),
        "memory_kinds": sorted({m["peak_memory_kind"] for m in ok}),
        "budget": {
            "backbone": cfg.backbone.name,
            "dataset": d.dataset,
            "max_examples": d.max_examples,
            "split_seed": d.split_seed,
            "epochs": t.epochs,
            "max_steps": t.max_steps,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "max_length": cfg.backbone.max_length,
        },
        "tables": [(title, rows) for title, rows in tables if len(rows) > 1] or [(t, r) for t, r in tables if r],
        "variants": variants,
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.docs / "ablation.md").write_text(render_markdown(report))
    plot(report, args.docs / "ablation.png")
    failed = [f"{n}/seed{r['seed']}" for n, rs in results.items() for r in rs if r["status"] != "ok"]
    print(
        f"[ablation] wrote {args.docs}/ablation.md, .json, .png in {report['wall_s'] / 60:.1f} min"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
