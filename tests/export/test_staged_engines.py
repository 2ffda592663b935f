"""TensorRT engines are published next to onnx/ only when the export gate passes (export/pipeline.py)."""

import pytest

from export.pipeline import staged_engines


def test_a_failed_gate_leaves_no_engines_for_serving(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RuntimeError, match="gate failed"):
        with staged_engines(run) as engines:
            (engines / "backbone.sm90.trt10.8.plan").write_bytes(b"engine")
            raise RuntimeError("gate failed")
    assert not (run / "engines").exists() and list(run.iterdir()) == []


def test_a_passed_gate_replaces_the_engines_and_keeps_the_timing_cache(tmp_path):
    run = tmp_path / "run"
    (run / "engines").mkdir(parents=True)
    (run / "engines" / "backbone.sm80.trt10.7.plan").write_bytes(b"old")
    (run / "engines" / "timing.cache").write_bytes(b"timings")
    with staged_engines(run) as engines:
        assert (engines / "timing.cache").read_bytes() == b"timings"
        (engines / "backbone.sm90.trt10.8.plan").write_bytes(b"new")
    assert sorted(p.name for p in (run / "engines").iterdir()) == ["backbone.sm90.trt10.8.plan", "timing.cache"]
    assert sorted(p.name for p in run.iterdir()) == ["engines"]


def test_an_export_without_tensorrt_moves_stale_engines_aside(tmp_path):
    """Engines of an earlier export no longer match the graphs: serving must not find them, nothing is deleted."""
    run = tmp_path / "run"
    (run / "engines").mkdir(parents=True)
    (run / "engines" / "backbone.plan").write_bytes(b"old")
    with staged_engines(run):
        pass
    assert not (run / "engines").exists()
    (stale,) = run.glob("engines.stale-*")
    assert (stale / "backbone.plan").read_bytes() == b"old"


def test_a_failed_gate_keeps_the_engines_of_the_last_good_export(tmp_path):
    run = tmp_path / "run"
    (run / "engines").mkdir(parents=True)
    (run / "engines" / "backbone.plan").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with staged_engines(run):
            raise RuntimeError("gate failed")  # onnx/ stays the previous export's too
    assert (run / "engines" / "backbone.plan").read_bytes() == b"old"
