"""Training memory accounted by category, on CPU, the same bytes on every run: docs/memory.{md,json,png}.

    python -m benchmarks.memory [--batch-sizes 32 128] [--seq 128] [--amp bf16|off] [--threads 2]

Each method trains a few steps on the all-mpnet-base-v2 architecture (12 x 768, random weights:
memory does not depend on their values) at a fixed (batch, sequence), in its own subprocess. On
the last step it counts, each storage once:
- parameters and buffers (the int8 backbone's codes are buffers),
- gradients, and AdamW's state after the step,
- saved activations: every tensor autograd saves for backward during the forward, recorded by a
  `torch.autograd.graph.saved_tensors_hooks` pack hook, minus storages that are parameters or buffers
  (recomputed blocks save their inputs through the same hook, so they are counted too).
Transient memory (a dequantized weight, attention scores of the frozen backbone) is not in the
accounting; the process's peak RSS is reported beside it as a cross-check, and the median step time.
bf16 autocast (default) mirrors GPU training; `--amp off` accounts fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.memory_report import CATEGORIES, gib, plot, ratios, render_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "benchmarks"
# all-mpnet-base-v2's architecture (its config.json); weights are random here.
MPNET_BASE = dict(
    vocab_size=30527,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
    layer_norm_eps=1e-5,
    relative_attention_num_buckets=32,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# (label, method, extra overrides): the baselines, the default MP-ISMoE, and where its memory went before.
VARIANTS = [
    ("full FT", "full_ft", []),
    ("LoRA", "lora", []),
    ("BitFit", "bitfit", []),
    ("LST", "lst", []),
    ("LST, no recompute", "lst", ["side.recompute=false"]),
    ("MP-ISMoE", "mp_ismoe", []),
    ("MP-ISMoE, no recompute", "mp_ismoe", ["side.recompute=false"]),
    ("MP-ISMoE, no recompute, dense experts", "mp_ismoe", ["side.recompute=false", "moe.dispatch=dense"]),
    ("MP-ISMoE, truncated LayerNorm", "mp_ismoe", ["quant.layernorm=truncated"]),
]
PAIR = "pair-timing"


def mpnet_base_dir() -> Path:
    """A local model directory: MPNet-base config + the MiniLM tokenizer (ids < 30522 fit MPNet's table)."""
    from transformers import AutoTokenizer, MPNetConfig

    from training.backbone import minilm_path

    d = CACHE / "mpnet-base-architecture"
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        MPNetConfig(**MPNET_BASE).save_pretrained(d)
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d)
    return d


def _storage_key(t) -> tuple:
    return (str(t.device), t.untyped_storage().data_ptr())


def _unique_bytes(tensors, exclude: set = frozenset()) -> int:
    seen, total = set(exclude), 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class Trainee:
    """One method's model, optimizer and a fixed random batch: `step()` trains once and returns its seconds."""

    def __init__(self, method: str, overrides: list[str], batch: int, seq: int, amp: bool):
        import torch

        from training.backbone import load_tokenizer
        from training.config import load_config
        from training.model import build_model
        from training.trainer import make_optimizer

        self.cfg = load_config(
            overrides=[
                f"backbone.name={mpnet_base_dir()}",
                "backbone.random_init=true",
                f"backbone.max_length={seq}",
                f"train.method={method}",
                "quant.requant_every_epochs=0",
                "moe.prior_init=random",
                *overrides,
            ]
        )
        torch.manual_seed(0)
        self.model, _ = build_model(self.cfg, 2, load_tokenizer(self.cfg.backbone))
        self.model.train()
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.amp = amp
        g = torch.Generator().manual_seed(1)
        self.batch = {
            "input_ids": torch.randint(3, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }

    def step(self, on_saved=None) -> float:
        """One training step; `on_saved(t)` sees every tensor autograd saves during the forward."""
        import torch
        import torch.nn.functional as F

        from training.model import aux_loss

        t0 = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: (on_saved and on_saved(t)) or t, lambda t: t)
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp):
            logits, aux = self.model(self.batch)
            loss = F.cross_entropy(logits.float(), self.batch["labels"]) + aux_loss(aux, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - t0


def account(method: str, overrides: list[str], batch: int, seq: int, amp: bool, steps: int) -> dict:
    """In this process: build, train `steps` steps on random tokens, account the last one."""
    import torch

    from training.model import trainable_parameters

    trainee = Trainee(method, overrides, batch, seq, amp)
    model, optimizer = trainee.model, trainee.optimizer
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    param_keys = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    times = [trainee.step() for _ in range(steps - 1)]
    saved: list = []
    times.append(trainee.step(saved.append))
    activations = _unique_bytes(saved, param_keys)
    saved.clear()
    params = [p for p in model.parameters()]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    return {
        "parameters": _unique_bytes([*params, *model.buffers()]),
        "gradients": _unique_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": _unique_bytes(state),
        "activations": activations,
        "trainable_parameters": trainable_parameters(model),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_built_gib": rss_built,
        "step_time_s": times[1:] if len(times) > 1 else times,
        "threads": torch.get_num_threads(),
    }


def time_pair(batch: int, seq: int, amp: bool, rounds: int) -> dict[str, list[float]]:
    """LST and MP-ISMoE in one process, taking turns step by step: a slow spell of the machine hits both."""
    pair = {"LST": Trainee("lst", [], batch, seq, amp), "MP-ISMoE": Trainee("mp_ismoe", [], batch, seq, amp)}
    for trainee in pair.values():
        trainee.step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in pair}
    for _ in range(rounds):
        for name, trainee in pair.items():
            times[name].append(trainee.step())
    return times


def run_child(label: str, method: str, overrides: list[str], batch: int, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--child",
        method,
        "--batch-sizes",
        str(batch),
        "--seq",
        str(args.seq),
        "--amp",
        args.amp,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
        "--overrides",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} at batch {batch} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if method == PAIR:
        return {"batch": batch, "step_time_s": result, "median_s": {k: statistics.median(v) for k, v in result.items()}}
    result["accounted"] = sum(result[c] for c in CATEGORIES)
    result["step_time_s_median"] = statistics.median(result.pop("step_time_s"))
    return {"label": label, "method": method, "overrides": overrides, "batch": batch, **result}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--amp", choices=("bf16", "off"), default="bf16")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration (the last is accounted)")
    p.add_argument("--rounds", type=int, default=8, help="paired LST / MP-ISMoE step-time rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", nargs="+", help="labels to run (default: all)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL|METHOD|KEY=VALUE,...",
        help="an extra row, e.g. 'MP-ISMoE r=4|mp_ismoe|side.reduction=4' (repeatable)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "memory", help="writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        amp, batch = args.amp == "bf16", args.batch_sizes[0]
        result = (
            time_pair(batch, args.seq, amp, args.rounds)
            if args.child == PAIR
            else account(args.child, args.overrides, batch, args.seq, amp, args.steps)
        )
        print(json.dumps(result))
        return 0
    from contracts.machine import environment

    mpnet_base_dir()
    rows, variants = [], list(VARIANTS)
    for item in args.variant:
        label, method, sets = (item.split("|") + ["", ""])[:3]
        variants.append((label, method, [o for o in sets.split(",") if o]))
    for batch in args.batch_sizes:
        for label, method, overrides in variants:
            if args.only and label not in args.only:
                continue
            rows.append(run_child(label, method, overrides, batch, args))
            r = rows[-1]
            print(
                f"batch {batch:>4}  {label:<40} accounted {gib(r['accounted'])} GiB  activations "
                f"{gib(r['activations'])}  peak RSS {r['peak_rss_gib']:.2f}  step {r['step_time_s_median']:.2f} s",
                flush=True,
            )
    pairs = []
    if not args.only:
        for batch in args.batch_sizes:
            pairs.append(run_child(PAIR, PAIR, [], batch, args))
            print(
                f"batch {batch:>4}  paired step time: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in pairs[-1]["median_s"].items()),
                flush=True,
            )
    report = {
        "command": "python -m benchmarks.memory " + shlex.join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "seq": args.seq,
        "amp": args.amp,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_sizes": args.batch_sizes,
        "rows": rows,
        "paired_step_time": pairs,
        "gpu_note": "not measured: no GPU machine was lent to this session (see docs/gpu_training_memory.json "
        "for the H100 figures of an earlier version).",
    }
    labels = {r["label"] for r in rows}
    if {"MP-ISMoE", "full FT", "LoRA", "LST"} <= labels and pairs:
        report["ratios"] = {str(b): ratios(rows, pairs, b) for b in args.batch_sizes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    if "ratios" in report:
        args.out.with_suffix(".md").write_text(render_markdown(report))
        plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.json" + (", .md, .png" if "ratios" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
