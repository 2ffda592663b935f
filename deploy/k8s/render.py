"""Write the manifests: check the cluster's settings against the repository, then one YAML file per object.

OUT/manifests/NN-<kind>.yaml (`kubectl apply -f OUT/manifests/` takes them in name order), OUT/upload-pod.yaml
(with a pvc: model source) and OUT/prometheus-adapter-values.yaml (the autoscaling metric's rule).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from deploy.k8s import manifests as mf
from deploy.k8s.config import ConfigError, DeployConfig, Repository
from deploy.k8s.pod import mib, shm_mib

log = logging.getLogger("deploy.k8s")
MANIFESTS_DIR = "manifests"
UPLOAD_POD = "upload-pod.yaml"
ADAPTER_VALUES = "prometheus-adapter-values.yaml"
HEADER = "# Rendered by `python -m deploy.k8s` from {repo} (repository.json sha256 {sha}); do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL), key order as built, no anchors (each object spelled out)."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def to_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def check_consistent(cfg: DeployConfig, repo: Repository, allow_incomplete: bool = False) -> None:
    """Cross-checks between the cluster's settings and the repository (its ServeConfig and its engines)."""
    missing = sorted(
        p.parent.name for p in repo.path.glob("*/NOTE.md")
    )  # serving/repository.py: a model without engine
    if missing and not allow_incomplete:
        raise ConfigError(
            f"{repo.path}: no TensorRT engine for {', '.join(missing)} (see their NOTE.md); tritonserver "
            "would exit on the load error. Build the engines (make export on a TensorRT machine), "
            "regenerate, or pass --allow-incomplete to render anyway"
        )
    if cfg.target_queue_us >= repo.serve.queue_timeout_us:
        raise ConfigError(
            f"deploy.target_queue_us {cfg.target_queue_us} is not below the repository's queue_timeout_us "
            f"{repo.serve.queue_timeout_us}: requests are rejected before the target is ever reached"
        )
    if shm_mib(repo) > mib(cfg.memory) / 2:
        raise ConfigError(
            f"deploy.memory {cfg.memory} leaves too little beside /dev/shm ({shm_mib(repo)} MiB for "
            f"{repo.python_instances} python stubs); raise --memory"
        )


def render(cfg: DeployConfig, repo: Repository, out: str | Path, allow_incomplete: bool = False) -> list[Path]:
    """Write the manifests, the upload pod and the adapter values under `out`; return the files written.

    Earlier renderings' files are removed first (a PVC that is no longer wanted must not be applied).
    """
    check_consistent(cfg, repo, allow_incomplete)
    out = Path(out)
    (out / MANIFESTS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in [*(out / MANIFESTS_DIR).glob("[0-9][0-9]-*.yaml"), out / UPLOAD_POD, out / ADAPTER_VALUES]:
        stale.unlink(missing_ok=True)
    header = HEADER.format(repo=repo.path, sha=repo.sha256[:16])
    files = {Path(MANIFESTS_DIR) / name: obj for name, obj in mf.manifests(cfg, repo).items()}
    if cfg.pvc_claim:
        files[Path(UPLOAD_POD)] = mf.upload_pod(cfg)
    files[Path(ADAPTER_VALUES)] = {"rules": {"custom": [mf.adapter_rule(cfg, repo)]}}
    for rel, obj in files.items():
        (out / rel).write_text(header + to_yaml(obj))
    for note in repo.notes:
        log.warning("repository note: %s", note)
    return [out / rel for rel in files]
