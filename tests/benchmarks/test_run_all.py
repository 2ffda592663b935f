"""`make bench`'s report: each producer renders its own JSON; an absent input is one plain sentence, and a
JSON that does not match its producer's schema is an error in that producer, not a skipped section."""

import json

import pytest

from benchmarks import run_all

COMPARE = {
    "command": "python -m experiments.compare --seeds 0 1",
    "environment": {"date": "2026-12-01 00:00 UTC", "cpu": "cpu", "cpu_count": 2, "versions": {"torch": "2.13.0"}},
    "seeds": [0, 1],
    "names": {"lst": "LST", "mp_ismoe": "MP-ISMoE"},
    "tasks": {
        "toy": {
            "what": "a toy task",
            "metric": "accuracy",
            "methods": {
                m: {
                    "lr": 1e-3,
                    "tuning": {"0.001": 0.8},
                    "runs": {str(s): {"status": "ok", "test": acc + 0.01 * s, "val": 0.8} for s in (0, 1)},
                }
                for m, acc in (("lst", 0.80), ("mp_ismoe", 0.82))
            },
        }
    },
}


def test_absent_inputs_are_stated_never_invented(tmp_path):
    docs = tmp_path / "docs"
    assert run_all.main(["--render-only", "--docs", str(docs)]) == 0
    text = (docs / "BENCHMARKS.md").read_text()
    assert text.count("Not measured in this run") == 8 and not list(docs.glob("*.png"))


def test_a_producer_renders_its_own_section(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "compare.json").write_text(json.dumps(COMPARE))
    assert run_all.main(["--render-only", "--docs", str(docs)]) == 0
    text = (docs / "BENCHMARKS.md").read_text()
    assert "- toy (test accuracy x100): LST 80.50 ± 0.71; MP-ISMoE 82.50 ± 0.71" in text
    assert text.count("Not measured in this run") == 7


def test_a_schema_change_fails_in_its_producer(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "compare.json").write_text(json.dumps({"command": "old", "results": []}))  # an older layout
    with pytest.raises(KeyError):
        run_all.main(["--render-only", "--docs", str(docs)])
