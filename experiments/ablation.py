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
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import absent, load_json
from training.cli import add_set_argument
from training.config import ConfigError, load_config

from .harness import run_training

MP_ISMOE = (
    "train.method=mp_ismoe",
    "quant.enabled=true",
    "quant.bits=8",
    "quant.noise=learned",
    "moe.enabled=true",
    "moe.prior=true",
    "moe.expert_types=null",
)


@dataclass(frozen=True)
class Variant:
    name: str
    what: str  # the "what changes" column, relative to full MP-ISMoE unless it says otherwise
    overrides: tuple[str, ...]


VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "lst",
            "LST baseline: fp32 backbone, dense side FFN (no GNP-IQ, no ISMoE)",
            ("train.method=lst", "quant.enabled=false", "moe.enabled=false"),
        ),
        Variant(
            "lst+gnp_iq",
            "+ GNP-IQ only: 8-bit backbone, learned noise; dense side FFN (ISMoE off)",
            (*MP_ISMOE, "moe.enabled=false"),
        ),
        Variant(
            "lst+ismoe",
            "+ ISMoE only: fp32 backbone (GNP-IQ off); 4 FFN experts, top-2, [CLS] prior",
            (*MP_ISMOE, "quant.enabled=false"),
        ),
        Variant(
            "mp_ismoe", "full MP-ISMoE: 8-bit weights + fp32 LayerNorm, learned noise, 4 FFN experts, prior", MP_ISMOE
        ),
        Variant(
            "weights_4bit",
            "backbone weights 4-bit, LayerNorm fp32 (our 'low'; the paper's 'low' is 8-bit "
            "everywhere incl. LayerNorm, but we never quantize LayerNorm)",
            (*MP_ISMOE, "quant.bits=4"),
        ),
        Variant(
            "noise_fixed",
            "re-quantization noise fixed at its init (mu, rho not learned by SPSA)",
            (*MP_ISMOE, "quant.noise=fixed"),
        ),
        Variant(
            "noise_none",
            "no re-quantization noise (static 8-bit codes, no GNP-IQ events)",
            (*MP_ISMOE, "quant.noise=none"),
        ),
        Variant(
            "no_prior", "router without the salient-token prior (g = softmax(W x))", (*MP_ISMOE, "moe.prior=false")
        ),
        Variant(
            "paper_routing",
            "the paper's routing, literally: identical expert copies, g' = (p + c) / 2 with "
            "c from token 0 and random r",
            (*MP_ISMOE, "moe.upcycle=copy", "moe.prior_mode=average", "moe.salient=cls", "moe.prior_init=random"),
        ),
        Variant(
            "upcycle_copy",
            "identical expert copies at upcycling (no symmetry breaking)",
            (*MP_ISMOE, "moe.upcycle=copy"),
        ),
        Variant(
            "prior_average",
            "the paper's prior: g' = (p + c) / 2 instead of cos(h, r) / T in the logits",
            (*MP_ISMOE, "moe.prior_mode=average"),
        ),
        Variant(
            "hetero_lowrank_xattn",
            "heterogeneous experts: 2 ffn + 1 lowrank + 1 cross_attn",
            (*MP_ISMOE, "moe.num_experts=4", "moe.expert_types=[ffn, ffn, lowrank, cross_attn]"),
        ),
        Variant(
            "hetero_all_types",
            "heterogeneous experts: ffn + lowrank + cross_attn + channel_attn",
            (*MP_ISMOE, "moe.num_experts=4", "moe.expert_types=[ffn, lowrank, cross_attn, channel_attn]"),
        ),
    )
}

# (title, [(variant, row label)]); the first row of each table is the reference the others are compared to.
TABLES = [
    (
        "Components (paper Table 3)",
        [
            ("lst", "LST"),
            ("lst+gnp_iq", "+ GNP-IQ"),
            ("lst+ismoe", "+ ISMoE"),
            ("mp_ismoe", "+ GNP-IQ + ISMoE (MP-ISMoE)"),
        ],
    ),
    (
        "Backbone weight precision (paper Table 4)",
        [
            ("mp_ismoe", "mixed: 8-bit weights, fp32 LN"),
            ("lst+ismoe", "full: fp32 weights"),
            ("weights_4bit", "low: 4-bit weights, fp32 LN"),
        ],
    ),
    ("GNP-IQ noise", [("mp_ismoe", "learned (SPSA)"), ("noise_fixed", "fixed"), ("noise_none", "none")]),
    (
        "ISMoE routing prior",
        [
            ("mp_ismoe", "with prior (logits mode, k-means r)"),
            ("no_prior", "without prior"),
            ("prior_average", "paper's averaged prior"),
            ("upcycle_copy", "identical expert copies"),
            ("paper_routing", "the paper's routing, literally"),
        ],
    ),
    (
        "Expert types (HMMoE)",
        [
            ("mp_ismoe", "homogeneous: 4 ffn"),
            ("hetero_lowrank_xattn", "2 ffn + lowrank + cross_attn"),
            ("hetero_all_types", "ffn + lowrank + cross_attn + channel_attn"),
        ],
    ),
]
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


def _fmt_row(label: str, v: Variant, s: dict, failed: int) -> str:
    if not s["n"]:
        return f"| {label} | {v.what} | FAILED | | | | |"
    extra = f" ({failed} seed(s) failed)" if failed else ""
    step = f"{s['step_time_ms']:.1f}" if s["step_time_ms"] is not None else "n/a"
    return (
        f"| {label} | {v.what} | {100 * s['test_accuracy_mean']:.2f} ± {100 * s['test_accuracy_std']:.2f} "
        f"(n={s['n']}){extra} | {s['trainable_parameters']:,} | {s['peak_memory_gib']:.3f} | {step} "
        f"| {s['backbone_bytes_ratio']:.3f} |"
    )


def findings(report: dict) -> list[str]:
    """Plain sentences from the numbers: each row against its table's reference, judged by 2 standard errors."""
    out = []
    for title, rows in report["tables"]:
        ref_name, ref_label = rows[0]
        ref = report["variants"][ref_name]["summary"]
        if not ref["n"]:
            out.append(f"- {title}: the reference row ({ref_label}) failed; nothing to compare.")
            continue
        for name, label in rows[1:]:
            s = report["variants"][name]["summary"]
            if not s["n"]:
                out.append(f"- {title}: {label} failed; no comparison.")
                continue
            delta = 100 * (s["test_accuracy_mean"] - ref["test_accuracy_mean"])
            se = 100 * math.sqrt(s["test_accuracy_std"] ** 2 / s["n"] + ref["test_accuracy_std"] ** 2 / ref["n"])
            if min(s["n"], ref["n"]) < 2:
                verdict = "one seed only: no spread to judge it by"
            elif abs(delta) > 2 * se:
                verdict = f"{'better' if delta > 0 else 'worse'} beyond 2 standard errors (SE {se:.2f})"
            else:
                verdict = f"within seed noise (SE {se:.2f}): our data does not separate them"
            mem = s["peak_memory_gib"] / ref["peak_memory_gib"] if ref["peak_memory_gib"] else float("nan")
            step = (
                (s["step_time_ms"] / ref["step_time_ms"]) if s["step_time_ms"] and ref["step_time_ms"] else float("nan")
            )
            out.append(
                f"- {title}: {label} vs {ref_label}: {delta:+.2f} accuracy points, {verdict}; "
                f"peak memory x{mem:.2f}, step time x{step:.2f}, trainable parameters "
                f"{s['trainable_parameters']:,} vs {ref['trainable_parameters']:,}."
            )
    return out


def render_markdown(report: dict) -> str:
    b, lines = report["budget"], []
    lines += [
        "# MP-ISMoE ablation (the structure of the paper's Tables 3 and 4, on our data)",
        "",
        f"Generated by `experiments/ablation.py` on {report['date']}; device {', '.join(report['devices']) or 'n/a'}; "
        f"seeds {report['seeds']}. Accuracy is test accuracy in %, mean ± sample std over seeds; every variant "
        "used the same split, seeds and budget, one subprocess per run.",
        "",
    ]
    header = (
        "| variant | what changes | test accuracy (%) | trainable params | peak memory (GiB) "
        "| step time (ms, median) | backbone bytes ratio |"
    )
    for title, rows in report["tables"]:
        lines += [f"## {title}", "", header, "|---|---|---|---|---|---|---|"]
        for name, label in rows:
            v, entry = VARIANTS[name], report["variants"][name]
            failed = sum(r["status"] != "ok" for r in entry["runs"])
            lines.append(_fmt_row(label, v, entry["summary"], failed))
        lines.append("")
    lines += [
        "## What our data supports",
        "",
        "Generated from the numbers above only. A difference is called real only when it exceeds two standard "
        "errors of the difference of the seed means; otherwise it is seed noise at this budget.",
        "",
        *findings(report),
        "",
        "## Budget and command",
        "",
        f"- backbone `{b['backbone']}`, dataset `{b['dataset']}` ({b['max_examples'] or 'all'} examples, "
        f"split seed {b['split_seed']}), epochs {b['epochs']}, max_steps {b['max_steps']}, batch size "
        f"{b['batch_size']}, lr {b['lr']:g}, max length {b['max_length']}",
        f"- peak memory kind: {', '.join(report['memory_kinds']) or 'n/a'} (`cpu_peak_rss` is the whole training "
        "process; `cuda_max_memory_allocated` is PyTorch's peak GPU allocation after setup)",
        f"- machine: {report['machine']}; harness wall time {report['wall_s'] / 60:.1f} min",
        "",
        "```",
        report["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    """One panel per table: accuracy mean ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = report["tables"]
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables) + 1, 4.2), sharey=True, squeeze=False)
    for ax, (title, rows) in zip(axes[0], tables):
        s = [report["variants"][n]["summary"] for n, _ in rows]
        means = [100 * x["test_accuracy_mean"] if x["n"] else 0.0 for x in s]
        stds = [100 * x["test_accuracy_std"] if x["n"] else 0.0 for x in s]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), [label for _, label in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    ok = [v["summary"] for v in report["variants"].values() if v["summary"]["n"]]
    if ok:  # zoom on the bars: accuracy differences of a point matter here
        lo = min(100 * (s["test_accuracy_mean"] - s["test_accuracy_std"]) for s in ok)
        hi = max(100 * (s["test_accuracy_mean"] + s["test_accuracy_std"]) for s in ok)
        axes[0][0].set_ylim(max(0.0, lo - 3), min(100.0, hi + 2))
    axes[0][0].set_ylabel("test accuracy (%), mean ± std over seeds")
    fig.suptitle(f"{report['budget']['backbone']} on {Path(report['budget']['dataset']).name}, seeds {report['seeds']}")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


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


def summary(docs: Path) -> list[str]:
    """This harness's section of docs/BENCHMARKS.md, from docs/ablation.json (its own schema)."""
    data = load_json(docs / "ablation.json")
    out = ["## Ablation", ""]
    if not data:
        return out + absent("docs/ablation.json", "make ablate")
    out += [
        f"From `docs/ablation.json` ({data.get('date', '?')}, device {', '.join(data.get('devices') or ['?'])}, "
        f"seeds {data.get('seeds')}); command "
        f"`{data.get('command', '?')}`. Tables and the findings the data supports: [ablation.md](ablation.md).",
        "",
        "| table | variant | test accuracy % (mean ± std, n) | peak memory GiB |",
        "|---|---|---|---|",
    ]
    for title, rows in data["tables"]:
        for name, label in rows:
            s = data["variants"][name]["summary"]
            acc = (
                f"{100 * s['test_accuracy_mean']:.2f} ± {100 * s['test_accuracy_std']:.2f} (n={s['n']})"
                if s["n"]
                else "FAILED"
            )
            mem = f"{s['peak_memory_gib']:.3f}" if s["n"] else ""
            out.append(f"| {title} | {label} | {acc} | {mem} |")
    return out + [""]


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
        cmd = [
            sys.executable,
            "-m",
            "training",
            "--config",
            str(args.config),
            "--out",
            str(out),
            *[a for o in overrides for a in ("--set", o)],
            "--no-progress",
        ]
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
