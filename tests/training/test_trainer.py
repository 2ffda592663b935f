"""End to end on the toy task: a tiny MP-ISMoE model learns it and writes every artifact.

`trained_tiny_run` is shared with tests/export/test_pipeline.py, so the session trains once.
"""

import json
import struct

import pytest
import torch

from contracts.artifacts import verify_manifest
from tests.conftest import tiny_overrides
from training.checkpoint import BACKBONE_FILE, CALIBRATION_FILE, HELDOUT_FILE, SIDE_FILE, load_checkpoint, read_examples
from training.config import load_config
from training.data import make_loader
from training.model import SideTuned

# The default tiny_overrides (4 epochs at 3e-3) sit near chance on this toy split; this budget
# reaches >= 0.9 test accuracy in a few seconds (seeds vary: the backbone is random and frozen).
# Re-quantization every 6 epochs keeps two events in the run (epochs 6 and 12; none after the last). One thread: on shared cores two
# intra-op threads wait for each other's time slices (measured here: 2.4 s at 1 thread, 78 s at 2).
BUDGET = ["train.lr=3e-3", "train.epochs=15", "quant.requant_every_epochs=6", "train.threads=1"]
METRIC_KEYS = {
    "task",
    "method",
    "labels",
    "test_accuracy",
    "val_accuracy",
    "best_epoch",
    "test_size",
    "epochs",
    "trainable_parameters",
    "backbone_bytes",
    "backbone_fp32_bytes",
    "backbone_bytes_ratio",
    "peak_memory_gib",
    "peak_memory_kind",
    "step_time_s_median",
    "train_time_s",
    "requant_events",
    "device",
    "cpu_threads",
    "machine",
    "torch",
}
_CACHE: dict = {}
pytestmark = pytest.mark.slow


def trained_tiny_run(tmp_path_factory, toy_csv):
    """(run_dir, metrics) of one tiny training run per session; treat the run as read-only."""
    if "run" not in _CACHE:
        from training.trainer import Trainer

        run = tmp_path_factory.mktemp("tiny_train") / "run"
        cfg = load_config(overrides=tiny_overrides(toy_csv) + BUDGET)
        metrics = Trainer(cfg, run, progress=False).run()
        _CACHE["run"] = (run, metrics)
    return _CACHE["run"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_csv):
    return trained_tiny_run(tmp_path_factory, toy_csv)


def log_records(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_learns_the_toy_task_well_above_chance(trained):
    _, m = trained
    assert m["test_accuracy"] >= 0.85, m["epochs"]
    assert m["val_accuracy"] >= 0.85
    assert m["epochs"][-1]["train_loss"] < 0.5 * m["epochs"][0]["train_loss"]


def test_metrics_json(trained):
    run, m = trained
    on_disk = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(on_disk), METRIC_KEYS - set(on_disk)
    assert on_disk["test_accuracy"] == m["test_accuracy"] and on_disk["method"] == "mp_ismoe"
    assert on_disk["labels"] == ["neg", "pos"] and on_disk["test_size"] == 24
    assert len(on_disk["epochs"]) == 15 and 1 <= on_disk["best_epoch"] <= 15
    assert on_disk["peak_memory_kind"] == "cpu_peak_rss" and on_disk["peak_memory_gib"] > 0
    assert on_disk["step_time_s_median"] > 0 and on_disk["cpu_threads"] == 1
    # int8 codes + per-row scale/zero point, against fp32: about (D + 5) / 4D of the bytes
    assert 0.2 < on_disk["backbone_bytes_ratio"] < 0.35
    assert on_disk["backbone_bytes"] < on_disk["backbone_fp32_bytes"]
    assert 0 < on_disk["trainable_parameters"] < 0.05 * on_disk["backbone_fp32_bytes"] / 4


def test_requant_events_are_reported_with_errors_before_and_after(trained):
    _, m = trained
    events = m["requant_events"]
    assert len(events) == 2  # after epochs 6 and 12, not after the last
    for e in events:
        assert e["error_before"] > 0 and e["error_after"] > 0 and e["rows"] > 0
        assert 0 < e["rel_error_before"] < 1e-2 and 0 < e["rel_error_after"] < 1e-2
        assert e["error_before"] != e["error_after"]  # the event did change the codes
        assert e["noise"] == "learned" and e["spsa_losses"]
    assert events[1]["error_before"] == pytest.approx(events[0]["error_after"], rel=1e-6)


def test_requant_events_are_logged_in_train_log(trained):
    run, m = trained
    events = [r for r in log_records(run) if r.get("event") == "requant"]
    assert len(events) == len(m["requant_events"]) == 2
    assert all("error_before" in e and "error_after" in e for e in events)


def test_train_log_has_steps_and_one_eval_per_epoch(trained):
    recs = log_records(trained[0])
    steps = [r for r in recs if "step" in r]
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e["epoch"] for e in evals] == list(range(1, 16))
    assert steps and all(r["step"] % 10 == 0 for r in steps)  # log_every = 10
    assert all({"loss", "task_loss", "lr", "step_time_s"} <= set(r) for r in steps)


@pytest.mark.parametrize("name", ["curves.png", "router.png"])
def test_plots_are_pngs(trained, name):
    data = (trained[0] / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_router_diagnostics_are_logged_every_epoch(trained):
    router = [r for r in log_records(trained[0]) if r.get("event") == "router"]
    assert [r["epoch"] for r in router] == list(range(1, 16))
    for block in router[0]["blocks"]:
        assert 0 < block["entropy"] <= block["entropy_uniform"] + 1e-6
        assert sum(block["load"]) == pytest.approx(1.0, abs=1e-3) and len(block["load"]) == 4
        assert block["prior_spread"] > 0 and -1 <= block["expert_similarity"] < 1  # upcycled with noise


def test_checkpoint_holds_every_file(trained):
    run, m = trained
    ckpt = run / "checkpoint"
    manifest = verify_manifest(ckpt, "checkpoint")
    for name in (
        "config.json",
        "backbone_config.json",
        BACKBONE_FILE,
        SIDE_FILE,
        "metrics.json",
        HELDOUT_FILE,
        CALIBRATION_FILE,
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ):
        assert name in manifest["files"], name
    assert json.loads((ckpt / "metrics.json").read_text()) == json.loads((run / "metrics.json").read_text())
    assert len(read_examples(ckpt)) == m["test_size"]
    assert len(read_examples(ckpt, CALIBRATION_FILE)) == 192  # the whole (small) training split


def test_checkpoint_reproduces_the_reported_test_accuracy(trained):
    """The checkpoint holds the best-on-validation weights that the metrics were measured with."""
    run, m = trained
    model, cfg, meta, tokenizer = load_checkpoint(run / "checkpoint")
    assert isinstance(model, SideTuned) and meta["labels"] == m["labels"]
    from export.parity import to_examples

    loader = make_loader(
        to_examples(read_examples(run / "checkpoint"), meta["labels"]), tokenizer, meta["max_length"], 64, shuffle=False
    )
    correct = n = 0
    with torch.no_grad():
        for batch in loader:
            logits, _ = model(batch)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
    assert correct / n == pytest.approx(m["test_accuracy"])
