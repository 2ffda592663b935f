"""The Kubernetes objects around the serving pod, as plain dicts: one function per object.

Scraping: a prometheus-operator ServiceMonitor on the metrics port (or prometheus.io/* pod annotations).
Autoscaling: an HPA on the per-pod custom metric `<name>_queue_time_us`, which prometheus-adapter
computes from Triton's counters with `adapter_rule()`: queue time of every model in the pod per
successful ensemble request, i.e. how long an end-user request waited in queues on average.
"""

from __future__ import annotations

from deploy.k8s.config import DeployConfig, Repository
from deploy.k8s.pod import MODELS_DIR, labels, pod_security_context, pod_template, security_context, selector

RESTRICTED = "restricted"  # the pod security standard the namespace enforces

# Checks checkov reports that these manifests deliberately do not meet, each with the reason (the
# manifests carry them as checkov.io/skip annotations, so that a reader sees them too).
CHECKOV_SKIPS = {
    "CKV_K8S_40": "runs as uid 1000, the NGC Triton image's own non-root user (triton-server), which owns "
    "/opt/tritonserver; the image is not rebuilt for a uid above 10000",
    "CKV_K8S_35": "tritonserver reads the admin key only from its command line (--http-restricted-api), and "
    "Kubernetes substitutes $(VAR) in args from environment variables only, not from files",
}
DIGEST_SKIP = (
    "CKV_K8S_43",
    "the image is a tag; pass --image REGISTRY/mp-ismoe-triton@sha256:... to pin "
    "a digest (then this skip is not rendered)",
)


def queue_metric(cfg: DeployConfig) -> str:
    return f"{cfg.name.replace('-', '_')}_queue_time_us"


def _meta(cfg: DeployConfig, name: str | None = None, **extra) -> dict:
    return {"name": name or cfg.name, "namespace": cfg.namespace, "labels": labels(cfg), **extra}


def checkov_skips(cfg: DeployConfig, *checks: str) -> dict[str, str]:
    """checkov.io/skipN annotations (CHECK_ID=reason) for `checks` of CHECKOV_SKIPS, and the digest one if it applies."""
    skips = {check: CHECKOV_SKIPS[check] for check in checks}
    if "@sha256:" not in cfg.image:
        skips[DIGEST_SKIP[0]] = DIGEST_SKIP[1]
    return {f"checkov.io/skip{i}": f"{check}={reason}" for i, (check, reason) in enumerate(sorted(skips.items()), 1)}


def namespace(cfg: DeployConfig) -> dict:
    enforce = {f"pod-security.kubernetes.io/{mode}": RESTRICTED for mode in ("enforce", "audit", "warn")}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.namespace, "labels": enforce}}


def service_account(cfg: DeployConfig) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(cfg), "automountServiceAccountToken": False}


def deployment(cfg: DeployConfig, repo: Repository) -> dict:
    """No spec.replicas: the HPA owns the count (re-applying would reset it); it starts at minReplicas."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, annotations=checkov_skips(cfg, *CHECKOV_SKIPS)),
        "spec": {
            "selector": {"matchLabels": selector(cfg)},
            "revisionHistoryLimit": 3,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": pod_template(cfg, repo),
        },
    }


def service(cfg: DeployConfig) -> dict:
    ports = [
        {"name": name, "port": port, "targetPort": name, "protocol": "TCP"} for name, port in cfg.public_ports.items()
    ]
    ports[1]["appProtocol"] = "grpc"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg),
        "spec": {"type": "ClusterIP", "selector": selector(cfg), "ports": ports},
    }


def service_monitor(cfg: DeployConfig) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(cfg),
        "spec": {
            "selector": {"matchLabels": selector(cfg)},
            "namespaceSelector": {"matchNames": [cfg.namespace]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


def hpa(cfg: DeployConfig) -> dict:
    """Scale on queue time: a GPU pod takes minutes to start, so add two at a time and remove slowly."""
    metric = {
        "type": "Pods",
        "pods": {
            "metric": {"name": queue_metric(cfg)},
            "target": {"type": "AverageValue", "averageValue": str(cfg.target_queue_us)},
        },
    }
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
        "scaleDown": {
            "stabilizationWindowSeconds": 600,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
        },
    }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(cfg),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cfg.name},
            "minReplicas": cfg.replicas,
            "maxReplicas": cfg.max_replicas,
            "metrics": [metric],
            "behavior": behavior,
        },
    }


def pdb(cfg: DeployConfig) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cfg),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(cfg)}},
    }


def network_policy(cfg: DeployConfig) -> dict:
    """Ingress only to the public ports, for every pod of the deployment (the upload pod listens on none);
    tritonserver's own HTTP is on 127.0.0.1 anyway. Egress stays open (object storage)."""
    ports = [{"protocol": "TCP", "port": p} for p in cfg.public_ports.values()]
    pods = {"app.kubernetes.io/name": cfg.name}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(cfg),
        "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": [{"ports": ports}]},
    }


def pvc(cfg: DeployConfig, repo: Repository) -> dict:
    """ReadWriteMany: the upload pod writes it once, every replica mounts it read-only. Twice the repository's size."""
    gib = max(1, -(-2 * repo.size_bytes // 2**30))
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{gib}Gi"}}}
    if cfg.storage_class:
        spec["storageClassName"] = cfg.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(cfg, cfg.pvc_claim), "spec": spec}


def upload_pod(cfg: DeployConfig) -> dict:
    """A short-lived pod mounting the PVC read-write, for `kubectl cp model_repository/. <pod>:/models`."""
    ready = {"exec": {"command": ["test", "-d", MODELS_DIR]}, "periodSeconds": 10}
    meta = _meta(cfg, f"{cfg.name}-upload", annotations=checkov_skips(cfg, "CKV_K8S_40"))
    meta["labels"] = {**meta["labels"], "app.kubernetes.io/component": "model-upload"}
    container = {
        "name": "upload",
        "image": cfg.image,
        "imagePullPolicy": "Always",
        "command": ["sleep", "3600"],
        "livenessProbe": ready,
        "readinessProbe": ready,
        "securityContext": security_context(),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 3600,
            "automountServiceAccountToken": False,
            "serviceAccountName": cfg.name,
            "securityContext": pod_security_context(),
            "containers": [container],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": cfg.pvc_claim}}],
        },
    }


def adapter_rule(cfg: DeployConfig, repo: Repository) -> dict:
    """prometheus-adapter rule for the HPA's metric; model=~ the ensembles (the tasks) of repository.json."""
    tasks = "|".join(sorted(repo.tasks))
    query = (
        "sum by (<<.GroupBy>>) (rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m]))\n"
        "/ clamp_min(sum by (<<.GroupBy>>) (rate(nv_inference_request_success{<<.LabelMatchers>>,"
        f'model=~"{tasks}"}}[1m])), 1e-9)'
    )
    return {
        "seriesQuery": f'nv_inference_queue_duration_us{{namespace="{cfg.namespace}",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": "^nv_inference_queue_duration_us$", "as": queue_metric(cfg)},
        "metricsQuery": query,
    }


def manifests(cfg: DeployConfig, repo: Repository) -> dict[str, dict]:
    """File name -> object, in the order `kubectl apply -f` takes a directory (names sort)."""
    out = {"00-namespace.yaml": namespace(cfg), "10-serviceaccount.yaml": service_account(cfg)}
    if cfg.pvc_claim:
        out["20-pvc.yaml"] = pvc(cfg, repo)
    out |= {
        "30-deployment.yaml": deployment(cfg, repo),
        "40-service.yaml": service(cfg),
        "50-networkpolicy.yaml": network_policy(cfg),
        "60-pdb.yaml": pdb(cfg),
        "70-hpa.yaml": hpa(cfg),
    }
    if cfg.service_monitor:
        out["80-servicemonitor.yaml"] = service_monitor(cfg)
    return out
