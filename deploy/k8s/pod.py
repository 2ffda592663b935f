"""The serving pod: tritonserver (NGC image) behind serving's HTTP guard, as `python -m serving` runs them.

Two containers from the one image deploy/Dockerfile builds:

- `triton`: tritonserver with the flags serving/server.py gives it (restricted repository, shared-memory,
  trace and logging APIs with the admin key from a Secret; strict readiness; exit on a load error; no
  model control); its HTTP endpoint on 127.0.0.1 only, gRPC and metrics on the pod's address.
- `guard` (deploy/sidecar.py): serving/guard.py on the public HTTP port, bounding requests and answering
  /v2/health/ready from serving/canary.py, so that ready means a real inference answered as at startup
  (Triton's own stays 200 with a dead python stub).

Probes (docs/DEPLOY.md): startup and liveness are Triton's /v2/health/live (through the guard; Triton
starts its endpoints only after every model loaded, so live = loaded); readiness is the canary, at the
supervisor's interval and strike count.
"""

from __future__ import annotations

from deploy.k8s.config import VERSION, DeployConfig, Repository, server_defaults
from serving.server import ADMIN_HEADER, RESTRICTED_APIS
from serving.supervisor import SupervisorConfig

MODELS_DIR = "/models"
ADMIN_KEY_ENV = "MPISMOE_ADMIN_KEY"
UID = 1000  # the NGC Triton image's non-root user `triton-server` (its build asserts uid and gid 1000)
GUARD_CPU, GUARD_MEMORY = "500m", "1Gi"  # the guard buffers at most a few max-size (16 MiB) bodies
PRE_STOP_S = 5  # endpoints drop the pod before its servers stop accepting
SHM_PER_STUB_MIB = 64  # python backend: 16 MiB per stub at start, grown by 16 MiB as batches need


def selector(cfg: DeployConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": cfg.name, "app.kubernetes.io/component": "inference-server"}


def labels(cfg: DeployConfig) -> dict[str, str]:
    return {
        **selector(cfg),
        "app.kubernetes.io/part-of": "mp-ismoe",
        "app.kubernetes.io/version": VERSION,
        "app.kubernetes.io/managed-by": "deploy.k8s",
    }


def admin_secret(cfg: DeployConfig) -> str:
    return f"{cfg.name}-admin-key"


def object_store_secret(cfg: DeployConfig) -> str:
    return f"{cfg.name}-object-store"


def model_repository(cfg: DeployConfig) -> str:
    return MODELS_DIR if cfg.pvc_claim else cfg.model_source


def restricted_api(key: str) -> str:
    """The value of --http-restricted-api / --grpc-restricted-protocol, as serving/server.py builds it."""
    return f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"


def triton_args(cfg: DeployConfig) -> list[str]:
    """tritonserver's command line: serving/server.py's flags with the pod's addresses and repository.

    What differs from `python -m serving`, and why: the repository (/models or an object-store URL); no
    --backend-directory (the image's own backends) and no shm region prefix (the pod's /dev/shm is its
    own); gRPC and metrics on 0.0.0.0 (HTTP stays on 127.0.0.1 behind the guard); GPU metrics on.
    """
    d, ports = server_defaults(), cfg.public_ports
    shm_default, shm_growth = (mb * 2**20 for mb in d["python_shm_mb"])
    restricted = restricted_api(f"$({ADMIN_KEY_ENV})")  # Kubernetes substitutes the Secret's value
    return [
        f"--model-repository={model_repository(cfg)}",
        "--http-address=127.0.0.1",
        f"--http-port={cfg.internal_http_port}",
        "--grpc-address=0.0.0.0",
        f"--grpc-port={ports['grpc']}",
        "--metrics-address=0.0.0.0",
        f"--metrics-port={ports['metrics']}",
        "--allow-gpu-metrics=true",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--disable-auto-complete-config",
        "--model-control-mode=none",
        f"--exit-timeout-secs={d['exit_timeout_s']}",
        f"--log-verbose={d['log_verbose']}",
        f"--backend-config=python,shm-default-byte-size={shm_default}",
        f"--backend-config=python,shm-growth-byte-size={shm_growth}",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]


def guard_args(cfg: DeployConfig, repo: Repository) -> list[str]:
    """deploy/sidecar.py's command line: the guard's limits and the canary's timeout and tasks, as serving's."""
    d = server_defaults()
    limits = d["guard_limits"]
    return [
        f"--listen-port={cfg.public_ports['http']}",
        f"--upstream-port={cfg.internal_http_port}",
        f"--max-request-bytes={limits.max_body_bytes}",
        f"--max-json-depth={limits.max_json_depth}",
        f"--canary-timeout={d['canary_timeout_s']:g}",
        f"--drain-seconds={d['exit_timeout_s']}",
        *(f"--task={task}{':pair' if pair else ''}" for task, pair in sorted(repo.tasks.items())),
    ]


def _http_probe(port: int, path: str, period: int, timeout: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def probes(cfg: DeployConfig) -> dict[str, dict]:
    """The triton container's probes, all on the guard's port (Triton's HTTP is on 127.0.0.1)."""
    sup, d, http = SupervisorConfig(), server_defaults(), cfg.public_ports["http"]
    canary_timeout = int(d["canary_timeout_s"])
    return {
        "startupProbe": _http_probe(http, "/v2/health/live", 10, 5, -(-cfg.startup_s // 10)),
        "livenessProbe": _http_probe(http, "/v2/health/live", 10, 5, 3),
        "readinessProbe": _http_probe(
            http, "/v2/health/ready", int(sup.canary_interval_s), canary_timeout, sup.canary_strikes
        ),
    }


def mib(quantity: str) -> float:
    """A memory quantity (16Gi, 512Mi, 1000000) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[:-2]) * scale
    return float(quantity) / 2**20


def double_cpu(quantity: str) -> str:
    if quantity.endswith("m"):
        return f"{2 * int(float(quantity[:-1]))}m"
    return f"{2 * float(quantity):g}"


def shm_mib(repo: Repository) -> int:
    """/dev/shm for the python-backend stubs: SHM_PER_STUB_MIB each, at least 256 MiB."""
    return max(256, SHM_PER_STUB_MIB * (repo.python_instances + 1))


def tmp_mib(cfg: DeployConfig, repo: Repository) -> int:
    """/tmp: Triton copies an object-store repository there before loading it."""
    return 1024 if cfg.pvc_claim else 1024 + 2 * -(-repo.size_bytes // 2**20)


def security_context() -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pre_stop() -> dict:
    return {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}}


def triton_container(cfg: DeployConfig) -> dict:
    ports = cfg.public_ports
    env = [{"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": admin_secret(cfg), "key": "key"}}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    container = {
        "name": "triton",
        "image": cfg.image,
        "imagePullPolicy": "Always",
        "command": ["tritonserver"],
        "args": triton_args(cfg),
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": ports["grpc"], "protocol": "TCP"},
            {"name": "metrics", "containerPort": ports["metrics"], "protocol": "TCP"},
        ],
        **probes(cfg),
        "lifecycle": _pre_stop(),
        "resources": {
            "requests": {"cpu": cfg.cpu, "memory": cfg.memory, "nvidia.com/gpu": 1},
            "limits": {"cpu": double_cpu(cfg.cpu), "memory": cfg.memory, "nvidia.com/gpu": 1},
        },
        "securityContext": security_context(),
        "volumeMounts": mounts,
    }
    if cfg.pvc_claim:
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    else:  # AWS_*, GOOGLE_APPLICATION_CREDENTIALS or AZURE_STORAGE_* for Triton's object-store reader, if any
        container["envFrom"] = [{"secretRef": {"name": object_store_secret(cfg), "optional": True}}]
    return container


def guard_container(cfg: DeployConfig, repo: Repository) -> dict:
    http = cfg.public_ports["http"]
    tcp = {"tcpSocket": {"port": http}, "timeoutSeconds": 2}
    return {
        "name": "guard",
        "image": cfg.image,
        "imagePullPolicy": "Always",
        "command": ["python3", "-m", "deploy.sidecar"],
        "args": guard_args(cfg, repo),
        "ports": [{"name": "http", "containerPort": http, "protocol": "TCP"}],
        "livenessProbe": {**tcp, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {**tcp, "periodSeconds": 5, "failureThreshold": 1},
        "lifecycle": _pre_stop(),
        "resources": {
            "requests": {"cpu": GUARD_CPU, "memory": GUARD_MEMORY},
            "limits": {"cpu": double_cpu(GUARD_CPU), "memory": GUARD_MEMORY},
        },
        "securityContext": security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def volumes(cfg: DeployConfig, repo: Repository) -> list[dict]:
    vols = [
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{tmp_mib(cfg, repo)}Mi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mib(repo)}Mi"}},
    ]
    if cfg.pvc_claim:
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": cfg.pvc_claim, "readOnly": True}})
    return vols


def pod_annotations(cfg: DeployConfig, repo: Repository) -> dict[str, str]:
    """What the pod serves (from repository.json); a new repository changes the checksum and rolls the pods."""
    s = repo.serve
    notes = {
        "mp-ismoe/repository-sha256": repo.sha256,
        "mp-ismoe/tasks": ",".join(sorted(repo.tasks)),
        "mp-ismoe/target": s.target,
        "mp-ismoe/max-batch-size": str(s.max_batch_size),
        "mp-ismoe/max-queue-size": str(s.max_queue_size),
        "mp-ismoe/queue-timeout-us": str(s.queue_timeout_us),
    }
    if not cfg.service_monitor:
        notes |= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(cfg.public_ports["metrics"]),
            "prometheus.io/path": "/metrics",
        }
    return notes


def pod_template(cfg: DeployConfig, repo: Repository) -> dict:
    exit_s = server_defaults()["exit_timeout_s"]
    return {
        "metadata": {"labels": labels(cfg), "annotations": pod_annotations(cfg, repo)},
        "spec": {
            "serviceAccountName": cfg.name,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": pod_security_context(),
            "terminationGracePeriodSeconds": PRE_STOP_S + exit_s + 20,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [triton_container(cfg), guard_container(cfg, repo)],
            "volumes": volumes(cfg, repo),
        },
    }
