"""A regression task end to end (STS-B style: one score per text): trained with MSE, exported through
the parity gate, served as a score by tritonserver, and `make regress` passing on it."""

import random

import pytest

from contracts.parity_report import PARITY_FILE, ExportReport
from tests.conftest import FILLER, NEGATIVE, POSITIVE, tiny_overrides
from training.config import DataConfig
from training.data import load_splits

pytestmark = pytest.mark.slow


def write_scores_csv(path, n: int = 240, seed: int = 0) -> str:
    """A score in [-2, 2] per text: +1 per positive word, -1 per negative word, plus a little noise."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        pos, neg = rng.randint(0, 2), rng.randint(0, 2)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{pos - neg + rng.uniform(-0.25, 0.25):.3f}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def scores_csv(tmp_path_factory):
    return write_scores_csv(tmp_path_factory.mktemp("data") / "scores.csv")


def test_a_numeric_label_column_is_read_as_regression(scores_csv, tmp_path):
    s = load_splits(DataConfig(dataset=scores_csv))
    assert s.task_type == "regression" and s.labels == ["score"] and isinstance(s.train[0].label, float)
    stars = tmp_path / "stars.csv"  # integer labels stay classes unless regression is asked for
    stars.write_text("text,label\n" + "".join(f"review {i},{1 + i % 3}\n" for i in range(30)))
    assert load_splits(DataConfig(dataset=str(stars))).task_type == "classification"
    assert load_splits(DataConfig(dataset=str(stars), task_type="regression")).task_type == "regression"


def test_regression_trains_exports_serves_and_passes_regress(scores_csv, tmp_path):
    from export.pipeline import ExportConfig, run_export
    from regress.cli import main as regress
    from serving.client import Client
    from serving.config import ServeConfig
    from serving.repository import generate_repository
    from serving.server import ServerOptions, TritonServer
    from training.config import load_config
    from training.trainer import Trainer

    run = tmp_path / "scores"
    m = Trainer(
        load_config(overrides=[*tiny_overrides(scores_csv), "train.epochs=8", "train.lr=3e-3", "train.threads=1"]),
        run,
        progress=False,
    ).run()
    assert m["task_type"] == "regression" and m["primary_metric"] == "pearson"
    assert m["test_metrics"]["pearson"] > 0.5 and {"spearman", "mse"} <= set(m["test_metrics"])
    run_export(run, ExportConfig(threads=1, compare_fp32_size=False, tensorrt="off"), log=lambda *a: None)
    gated = ExportReport.load(run / "onnx" / PARITY_FILE).gated()
    assert gated.passed and gated.end_to_end.metric == "pearson" and gated.end_to_end.label_agreement is None
    repo = tmp_path / "model_repository"
    generate_repository([run], repo, ServeConfig(ort_threads=1))
    with TritonServer(ServerOptions.on_free_ports(repository=repo, log_file=tmp_path / "triton.log")) as server:
        with Client(server.grpc_url, "grpc") as client:
            high, low = client.classify("scores", ["wonderful brilliant film", "awful dreadful film"])
    assert high.score is not None and high.probabilities == {} and high.score > low.score
    args = ["--run", str(run), "--threads", "1"]
    assert regress([*args, "--update", "--serve"]) == 0
    assert regress([*args, "--serve"]) == 0
