"""`python -m training.compare`: full FT, LoRA, BitFit, LST and MP-ISMoE on one split, seed and budget.

Each method is one `python -m training` subprocess, so on CPU its peak memory is that process's own peak
RSS (on CUDA the trainer reports `torch.cuda.max_memory_allocated`). Writes DOCS/compare.{json,md,png}.

This parent process never imports torch: Linux carries a parent's RSS high-water mark into the
child's ru_maxrss across fork + exec, so a heavy parent would inflate every child's figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .config import METHOD_PRESETS, METHODS, ConfigError, load_config

# Per-method learning rates, the usual values for each (AdamW, linear decay). They replace the
# config's train.lr; `--set train.lr=X` applies X to every method, `--lr lora=1e-4` to one.
DEFAULT_LR = {
    "full_ft": 5e-5,  # the whole backbone moves: BERT-style fine-tuning rates (2e-5 .. 5e-5)
    "lora": 5e-4,  # low-rank deltas start at zero and need a larger step
    "bitfit": 1e-3,  # biases only (BitFit paper: 1e-4 .. 1e-3)
    "lst": 1e-3, "mp_ismoe": 1e-3,  # side networks train from a pruned init, as in LST
}
NAMES = {"full_ft": "full FT", "lora": "LoRA", "bitfit": "BitFit", "lst": "LST", "mp_ismoe": "MP-ISMoE"}
EPILOG = """examples:
  python -m training.compare --config configs/default.yaml --methods lora mp_ismoe \\
      --set data.max_examples=3000 --set train.epochs=2 --set train.threads=2 --lr lora=3e-4

per-method default learning rates (overridden by --lr, or for all methods by --set train.lr=X):
  """ + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + """
a method whose run fails is listed as FAILED with its last error line; the command then exits 1.
"""


def method_overrides(method: str, lr: float) -> list[str]:
    """The preset's section values, stated explicitly (the config file may contradict them), and the lr."""
    preset = [f"{s}.{k}={json.dumps(v)}" for s, vals in METHOD_PRESETS[method].items() for k, v in vals.items()]
    return [f"train.method={method}", *preset, f"train.lr={lr:g}"]


def run_method(method: str, cmd: list[str], out: Path) -> dict:
    """Run one training subprocess; echo its [train] lines; return its metrics or its last error line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a stale file must not pass for this run's result
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(out / "compare.log", "w") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[train]"):
                print(f"  {method}: {line.rstrip()}", flush=True)
    result = {"method": method, "command": shlex.join(cmd), "wall_s": time.perf_counter() - t0,
              "returncode": proc.returncode, "log": str(out / "compare.log")}
    if proc.returncode == 0 and (out / "metrics.json").is_file():
        return {**result, "status": "ok", "metrics": json.loads((out / "metrics.json").read_text())}
    lines = [t.strip() for t in (out / "compare.log").read_text().splitlines() if t.strip()]
    return {**result, "status": "failed", "error": lines[-1] if lines else f"exit code {proc.returncode}, no output"}


def runtime_floor_gib() -> float | None:
    """Peak RSS of a process that only imports torch, transformers, peft and the trainer."""
    code = ("import resource, torch, transformers, peft, training.trainer; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(p.stdout.split()[-1]) / 2**20 if p.returncode == 0 and p.stdout.strip() else None


def machine(label: str | None) -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor() or platform.machine())
    return {"label": label, "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": metadata.version("torch"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table_rows(report: dict) -> list[str]:
    rows = ["| method | test accuracy | trainable params | peak training memory (GiB) | median step time (s) "
            "| backbone bytes ratio | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        name = NAMES.get(r["method"], r["method"])
        if r["status"] != "ok":
            rows.append(f"| {name} | FAILED: `{r['error'].replace('|', '/')}` | | | | | {r['wall_s']:.0f} |")
            continue
        m = r["metrics"]
        share = 100 * m["trainable_parameters"] / (m["backbone_fp32_bytes"] / 4)
        step = m["step_time_s_median"] or float("nan")
        rows.append(f"| {name} | {m['test_accuracy']:.4f} | {m['trainable_parameters']:,} ({share:.2f}% of backbone) "
                    f"| {m['peak_memory_gib']:.3f} ({m['peak_memory_kind']}) | {step:.3f} "
                    f"| {m['backbone_bytes_ratio']:.3f} | {r['wall_s']:.0f} |")
    return rows


def render_markdown(report: dict) -> str:
    mc, b, ok = report["machine"], report["budget"], [r for r in report["results"] if r["status"] == "ok"]
    devices = sorted({r["metrics"]["device"] for r in ok}) or ["n/a"]
    lines = [
        "# Baselines in one harness: full FT, LoRA, BitFit, LST, MP-ISMoE", "",
        f"Generated by `training/compare.py` on {mc['date']}. Same data split, seed and budget for every method; "
        "each method ran in its own subprocess.", "", *table_rows(report), "",
        "## Command", "", "```", report["command"], "```", "",
        "Per-method learning rates: " + ", ".join(f"{m} {report['lr'][m]:g}" for m in report["lr"]) + ".", "",
        "## Budget", "",
        f"- backbone `{b['backbone']}`, dataset `{b['dataset']}`, data.max_examples {b['max_examples'] or 'all'} "
        f"({b['sizes']}), split seed {b['split_seed']}, seed {b['seed']}",
        f"- train.epochs {b['epochs']}, train.max_steps {b['max_steps']}, batch size {b['batch_size']}, "
        f"max length {b['max_length']}, threads {b['threads']}", "",
        "## Machine", "",
        *([f"- {mc['label']}"] if mc.get("label") else []),
        f"- {mc['platform']}; CPU {mc['cpu']}, {mc['cpu_count']} logical CPUs; Python {mc['python']}, "
        f"torch {mc['torch']}; training device: {', '.join(devices)}",
        f"- load average (1 min) at start {report['load'][0]:.2f}, at end {report['load'][1]:.2f}; "
        f"harness wall time {report['wall_s'] / 60:.1f} min", "",
        "## Notes", "",
        "- Peak memory: `cpu_peak_rss` is the training subprocess's peak resident set size (whole process: Python, "
        "torch, tokenizer, data, model, optimizer, activations); `cuda_max_memory_allocated` is PyTorch's peak "
        "allocation on the GPU after setup.",
        *([f"- A process that only imports torch, transformers, peft and the trainer peaks at "
           f"{report['runtime_floor_gib']:.3f} GiB RSS here; that floor is part of every CPU figure above."]
          if report["runtime_floor_gib"] else []),
        "- Backbone bytes ratio: the backbone's bytes in memory over its fp32 bytes (about 0.25 to 0.3 with int8 "
        "codes plus per-row scales and fp32 LayerNorms; 1.0 for the fp baselines, a little more with LoRA).",
        "- Median step time covers forward, backward and optimizer step of one training batch.",
        *[f"- {n}" for n in report["notes"]],
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, png: Path) -> None:
    """Accuracy vs peak memory (left) and trainable parameters (right), successful runs only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in report["results"] if r["status"] == "ok"]
    names = [NAMES.get(r["method"], r["method"]) for r in ok]
    mem, acc, params, kinds = ([r["metrics"][k] for r in ok] for k in
                               ("peak_memory_gib", "test_accuracy", "trainable_parameters", "peak_memory_kind"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    ax1.scatter(mem, acc, c=[f"C{i}" for i in range(len(ok))], s=50)
    for name, x, y in zip(names, mem, acc):
        ax1.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax1.set(xlabel=f"peak training memory, GiB ({', '.join(sorted(set(kinds)))})", ylabel="test accuracy",
            title="accuracy vs memory", xmargin=0.2, ymargin=0.2)
    ax2.barh(names, params, color=[f"C{i}" for i in range(len(ok))])
    ax2.invert_yaxis()
    for i, p in enumerate(params):
        ax2.text(p, i, f" {p:,}", va="center", fontsize=8)
    ax2.set(xscale="log", xlabel="trainable parameters (log scale)", title="trainable parameters", xmargin=0.35)
    b = report["budget"]
    steps = f", max {b['max_steps']} steps" if b["max_steps"] else ""
    fig.suptitle(f"{b['backbone']} on {Path(b['dataset']).name}, {b['epochs']} epoch(s){steps}, {report['machine']['date']}")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML run config shared by every method")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(NAMES), help="default: all, full_ft first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method, after the method's own (repeatable)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="one method's learning rate")
    p.add_argument("--out-dir", type=Path, default=Path("runs/compare"), help="run directories: OUT_DIR/<method>")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="where compare.md/.json/.png go")
    p.add_argument("--label", default=None, help="free-text machine description for the report")
    p.add_argument("--note", action="append", default=[], help="an extra line for the report's notes")
    return p.parse_args(argv)


def plan(args) -> tuple[dict[str, float], dict[str, list[str]], object]:
    """Per-method lr and overrides, each validated here (cheap) before hours of training."""
    lr = dict(DEFAULT_LR)
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise ConfigError(f"--lr {item!r}: expected METHOD=LR with METHOD in {list(METHODS)}")
        lr[method] = float(value)
    if any(o.split("=", 1)[0].strip() == "train.method" for o in args.overrides):
        raise ConfigError("--set train.method: the methods are chosen with --methods")
    overrides = {m: method_overrides(m, lr[m]) + args.overrides for m in args.methods}
    cfgs = [load_config(args.config, o) for o in overrides.values()]  # fail now on any bad override
    return {m: lr[m] for m in args.methods}, overrides, cfgs[0]


def run_all(args, lr: dict, overrides: dict) -> list[dict]:
    results = []
    for i, m in enumerate(args.methods, 1):
        cmd = [sys.executable, "-m", "training", *(["--config", str(args.config)] if args.config else []),
               "--out", str(args.out_dir / m), *[a for o in overrides[m] for a in ("--set", o)], "--no-progress"]
        print(f"[compare] {i}/{len(args.methods)} {m} (lr {lr[m]:g}): log in {args.out_dir / m}", flush=True)
        r = run_method(m, cmd, args.out_dir / m)
        done = (f"test acc {r['metrics']['test_accuracy']:.4f}, peak {r['metrics']['peak_memory_gib']:.3f} GiB"
                if r["status"] == "ok" else f"FAILED: {r['error']}")
        print(f"[compare] {m}: {done} ({r['wall_s']:.0f} s)", flush=True)
        results.append(r)
    return results


def _sizes(results: list[dict]) -> str:
    """Split sizes from each run's first log line; they must agree (same data config for all)."""
    seen = {line.split(": ", 1)[1].split(";")[0] for r in results for line in Path(r["log"]).read_text().splitlines()
            if line.startswith("[train]") and "; device " in line}
    return " | ".join(sorted(seen)) + (" (DIFFERENT SPLITS: check the overrides)" if len(seen) > 1 else "") or "n/a"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lr, overrides, cfg = plan(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = run_all(args, lr, overrides)
    t, d = cfg.train, cfg.data
    report = {
        "command": "python -m training.compare " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(args.label), "load": [load0, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0,
        "lr": lr, "common_overrides": args.overrides, "runtime_floor_gib": runtime_floor_gib(), "notes": args.note,
        "budget": {"backbone": cfg.backbone.name, "dataset": d.dataset, "max_examples": d.max_examples,
                   "sizes": _sizes(results), "split_seed": d.split_seed, "seed": t.seed, "epochs": t.epochs,
                   "max_steps": t.max_steps, "batch_size": t.batch_size, "max_length": cfg.backbone.max_length,
                   "threads": t.threads or "all"}, "results": results}
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.docs / "compare.md").write_text(render_markdown(report))
    (args.docs / "compare.png").unlink(missing_ok=True)
    if any(r["status"] == "ok" for r in results):
        plot(report, args.docs / "compare.png")
    failed = [r["method"] for r in results if r["status"] != "ok"]
    png = ", .png" if len(failed) < len(results) else ""
    print(f"[compare] wrote {args.docs}/compare.md, .json{png} in {report['wall_s'] / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
