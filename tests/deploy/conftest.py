"""Fixtures for the deployment tests: generated repositories (gpu and cpu targets) and their renderings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.k8s.config import DeployConfig, load_repository
from deploy.k8s.render import render
from serving.config import ServeConfig
from serving.repository import generate_repository
from tests.serving.fake_export import build_fake_export

# Not the defaults, so that a value copied from the defaults instead of read from the repository shows.
SERVE = ServeConfig(max_batch_size=16, max_queue_size=64, queue_timeout_us=1_500_000, tokenizer_instances=2)


@pytest.fixture(scope="session")
def fake_runs(tmp_path_factory) -> list[Path]:
    """A single-text task and a text-pair task sharing one backbone."""
    root = tmp_path_factory.mktemp("deploy-runs")
    return [
        build_fake_export(root / "sentiment", task="sentiment", max_length=32),
        build_fake_export(
            root / "nli",
            task="nli",
            labels=("entailment", "neutral", "contradiction"),
            text_pair=True,
            max_length=32,
            adapter_seed=2,
        ),
    ]


@pytest.fixture(scope="session")
def gpu_repository(fake_runs, tmp_path_factory) -> Path:
    """The `--target gpu` repository (tensorrt_plan configs; no engines on this machine, hence NOTE.md files)."""
    repo = tmp_path_factory.mktemp("gpu") / "model_repository"
    generate_repository(fake_runs, repo, ServeConfig(**{**SERVE.to_dict(), "target": "gpu"}))
    return repo


@pytest.fixture(scope="session")
def cpu_repository(fake_runs, tmp_path_factory) -> Path:
    """The CPU repository (python models only), which the embedded tritonserver can load."""
    repo = tmp_path_factory.mktemp("cpu") / "model_repository"
    generate_repository(fake_runs, repo, ServeConfig(max_batch_size=8))
    return repo


def load_rendered(out: Path) -> dict[str, dict]:
    """Every rendered YAML file under `out` (relative path -> object)."""
    return {str(p.relative_to(out)): yaml.safe_load(p.read_text()) for p in sorted(out.rglob("*.yaml"))}


@pytest.fixture(scope="session")
def rendered(gpu_repository, tmp_path_factory) -> Path:
    """The default rendering (pvc model source, ServiceMonitor) of the gpu repository."""
    out = tmp_path_factory.mktemp("rendered")
    render(DeployConfig(), load_repository(gpu_repository), out, allow_incomplete=True)
    return out


@pytest.fixture(scope="session")
def rendered_s3(gpu_repository, tmp_path_factory) -> Path:
    """Object storage, a digest-pinned image, pod annotations instead of a ServiceMonitor."""
    out = tmp_path_factory.mktemp("rendered-s3")
    cfg = DeployConfig(
        model_source="s3://models-bucket/mp-ismoe/v1",
        service_monitor=False,
        replicas=2,
        max_replicas=6,
        image="registry.example.com/mp-ismoe-triton@sha256:" + "ab" * 32,
    )
    render(cfg, load_repository(gpu_repository), out, allow_incomplete=True)
    return out
