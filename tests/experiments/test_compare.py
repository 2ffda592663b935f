"""The comparison harness: methods x tasks x paired seeds, the learning rate tuned on validation."""

import json
import subprocess
import sys

import pytest

from experiments import compare
from experiments.compare import EXTEND_MAX, LR_GRID, NAMES, method_overrides, parse_args
from experiments.harness import run_training
from tests.conftest import tiny_overrides, write_toy_csv


def test_method_overrides_state_the_preset_explicitly():
    assert method_overrides("lora", 5e-4) == [
        "train.method=lora",
        "quant.enabled=false",
        "side.enabled=false",
        "moe.enabled=false",
        "train.lr=0.0005",
    ]
    assert method_overrides("lst", 1e-3)[1:4] == ["quant.enabled=false", "side.enabled=true", "moe.enabled=false"]
    assert set(LR_GRID) == set(NAMES) and all(len(g) == 3 for g in LR_GRID.values())


def test_failed_run_reports_its_last_line(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('[train] starting'); sys.exit('ValueError: no such column')"]
    r = run_training(cmd, tmp_path / "bitfit", "bitfit")
    assert r["status"] == "failed" and r["error"] == "ValueError: no such column"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_tunes_on_validation_runs_paired_seeds_and_resumes(tmp_path):
    data = write_toy_csv(tmp_path / "toy.csv", n=120)
    sets = [*tiny_overrides(data), "train.epochs=1", "train.max_steps=2", "train.batch_size=32"]
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare",
        "--tasks",
        "rotten_tomatoes",
        "--methods",
        "linear_probe",
        "lst",
        "mp_ismoe",
        "--seeds",
        "0",
        "1",
        "--lr",
        "lst=1e-3",
        "--lr",
        "mp_ismoe=1e-3",
        "--out-dir",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path / "docs"),
        *[a for s in sets for a in ("--set", s)],
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "docs" / "compare.json").read_text())
    methods = report["tasks"]["rotten_tomatoes"]["methods"]
    probe = methods["linear_probe"]
    assert 3 <= len(probe["tuning"]) <= 3 + EXTEND_MAX  # tuned at seed 0: the grid, extended past a winning edge
    assert max(probe["tuning"].values()) == probe["runs"]["0"]["val"]  # the best validation rate was kept
    for m in ("lst", "mp_ismoe"):
        assert list(methods[m]["tuning"]) == ["0.001"] and set(methods[m]["runs"]) == {"0", "1"}
    lp = methods["linear_probe"]["runs"]["0"]["trainable_parameters"]
    assert lp < methods["lst"]["runs"]["0"]["trainable_parameters"]
    md = (tmp_path / "docs" / "compare.md").read_text()
    assert "| MP-ISMoE |" in md and "MP-ISMoE − method" in md and "The goal, from these numbers" in md
    assert (tmp_path / "docs" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    again = subprocess.run(cmd + ["--collect"], capture_output=True, text=True)  # nothing retrains
    assert again.returncode == 0 and "[compare] rotten_tomatoes/" not in again.stdout


def _fake_training(val_of_lr):
    """compare.train's stand-in: a run's validation accuracy as a function of its rate."""

    def train(args, task, method, lr, seed):
        v = val_of_lr(lr)
        metrics = {"val_accuracy": v, "test_accuracy": v, "peak_memory_gib": 1.0, "peak_memory_kind": "x"}
        metrics |= {"step_time_s_median": 0.1, "trainable_parameters": 1}
        return {"status": "ok", "metrics": metrics}

    return train


@pytest.mark.parametrize(
    "val_of_lr, expected",
    [
        (lambda lr: -abs(lr - 1e-3), [3e-4, 1e-3, 3e-3]),  # an interior optimum: the grid as it is
        (lambda lr: lr, [3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2]),  # the top edge keeps winning: two more points
        (lambda lr: -lr, [2.7e-5, 9e-5, 3e-4, 1e-3, 3e-3]),  # the bottom edge keeps winning
        (lambda lr: -abs(lr - 9e-3), [3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2]),  # extended once, then beaten
    ],
)
def test_tuning_extends_the_grid_past_a_winning_edge(monkeypatch, val_of_lr, expected):
    monkeypatch.setattr(compare, "train", _fake_training(val_of_lr))
    tuning = compare.tuned_rates(parse_args(["--methods", "bitfit"]), "trec", "bitfit")
    assert sorted(tuning) == pytest.approx(expected)
