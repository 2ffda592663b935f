"""Fixtures for the serving tests: fake exports (shared and separate backbones) and a served repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from export.io_spec import load_io_spec
from serving.artifacts import load_run
from serving.config import ServeConfig
from serving.repository import generate_repository
from serving.server import ServerOptions, TritonServer
from serving.supervisor import Supervisor, SupervisorConfig
from tests.serving.fake_export import build_fake_export

NLI_LABELS = ("entailment", "neutral", "contradiction")
MAX_LENGTH = 32


@pytest.fixture(scope="session")
def fake_runs(tmp_path_factory) -> dict:
    """Three exported runs: sentiment and nli (text pairs) share a backbone; topic has its own."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "sentiment": build_fake_export(root / "sentiment", task="sentiment", max_length=MAX_LENGTH),
        "nli": build_fake_export(
            root / "nli", task="nli", labels=NLI_LABELS, text_pair=True, max_length=MAX_LENGTH, adapter_seed=2
        ),
        "topic": build_fake_export(
            root / "topic",
            task="topic",
            labels=("business", "sport", "tech"),
            max_length=MAX_LENGTH,
            backbone_seed=7,
            adapter_seed=3,
            external_data=False,
        ),
    }


@pytest.fixture(scope="session")
def serve_runs(fake_runs) -> dict:
    """The runs the end-to-end tests serve: a single-text task and a text-pair task.

    SERVING_TEST_RUN=runs/<name> swaps the single-text one for a real export (`make export`).
    """
    real = os.environ.get("SERVING_TEST_RUN")
    return {"single": Path(real) if real else fake_runs["sentiment"], "pair": fake_runs["nli"]}


@pytest.fixture(scope="session")
def specs(serve_runs) -> dict:
    """io_spec of each served run, by role ("single", "pair")."""
    return {role: load_io_spec(load_run(run).export_dir) for role, run in serve_runs.items()}


@pytest.fixture(scope="module")
def served(serve_runs, tmp_path_factory):
    """A real tritonserver on free 127.0.0.1 ports serving both runs (`server.plan` says how)."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    plan = generate_repository([serve_runs["single"], serve_runs["pair"]], repo, ServeConfig(max_batch_size=8))
    options = ServerOptions.on_free_ports(repository=repo, log_file=repo.parent / "tritonserver.log")
    with TritonServer(options) as server:
        server.plan = plan
        yield server


HOSTILE_CONFIG = ServeConfig(max_batch_size=8, max_queue_delay_us=20_000)  # 20 ms: concurrent requests merge
FAST_SUPERVISOR = SupervisorConfig(backoff_initial_s=0.2, backoff_max_s=2.0, canary_interval_s=0.5, canary_strikes=2)


@pytest.fixture(scope="module")
def supervised(serve_runs, tmp_path_factory):
    """A supervised tritonserver (guard, canary readiness, restarts) serving both runs, as `make serve` runs it."""
    repo = tmp_path_factory.mktemp("supervised") / "model_repository"
    generate_repository([serve_runs["single"], serve_runs["pair"]], repo, HOSTILE_CONFIG)
    options = ServerOptions.on_free_ports(repository=repo, log_file=repo.parent / "tritonserver.log")
    supervisor = Supervisor(TritonServer(options), FAST_SUPERVISOR, status_file=repo.parent / "status.json")
    supervisor.start_background()
    yield supervisor
    supervisor.stop_background()
    assert supervisor.state == "stopped" and supervisor.server.process.poll() is not None
