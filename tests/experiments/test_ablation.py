"""The ablation harness end to end: 2 variants x 2 seeds on the tiny model, report with mean and std."""

import json

import pytest

from experiments.ablation import TABLES, VARIANTS, main
from tests.conftest import tiny_overrides
from training.config import load_config


def test_every_variant_is_a_valid_config_and_every_table_row_a_variant():
    for v in VARIANTS.values():
        load_config("configs/ablation.yaml", list(v.overrides))
    assert {n for _, rows in TABLES for n, _ in rows} == set(VARIANTS)
    assert load_config("configs/ablation.yaml", list(VARIANTS["lst"].overrides)).train.method == "lst"


def test_bad_override_fails_before_any_run(tmp_path, capsys):
    assert (
        main(
            [
                "--only",
                "lst",
                "--set",
                "quant.bits=3",
                "--out-dir",
                str(tmp_path / "runs"),
                "--docs",
                str(tmp_path / "docs"),
            ]
        )
        == 2
    )
    assert "quant.bits" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_harness_two_variants_two_seeds(toy_csv, tmp_path):
    sets = [
        a
        for o in tiny_overrides(toy_csv) + ["train.epochs=1", "train.max_steps=2", "train.threads=1"]
        for a in ("--set", o)
    ]
    docs = tmp_path / "docs"
    rc = main(
        [
            "--config",
            "configs/ablation.yaml",
            "--only",
            "lst",
            "mp_ismoe",
            "--seeds",
            "0",
            "1",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path / "runs"),
            "--docs",
            str(docs),
            *sets,
        ]
    )
    assert rc == 0
    report = json.loads((docs / "ablation.json").read_text())
    assert set(report["variants"]) == {"lst", "mp_ismoe"}
    for name, entry in report["variants"].items():
        s = entry["summary"]
        assert s["n"] == 2 and len(s["test_accuracy"]) == 2
        assert 0.0 <= s["test_accuracy_mean"] <= 1.0 and s["test_accuracy_std"] >= 0.0
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        assert all((tmp_path / "runs" / name / f"seed{r['seed']}" / "metrics.json").is_file() for r in entry["runs"])
    assert report["variants"]["lst"]["runs"][0]["metrics"]["method"] == "lst"
    assert report["variants"]["mp_ismoe"]["runs"][0]["metrics"]["backbone_bytes_ratio"] < 0.5  # int8 backbone
    md = (docs / "ablation.md").read_text()
    assert "| LST |" in md and "±" in md and "## What our data supports" in md and "(n=2)" in md
    assert "+ GNP-IQ + ISMoE (MP-ISMoE) vs LST" in md
    assert (docs / "ablation.png").stat().st_size > 1000
