"""benchmarks/serving_bench.py: texts loading (fast) and a bounded run against a served task (slow)."""

import json

import pytest

from benchmarks import serving_bench as bench


def test_read_texts_formats(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    (tmp_path / "t.csv").write_text("text,text_pair,label\na,b,x\nc,d,y\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert bench.read_texts(tmp_path / "t.txt") == (["one", "two"], None)
    assert bench.read_texts(tmp_path / "t.csv") == (["a", "c"], ["b", "d"])
    assert bench.read_texts(tmp_path / "t.jsonl") == (["a", "b"], None)


def test_test_split_is_found_else_asked_for(tmp_path):
    with pytest.raises(SystemExit, match="--texts"):
        bench.load_texts(tmp_path, None)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "heldout.jsonl").write_text('{"text": "from the split", "text_pair": null, "label": "a"}\n')
    assert bench.load_texts(tmp_path, None)[:2] == (["from the split"], None)


@pytest.mark.slow
def test_bounded_benchmark_against_a_server(served, serve_runs, specs, tmp_path):
    texts = ["the film was great", "an awful, tedious plot", "fine"]
    result = bench.run_benchmark(
        serve_runs["single"], texts, None, requests=20, warmup=2, concurrencies=(1, 4), url=served.grpc_url
    )
    assert [r["concurrency"] for r in result["results"]] == [1, 4]
    for r in result["results"]:
        assert r["triton"]["requests"] == 20 and r["ratio_p50"] > 0 and r["in_process"]["throughput_rps"] > 0
    json_path, md_path = bench.write_report(result, tmp_path)
    assert json.loads(json_path.read_text())["task"] == specs["single"].task and "| 4 | triton |" in md_path.read_text()
