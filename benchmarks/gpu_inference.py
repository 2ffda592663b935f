"""PyTorch GPU inference latency: the GNP-IQ int8 backbone (dequantize on the fly) vs fp16 weights.

`python -m benchmarks.gpu_inference --backbone .gpu/mpnet --random-init --out docs/gpu_inference.json`
Batch 1 and 32 at sequence 128, CUDA-event timing, median of repeats after warmup, both measured
in one run. Needs a CUDA GPU (CI never has one); prints and saves the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import absent, load_json
from training.backbone import load_encoder
from training.config import BackboneConfig, QuantConfig
from training.quant import model_bytes, quantize_


def time_forward(model, ids, mask, repeats: int, warmup: int = 5) -> list[float]:
    """Milliseconds per forward, measured with CUDA events."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, attention_mask=mask)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm", help="minilm | mpnet | a local model directory")
    p.add_argument("--random-init", action="store_true", help="architecture only (latency does not depend on weights)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("docs/gpu_inference.json"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark runs on a GPU machine only")
    cfg = BackboneConfig(name=a.backbone, random_init=a.random_init)
    base = load_encoder(cfg, vocab_size=0).eval()
    fp16 = copy.deepcopy(base).half().cuda()
    int8 = copy.deepcopy(base)
    quantize_(int8, QuantConfig(keep_fp_reference=False))
    int8 = int8.cuda()
    rows = []
    for b in a.batches:
        ids = torch.randint(1000, 20000, (b, a.seq), device="cuda")
        mask = torch.ones_like(ids)
        t16 = time_forward(fp16, ids, mask, a.repeats)
        with torch.autocast("cuda", dtype=torch.float16):
            t8 = time_forward(int8, ids, mask, a.repeats)
        rows.append(
            {
                "batch": b,
                "seq": a.seq,
                "fp16_ms_p50": statistics.median(t16),
                "int8_dequant_ms_p50": statistics.median(t8),
                "ratio_int8_over_fp16": statistics.median(t8) / statistics.median(t16),
            }
        )
        print(
            f"batch {b:>3} seq {a.seq}: fp16 {rows[-1]['fp16_ms_p50']:.2f} ms  int8 (dequant in fp16) "
            f"{rows[-1]['int8_dequant_ms_p50']:.2f} ms  ratio {rows[-1]['ratio_int8_over_fp16']:.2f}x"
        )
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "backbone": a.backbone,
        "random_init": a.random_init,
        "weights_bytes_fp16": model_bytes(fp16),
        "weights_bytes_int8": model_bytes(int8),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(
        f"weights: fp16 {result['weights_bytes_fp16'] / 2**20:.1f} MiB, int8 {result['weights_bytes_int8'] / 2**20:.1f} MiB -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def summary(docs: Path) -> list[str]:
    """The GPU section of docs/BENCHMARKS.md from docs/gpu_*.json: this script's latency rows and the
    training-memory table an earlier session measured on an H100 (its own layout)."""
    out = ["## GPU (PyTorch; TensorRT was not run)", ""]
    files = sorted(docs.glob("gpu_*.json"))
    if not files:
        return out + absent("docs/gpu_*.json", "python -m benchmarks.gpu_inference on a CUDA machine")
    for path in files:
        data = load_json(path) or {}
        if "rows" in data:
            out += [
                f"`{path.name}`: {data.get('gpu')}, torch {data.get('torch')}, backbone `{data.get('backbone')}`"
                f"{' (random weights)' if data.get('random_init') else ''}, {data.get('date')}. {data.get('note', '')}",
                "",
                "| batch | seq | fp16 p50 ms | int8 (dequantize per forward) p50 ms | int8 / fp16 |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {r['batch']} | {r['seq']} | {r['fp16_ms_p50']:.2f} | {r['int8_dequant_ms_p50']:.2f} "
                f"| {r['ratio_int8_over_fp16']:.2f}x |"
                for r in data["rows"]
            ]
        elif "methods" in data:
            out += [
                f"`{path.name}`: {data.get('gpu')}, torch {data.get('torch')}, {data.get('date')}. {data.get('setup', '')}",
                "",
                "| method | peak memory GiB | static GiB | trainable parameters | median step s |",
                "|---|---|---|---|---|",
            ]
            out += [
                f"| {k} | {m['peak_memory_gib']:.3f} | {m.get('static_memory_gib') or 0:.3f} | {m['trainable_parameters']:,} "
                f"| {m.get('step_time_s_median') or float('nan'):.3f} |"
                for k, m in data["methods"].items()
            ]
            out += ["", f"Command: `{data.get('command', '?')}`", "", "![GPU training memory](bench_gpu_memory.png)"]
        else:
            out.append(f"`{path.name}`: not rendered here (unrecognised layout); see the file.")
        out.append("")
    return out
