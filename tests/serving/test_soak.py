"""benchmarks/soak.py, bounded: python -m serving in a subprocess, a soak, an overload, the report."""

import json
from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = pytest.mark.slow


def test_a_bounded_soak_and_overload(fake_runs, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("the film was great\nan awful, tedious plot\na charming story\nfine\n")
    code = soak.main(
        [
            "--run",
            str(fake_runs["sentiment"]),
            "--texts",
            str(texts),
            "--requests",
            "60",
            "--concurrency",
            "4",
            "--overload-requests",
            "64",
            "--overload-concurrency",
            "16",
            "--out-dir",
            str(tmp_path),
            "--serve-args",
            "--max-queue-size 8",
        ]
    )
    result = json.loads((tmp_path / "serving_soak.json").read_text())
    assert code == 0, soak.verdict(result)
    assert result["soak"]["ok"]["count"] == 60 and result["soak"]["label_mismatches"] == 0
    over = result["overload"]
    assert over["ok"]["count"] + over["busy"]["count"] == 64 and over["failed"]["count"] == 0
    assert result["restarts"] == 0 and result["serve_config"]["max_queue_size"] == 8
    assert "| overload | 16 | 64 |" in (tmp_path / "serving_soak.md").read_text()


def test_the_verdict_names_what_failed():
    phase = {"failed": {"count": 0}, "busy": {"count": 0}, "failures": [], "label_mismatches": 0}
    result = {"soak": dict(phase), "overload": dict(phase, rejection_bound_ms=8000.0), "restarts": 0}
    assert soak.verdict(result) == []
    result["overload"] = dict(result["overload"], busy={"count": 3, "max_ms": 9000.0})
    result["soak"] = dict(result["soak"], failed={"count": 1}, failures=["ServingError: boom"])
    assert soak.verdict(result) == [
        "soak: 1 failed requests: ['ServingError: boom']",
        "overload: a rejection took 9000.0 ms, over 8000.0 ms",
    ]


def test_the_benchmarks_section_reads_the_committed_soak_report(tmp_path):
    """docs/BENCHMARKS.md's soak rows come from the JSON the soak writes (counts, not dicts)."""
    import shutil

    shutil.copy(Path(__file__).resolve().parents[2] / "docs" / "serving_soak.json", tmp_path)
    rows = [line for line in soak.summary(tmp_path) if line.startswith("| soak") or line.startswith("| overload")]
    assert len(rows) == 2 and all("{" not in r for r in rows)
    assert rows[0].split(" | ")[3] == "2000"  # answered
