"""The README's first command on real weights: the default config (MiniLM, Rotten Tomatoes) through
train -> export -> serve -> one classified request, at a small step budget.

Tiny random models never exercise the export gates the way real trained weights do (a routing
near-tie on a real checkpoint once failed a max-abs logits gate while every label agreed), so CI
runs the real default config through the real CLIs. Only the step budget is reduced.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.parity_report import PARITY_FILE, ExportReport

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
pytestmark = pytest.mark.slow


def _run(args: list[str], timeout: int) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def test_default_config_trains_exports_and_serves(tmp_path):
    from serving.client import Client
    from serving.config import ServeConfig
    from serving.repository import generate_repository
    from serving.server import ServerOptions, TritonServer

    run = tmp_path / "default"
    out = _run(
        [
            "training",
            "--config",
            "configs/default.yaml",
            "--out",
            str(run),
            "--no-progress",
            "--set",
            f"train.max_steps={STEPS}",
        ],
        timeout=1200,
    )
    assert "checkpoint written" in out
    out = _run(["export", "--run", str(run)], timeout=1200)
    report = ExportReport.load(run / "onnx" / PARITY_FILE)
    assert report.passed and "overall" in out and "PASSED" in out
    gated = report.gated()
    assert gated.rows == 1281 and gated.end_to_end.label_agreement >= gated.gate.min_label_agreement
    assert gated.adapter.routes_observable and gated.adapter.non_tie_flips == 0
    assert all(r.get("passed") for r in report.polygraphy_run.values()), report.polygraphy_run

    repo = tmp_path / "model_repository"
    generate_repository([run], repo, ServeConfig(ort_threads=2))
    with TritonServer(ServerOptions.on_free_ports(repository=repo, log_file=tmp_path / "tritonserver.log")) as server:
        with Client(server.grpc_url, "grpc") as client:
            (prediction,) = client.classify("rotten_tomatoes", ["A gorgeous, witty, seductive movie."])
    assert prediction.label in ("fresh", "rotten")
    assert abs(sum(prediction.probabilities.values()) - 1.0) < 1e-5
