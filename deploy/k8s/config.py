"""What the manifests read: the generated repository (repository.json) and DeployConfig (what only a cluster adds).

Everything the server already decides (ports, restricted APIs, queue bounds, tasks, max batch size) comes
from serving/: the repository's own repository.json (its ServeConfig and tasks) and ServerOptions'
defaults. DeployConfig holds only what a cluster adds: image, replicas, storage, scaling target, sizes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from serving.config import ServeConfig
from serving.repository import GENERATOR, SUMMARY_FILE
from serving.server import ServerOptions
from training.config import ConfigError

VERSION = importlib.metadata.version("mp-ismoe")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")
_SOURCE = re.compile(r"^(pvc:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?|(s3|gs|as)://\S+)$")
_QUANTITY = {"cpu": re.compile(r"^[0-9]+(\.[0-9]+|m)?$"), "memory": re.compile(r"^[0-9]+(Ki|Mi|Gi|Ti)?$")}


def server_defaults() -> dict:
    """ServerOptions' field defaults (ports, timeouts, shm sizes) without constructing one (it makes a key)."""
    return {f.name: f.default_factory() if callable(f.default_factory) else f.default for f in fields(ServerOptions)}


def _opt(default, help: str):
    """A field with its --help text (deploy/k8s/__main__.py builds its flags from these)."""
    return field(default=default, metadata={"help": help})


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"deploy.{key}: {msg}")


@dataclass
class DeployConfig:
    """What a Kubernetes deployment adds to the served repository; checks itself on construction."""

    name: str = _opt("mp-ismoe", "name of the Deployment, Service and the other objects")
    namespace: str = _opt(
        "mp-ismoe", "namespace of every object (rendered as a Namespace with the restricted pod security level)"
    )
    image: str = _opt(
        f"mp-ismoe-triton:{VERSION}", "the image deploy/Dockerfile built (push it; a @sha256 digest is best)"
    )
    replicas: int = _opt(1, "minimum replicas (the HorizontalPodAutoscaler's minReplicas), one GPU each")
    max_replicas: int = _opt(4, "maximum replicas the autoscaler may add")
    model_source: str = _opt(
        "pvc:mp-ismoe-models",
        "pvc:<claim> (a ReadWriteMany volume, mounted read-only) or "
        "s3://, gs://, as:// (Triton reads the repository from object storage)",
    )
    storage_class: str = _opt("", "storageClassName of the rendered PVC (empty: the cluster's default)")
    target_queue_us: int = _opt(
        50_000, "autoscaling target: average queue time per ensemble request (us), summed over its models"
    )
    cpu: str = _opt("4", "CPU request of the tritonserver container (the limit is twice it)")
    memory: str = _opt("16Gi", "memory request and limit of the tritonserver container (includes /dev/shm)")
    service_monitor: bool = _opt(True, "a prometheus-operator ServiceMonitor (else prometheus.io/* pod annotations)")
    startup_s: int = _opt(600, "how long the startup probe waits for the models to load (s)")
    internal_http_port: int = _opt(8080, "tritonserver's own HTTP port, on 127.0.0.1 inside the pod behind the guard")

    def __post_init__(self):
        _check(
            bool(_DNS_LABEL.match(self.name)),
            "name",
            f"must be a DNS label of at most 52 characters, got {self.name!r}",
        )
        _check(bool(_DNS_LABEL.match(self.namespace)), "namespace", f"must be a DNS label, got {self.namespace!r}")
        _check(
            bool(self.image)
            and not self.image.endswith(":latest")
            and (":" in self.image.rsplit("/", 1)[-1] or "@" in self.image),
            "image",
            f"needs an explicit tag or digest (not latest), got {self.image!r}",
        )
        _check(
            1 <= self.replicas <= self.max_replicas <= 100,
            "replicas",
            f"need 1 <= replicas <= max_replicas <= 100, got {self.replicas}, {self.max_replicas}",
        )
        _check(
            bool(_SOURCE.match(self.model_source)),
            "model_source",
            f"must be pvc:<claim> or an s3://, gs:// or as:// URL, got {self.model_source!r}",
        )
        _check(self.target_queue_us >= 100, "target_queue_us", f"must be >= 100 us, got {self.target_queue_us}")
        for key, pattern in _QUANTITY.items():
            _check(
                bool(pattern.match(getattr(self, key))),
                key,
                f"must be a Kubernetes {key} quantity like {getattr(DeployConfig, key)!r}, got {getattr(self, key)!r}",
            )
        _check(60 <= self.startup_s <= 3600, "startup_s", f"must be in [60, 3600], got {self.startup_s}")
        _check(
            1024 <= self.internal_http_port < 65536 and self.internal_http_port not in self.public_ports.values(),
            "internal_http_port",
            f"must be a free port >= 1024 other than {sorted(self.public_ports.values())}",
        )

    @property
    def public_ports(self) -> dict[str, int]:
        """The server's ports, as `python -m serving` opens them: http (the guard), grpc, metrics."""
        d = server_defaults()
        return {"http": d["http_port"], "grpc": d["grpc_port"], "metrics": d["metrics_port"]}

    @property
    def pvc_claim(self) -> str | None:
        return self.model_source[len("pvc:") :] if self.model_source.startswith("pvc:") else None


@dataclass(frozen=True)
class Repository:
    """A generated model repository as its repository.json describes it."""

    path: Path
    serve: ServeConfig
    tasks: dict[str, bool]  # ensemble name -> text-pair input
    models: dict[str, set[str]]  # component kind (tokenizer, backbone, adapter, postprocess) -> model names
    notes: tuple[str, ...]
    size_bytes: int
    sha256: str  # of repository.json, which lists every file: a new repository rolls the pods

    @property
    def python_instances(self) -> int:
        """Python-backend stub processes (each holds its own /dev/shm region)."""
        s = self.serve
        n = (
            len(self.models["tokenizer"]) * s.tokenizer_instances
            + len(self.models["postprocess"]) * s.postprocess_instances
        )
        if s.target == "cpu":  # backbone and adapters run ONNX Runtime in python models too
            n += len(self.models["backbone"]) * s.backbone_instances + len(self.models["adapter"]) * s.adapter_instances
        return n


def load_repository(path: str | Path) -> Repository:
    """Read repository.json of a repository `python -m serving --generate-only` wrote; ConfigError if there is none."""
    path = Path(path)
    summary_file = path / SUMMARY_FILE
    try:
        text = summary_file.read_text()
        summary = json.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{summary_file}: {e}; generate the repository first: python -m serving --runs runs/<name> "
            f"--target gpu --generate-only --repository {path}"
        ) from None
    if summary.get("generated_by") != GENERATOR or not summary.get("tasks"):
        raise ConfigError(f"{summary_file} was not written by {GENERATOR} or lists no task; regenerate the repository")
    tasks = summary["tasks"]
    models = {kind: {t[kind] for t in tasks.values()} for kind in ("tokenizer", "backbone", "adapter", "postprocess")}
    size = sum((path / f).stat().st_size for f in summary.get("files", []) if (path / f).is_file())
    return Repository(
        path,
        ServeConfig(**summary["serve_config"]),
        {k: bool(v.get("text_pair")) for k, v in tasks.items()},
        models,
        tuple(summary.get("notes", [])),
        size,
        hashlib.sha256(text.encode()).hexdigest(),
    )
