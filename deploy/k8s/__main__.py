"""`python -m deploy.k8s`: render Kubernetes manifests for a generated model repository.

Example:
  python -m serving --runs runs/default --target gpu --generate-only --repository build/k8s/model_repository
  python -m deploy.k8s --repository build/k8s/model_repository --out deploy/rendered \\
      --image registry.example.com/mp-ismoe-triton:0.1.0 --max-replicas 8

Writes OUT/manifests/*.yaml (`kubectl apply -f OUT/manifests/`), OUT/upload-pod.yaml (with a pvc: model
source) and OUT/prometheus-adapter-values.yaml (the autoscaling metric's rule). Ports, restricted APIs,
probe timings, tasks and the serve config come from serving/ and the repository's repository.json.
See docs/DEPLOY.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from deploy.k8s import manifests as mf
from deploy.k8s.config import ConfigError, DeployConfig, Repository, load_repository
from deploy.k8s.pod import mib, shm_mib
from serving.repository import DEFAULT_REPOSITORY

log = logging.getLogger("deploy.k8s")
MANIFESTS_DIR = "manifests"
UPLOAD_POD = "upload-pod.yaml"
ADAPTER_VALUES = "prometheus-adapter-values.yaml"
HEADER = "# Rendered by `python -m deploy.k8s` from {repo} (repository.json sha256 {sha}); do not edit.\n"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL), key order as built, no anchors (each object spelled out)."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(obj: dict) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120)


def check_consistent(cfg: DeployConfig, repo: Repository, allow_incomplete: bool = False) -> None:
    """Cross-checks between the cluster's settings and the repository (its ServeConfig and its engines)."""
    missing = sorted(p.parent.name for p in repo.path.glob("*/NOTE.md"))  # serving/repository.py: a model without engine
    if missing and not allow_incomplete:
        raise ConfigError(f"{repo.path}: no TensorRT engine for {', '.join(missing)} (see their NOTE.md); tritonserver "
                          "would exit on the load error. Build the engines (make export on a TensorRT machine), "
                          "regenerate, or pass --allow-incomplete to render anyway")
    if cfg.target_queue_us >= repo.serve.queue_timeout_us:
        raise ConfigError(f"deploy.target_queue_us {cfg.target_queue_us} is not below the repository's queue_timeout_us "
                          f"{repo.serve.queue_timeout_us}: requests are rejected before the target is ever reached")
    if shm_mib(repo) > mib(cfg.memory) / 2:
        raise ConfigError(f"deploy.memory {cfg.memory} leaves too little beside /dev/shm ({shm_mib(repo)} MiB for "
                          f"{repo.python_instances} python stubs); raise --memory")


def render(cfg: DeployConfig, repo: Repository, out: str | Path, allow_incomplete: bool = False) -> list[Path]:
    """Write the manifests, the upload pod and the adapter values under `out`; return the files written.

    Earlier renderings' manifests are removed first (a pvc that is no longer wanted must not be applied).
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
    written = []
    for rel, obj in files.items():
        (out / rel).write_text(header + to_yaml(obj))
        written.append(out / rel)
    for note in repo.notes:
        log.warning("repository note: %s", note)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.k8s", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="a generated model repository (default: %(default)s)")
    p.add_argument("--out", default="deploy/rendered", help="output directory (default: %(default)s)")
    p.add_argument("--allow-incomplete", action="store_true", help="render although models lack their TensorRT engine")
    defaults = DeployConfig()
    for f in fields(DeployConfig):
        flag, value, text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), f.metadata["help"]
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=text)
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"{text} (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = DeployConfig(**{f.name: getattr(args, f.name) for f in fields(DeployConfig)})
        repo = load_repository(args.repository)
        written = render(cfg, repo, args.out, args.allow_incomplete)
    except (ConfigError, OSError) as e:
        log.error("%s", e)
        return 1
    log.info("tasks %s (target %s); wrote %d files under %s; apply with: kubectl apply -f %s",
             ", ".join(sorted(repo.tasks)), repo.serve.target, len(written), args.out, Path(args.out) / MANIFESTS_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
