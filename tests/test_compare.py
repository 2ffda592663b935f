"""The baseline harness: five methods, one subprocess each, one table (training/compare.py)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import tiny_overrides, write_toy_csv
from training.compare import NAMES, method_overrides, render_markdown
from training.harness import run_training

METHODS = ["full_ft", "lora", "bitfit", "lst", "mp_ismoe"]


def test_method_overrides_state_the_preset_explicitly():
    assert method_overrides("lora", 5e-4) == ["train.method=lora", "quant.enabled=false", "side.enabled=false",
                                              "train.lr=0.0005"]
    assert method_overrides("lst", 1e-3)[1:3] == ["quant.enabled=false", "moe.enabled=false"]


def test_failed_run_reports_its_last_line(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('[train] starting'); sys.exit('ValueError: no such column')"]
    r = {"method": "bitfit", **run_training(cmd, tmp_path / "bitfit", "bitfit")}
    assert r["status"] == "failed" and r["error"] == "ValueError: no such column"
    report = {"machine": {"date": "today", "platform": "p", "cpu": "c", "cpu_count": 2, "python": "3", "torch": "t"},
              "budget": {k: 1 for k in ("backbone", "dataset", "max_examples", "sizes", "split_seed", "seed",
                                        "epochs", "max_steps", "batch_size", "max_length", "threads")},
              "command": "python -m training.compare", "lr": {"bitfit": 1e-3}, "load": [1.0, 1.0], "wall_s": 1.0,
              "runtime_floor_gib": None, "notes": [], "results": [r]}
    assert "| BitFit | FAILED: `ValueError: no such column` |" in render_markdown(report)


@pytest.mark.slow
@pytest.mark.timeout(600)  # about a minute on an idle 2-core machine: five interpreter starts
def test_compare_runs_every_method_on_the_tiny_model(tmp_path):
    data = write_toy_csv(tmp_path / "toy.csv", n=120)
    sets = [*tiny_overrides(data), "train.epochs=1", "train.max_steps=2", "train.batch_size=32"]
    cmd = [sys.executable, "-m", "training.compare", "--config", "configs/default.yaml",
           "--out-dir", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs"), "--label", "pytest",
           *[a for s in sets for a in ("--set", s)]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    report = json.loads((tmp_path / "docs" / "compare.json").read_text())
    results = {r["method"]: r for r in report["results"]}
    assert sorted(results) == sorted(METHODS) and all(r["status"] == "ok" for r in results.values())
    metrics = {m: r["metrics"] for m, r in results.items()}
    for m in METHODS:
        assert 0.0 <= metrics[m]["test_accuracy"] <= 1.0
        assert metrics[m]["peak_memory_gib"] > 0 and metrics[m]["step_time_s_median"] > 0
        assert metrics[m]["method"] == m
    params = {m: metrics[m]["trainable_parameters"] for m in METHODS}
    assert params["bitfit"] < params["lora"] < params["full_ft"]
    assert params["mp_ismoe"] < params["full_ft"]
    assert metrics["mp_ismoe"]["backbone_bytes_ratio"] < 0.5 < metrics["full_ft"]["backbone_bytes_ratio"]
    assert len({metrics[m]["test_size"] for m in METHODS}) == 1  # one split for all

    md = (tmp_path / "docs" / "compare.md").read_text()
    for m in METHODS:
        assert f"| {NAMES[m]} | {metrics[m]['test_accuracy']:.4f} |" in md
    assert "FAILED" not in md and "train.max_steps 2" in md and "pytest" in md
    assert (tmp_path / "docs" / "compare.png").stat().st_size > 10_000
