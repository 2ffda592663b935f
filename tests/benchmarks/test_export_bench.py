"""benchmarks/export_bench.py: the engines take turns, so a slow spell lands on all of them."""

from benchmarks.export_bench import time_in_rounds


def test_engines_take_turns_in_blocks_after_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b")}
    times, outputs = time_in_rounds(fns, repeats=6, warmup=1, cell_seconds=60, rounds=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6} and outputs == {"a": "a", "b": "b"}
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # 1 warmup + 2 timed each


def test_rounds_stop_early_once_every_engine_has_five_calls_past_the_cap():
    times, _ = time_in_rounds({"a": lambda: None, "b": lambda: None}, repeats=100, warmup=0, cell_seconds=0, rounds=20)
    assert {len(v) for v in times.values()} == {5}  # blocks of 5: the cap is met after the first round
