"""`python -m experiments.compare`: every method on every task over paired seeds, learning rates tuned on validation.

For each task and method, each learning rate of the method's grid trains once at the first seed and
the one with the best *validation* metric is kept (the test split is never looked at while
choosing); that rate then trains at every seed. Seeds are paired: a seed fixes the initialisation
and the data order, identical across methods. One `python -m training` subprocess per run
(experiments/harness.py), each run's directory reused when it already holds this exact command's
results, so an interrupted comparison resumes. Writes DOCS/compare.{json,md,png}.

The parent never imports torch: Linux carries a parent's RSS high-water mark into the child's
ru_maxrss across fork + exec, so a heavy parent would inflate every child's peak-memory figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from training.cli import add_set_argument
from training.config import METHOD_PRESETS, METHODS, ConfigError, load_config

from .harness import ROOT, run_training, training_command
from .report import plot, render_markdown
from .tasks import TASKS, metric_value

NAMES = {
    "linear_probe": "linear probe",
    "full_ft": "full FT",
    "lora": "LoRA",
    "bitfit": "BitFit",
    "lst": "LST",
    "mp_ismoe": "MP-ISMoE",
}
# Learning-rate grids per method (AdamW, warmup + linear decay): the usual range of each, three points.
LR_GRID = {
    "linear_probe": (1e-3, 3e-3, 1e-2),  # a head on frozen features
    "full_ft": (2e-5, 5e-5, 1e-4),  # BERT-style fine-tuning rates
    "lora": (2e-4, 5e-4, 1e-3),  # low-rank deltas start at zero and need a larger step
    "bitfit": (3e-4, 1e-3, 3e-3),  # biases only
    "lst": (5e-4, 1e-3, 3e-3),
    "mp_ismoe": (5e-4, 1e-3, 3e-3),  # side networks from a pruned init
}
EXTEND_MAX = 2  # grid points added past a winning edge
EPILOG = (
    """examples:
  python -m experiments.compare --tasks rotten_tomatoes bbc_news --seeds 0 1 2 3 4 \\
      --set data.max_examples=3000 --set train.epochs=3 --set train.threads=2
  python -m experiments.compare --methods lst mp_ismoe --lr mp_ismoe=1e-3 --seeds 0 1   # no tuning for mp_ismoe
  python -m experiments.compare ... --collect      # only re-render from the runs already on disk

learning-rate grids (tuned on validation at the first seed, extended by the grid's ratio past a
winning edge, at most 2 points; --lr METHOD=LR fixes one):
  """
    + "\n  ".join(f"{m:<13} {', '.join(f'{lr:g}' for lr in grid)}" for m, grid in LR_GRID.items())
    + "\n"
)


def method_overrides(method: str, lr: float) -> list[str]:
    """The preset's section values, stated explicitly, and the learning rate."""
    preset = [f"{s}.{k}={json.dumps(v)}" for s, vals in METHOD_PRESETS[method].items() for k, v in vals.items()]
    return [f"train.method={method}", *preset, f"train.lr={lr:g}"]


def run_dir(args, task: str, method: str, lr: float, seed: int) -> Path:
    return args.out_dir / task / method / f"lr{lr:g}" / f"seed{seed}"


def command(args, task: str, method: str, lr: float, seed: int) -> list[str]:
    sets = [*TASKS[task].overrides, *method_overrides(method, lr), f"train.seed={seed}", *args.overrides]
    return training_command(args.config, run_dir(args, task, method, lr, seed), sets)


def train(args, task: str, method: str, lr: float, seed: int) -> dict:
    """One run, or its earlier result when the directory holds this exact command's metrics."""
    cmd, out = command(args, task, method, lr, seed), run_dir(args, task, method, lr, seed)
    stamp = out / "command.json"
    if (out / "metrics.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == cmd[1:]:
        return {"status": "ok", "metrics": json.loads((out / "metrics.json").read_text()), "reused": True}
    if args.collect:
        return {"status": "missing", "error": f"no finished run in {out}"}
    label = f"{task}/{method}/lr{lr:g}/seed{seed}"
    print(f"[compare] {label}", flush=True)
    r = run_training(cmd, out, label, "compare.log", echo="[train] test")
    if r["status"] == "ok":
        stamp.write_text(json.dumps(cmd[1:]))
    return r


def figures(task: str, r: dict) -> dict:
    """What the report keeps of one run."""
    if r["status"] != "ok":
        return {"status": r["status"], "error": r.get("error")}
    m, metric = r["metrics"], TASKS[task].metric
    return {
        "status": "ok",
        "test": metric_value(m, metric, "test"),
        "val": metric_value(m, metric, "val"),
        "peak_memory_gib": m["peak_memory_gib"],
        "peak_memory_kind": m["peak_memory_kind"],
        "step_time_s": m["step_time_s_median"],
        "trainable_parameters": m["trainable_parameters"],
        "train_time_s": m.get("train_time_s"),
    }


def tuned_rates(args, task: str, method: str) -> dict[float, dict]:
    """Validation figures at the first seed for each rate of the grid, extended past an edge that wins.

    A best rate at the grid's edge says the optimum may lie beyond it: the grid then grows by its
    own ratio on that side, up to EXTEND_MAX more points, while the edge keeps winning.
    """
    grid = [args.lr[method]] if method in args.lr else sorted(LR_GRID[method])
    tuning = {lr: figures(task, train(args, task, method, lr, args.seeds[0])) for lr in grid}
    for _ in range(EXTEND_MAX if len(grid) > 1 else 0):
        ok = {lr: f for lr, f in tuning.items() if f["status"] == "ok"}
        best, rates = _best(ok), sorted(tuning)
        if best == rates[-1]:
            lr = rates[-1] * rates[-1] / rates[-2]
        elif best == rates[0]:
            lr = rates[0] * rates[0] / rates[1]
        else:
            break
        lr = float(f"{lr:.3g}")
        tuning[lr] = figures(task, train(args, task, method, lr, args.seeds[0]))
    return tuning


def _best(ok: dict[float, dict]) -> float | None:
    """The rate with the best validation metric (ties: the smaller rate)."""
    return max(ok, key=lambda lr: (ok[lr]["val"], -lr)) if ok else None


def compare_method(args, task: str, method: str) -> dict:
    """Tune the learning rate on validation at the first seed, then run every seed at the chosen rate."""
    first = args.seeds[0]
    tuning = tuned_rates(args, task, method)
    ok = {lr: f for lr, f in tuning.items() if f["status"] == "ok"}
    if not ok:
        return {"lr": None, "tuning": tuning, "runs": {}}
    best = _best(ok)
    runs = {first: ok[best]} | {s: figures(task, train(args, task, method, best, s)) for s in args.seeds[1:]}
    return {"lr": best, "tuning": {f"{lr:g}": f.get("val") for lr, f in sorted(tuning.items())}, "runs": runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml", help="base run config")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(NAMES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add_set_argument(p, "config override for every run, after the task's and the method's (repeatable)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="fix one method's rate (no tuning)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="runs: OUT/<task>/<method>/lr<x>/seed<s>")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="where the report goes")
    p.add_argument("--report-name", default="compare", help="DOCS/<name>.{md,json,png} (default: %(default)s)")
    p.add_argument("--collect", action="store_true", help="train nothing: report the runs already on disk")
    p.add_argument("--note", action="append", default=[], help="an extra line for the report's notes")
    args = p.parse_args(argv)
    lrs = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS:
            p.error(f"--lr {item!r}: METHOD must be one of {list(METHODS)}")
        lrs[method] = float(value)
    args.lr = lrs
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # every configuration is validated before hours of training
        for task in args.tasks:
            for method in args.methods:
                load_config(args.config, [*TASKS[task].overrides, *method_overrides(method, 1e-3), *args.overrides])
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from contracts.machine import environment

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = {task: {m: compare_method(args, task, m) for m in args.methods} for task in args.tasks}
    report = {
        "command": "python -m experiments.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "load": [load0, os.getloadavg()[0]],
        "wall_s": time.perf_counter() - t0,
        "seeds": args.seeds,
        "common_overrides": args.overrides,
        "notes": args.note,
        "names": NAMES,
        "tasks": {
            t: {
                "what": TASKS[t].what,
                "metric": TASKS[t].metric,
                "overrides": list(TASKS[t].overrides),
                "methods": results[t],
            }
            for t in args.tasks
        },
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    out = args.docs / args.report_name
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(report))
    plot(report, out.with_suffix(".png"))
    missing = [
        f"{t}/{m}"
        for t, ms in results.items()
        for m, r in ms.items()
        if any(f["status"] != "ok" for f in r["runs"].values()) or not r["runs"]
    ]
    print(f"[compare] wrote {out}.md, .json, .png" + (f"; incomplete: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
