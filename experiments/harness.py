"""One training run as its own subprocess, for the comparison and ablation harnesses.

A subprocess per run makes CPU peak RSS that run's own (the parent never imports torch: Linux
carries a parent's peak RSS into its children's), isolates failures, and keeps one log per run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_command(config: Path, out: Path, overrides: list[str]) -> list[str]:
    """`python -m training` for one run: the config, its directory, each override as a `--set`."""
    return [
        sys.executable,
        "-m",
        "training",
        "--config",
        str(config),
        "--out",
        str(out),
        *[a for o in overrides for a in ("--set", o)],
        "--no-progress",
    ]


def run_training(cmd: list[str], out: Path, label: str, log_name: str = "run.log", echo: str = "[train]") -> dict:
    """Run `cmd` writing into `out`; echo lines starting with `echo`; return its metrics or last error line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a stale file must not pass for this run's result
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # runs from a plain checkout
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": path,
    }
    log_path = out / log_name
    t0 = time.perf_counter()
    with (
        open(log_path, "w", buffering=1) as log,
        subprocess.Popen(  # line-buffered: tail -f works
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            if line.startswith(echo):
                print(f"  {label}: {line.rstrip()}", flush=True)
    result = {
        "command": shlex.join(cmd),
        "wall_s": time.perf_counter() - t0,
        "out": str(out),
        "returncode": proc.returncode,
        "log": str(log_path),
    }
    if proc.returncode == 0 and (out / "metrics.json").is_file():
        return {**result, "status": "ok", "metrics": json.loads((out / "metrics.json").read_text())}
    lines = [t.strip() for t in log_path.read_text().splitlines() if t.strip()]
    return {**result, "status": "failed", "error": lines[-1] if lines else f"exit code {proc.returncode}, no output"}
