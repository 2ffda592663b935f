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

from deploy.k8s.config import ConfigError, DeployConfig, load_repository
from deploy.k8s.render import MANIFESTS_DIR, render
from serving.repository import DEFAULT_REPOSITORY

log = logging.getLogger("deploy.k8s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.k8s",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--repository", default=str(DEFAULT_REPOSITORY), help="a generated model repository (default: %(default)s)"
    )
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
    log.info(
        "tasks %s (target %s); wrote %d files under %s; apply with: kubectl apply -f %s",
        ", ".join(sorted(repo.tasks)),
        repo.serve.target,
        len(written),
        args.out,
        Path(args.out) / MANIFESTS_DIR,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
