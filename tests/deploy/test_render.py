"""The rendered manifests carry the server's own configuration: repository.json, ServeConfig, ServerOptions."""

from __future__ import annotations

import json
import re

import pytest

from deploy.k8s import manifests as mf
from deploy.k8s.__main__ import main
from deploy.k8s.config import ConfigError, DeployConfig, load_repository
from deploy.k8s.pod import ADMIN_KEY_ENV, triton_args
from deploy.k8s.render import ADAPTER_VALUES, UPLOAD_POD, render
from serving.server import ServerOptions, TritonServer, find_tritonserver
from serving.supervisor import SupervisorConfig
from tests.deploy.conftest import SERVE, load_rendered


def containers(objs: dict) -> dict[str, dict]:
    pod = objs["manifests/30-deployment.yaml"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def flag_map(args: list[str]) -> dict[str, str]:
    """--flag=value -> {flag (with the backend-config key): value}."""
    out = {}
    for a in args:
        key, _, value = a.partition("=")
        if key == "--backend-config":
            key, _, value = a.rpartition("=")
        out[key] = value
    return out


def test_files_and_kinds(rendered):
    objs = load_rendered(rendered)
    kinds = {name: o["kind"] for name, o in objs.items() if "kind" in o}
    assert kinds == {
        "manifests/00-namespace.yaml": "Namespace",
        "manifests/10-serviceaccount.yaml": "ServiceAccount",
        "manifests/20-pvc.yaml": "PersistentVolumeClaim",
        "manifests/30-deployment.yaml": "Deployment",
        "manifests/40-service.yaml": "Service",
        "manifests/50-networkpolicy.yaml": "NetworkPolicy",
        "manifests/60-pdb.yaml": "PodDisruptionBudget",
        "manifests/70-hpa.yaml": "HorizontalPodAutoscaler",
        "manifests/80-servicemonitor.yaml": "ServiceMonitor",
        UPLOAD_POD: "Pod",
    }
    assert set(objs) - set(kinds) == {ADAPTER_VALUES}
    assert all(
        o["metadata"].get("namespace", o["metadata"]["name"]) == "mp-ismoe" for o in objs.values() if "kind" in o
    )


def test_triton_flags_are_servings(tmp_path):
    """Every flag `python -m serving` gives tritonserver is rendered, except the few the pod must change."""
    install = find_tritonserver()
    options = ServerOptions(repository=tmp_path, admin_key=f"$({ADMIN_KEY_ENV})", guard=False)
    serving = flag_map(TritonServer(options, install).command()[1:])
    pod = flag_map(triton_args(DeployConfig()))
    replaced = {
        "--model-repository",
        "--backend-directory",
        "--http-address",
        "--http-port",
        "--grpc-address",
        "--metrics-address",
        "--allow-gpu-metrics",
        "--backend-config=python,shm-region-prefix-name",
    }
    assert {k: v for k, v in serving.items() if k not in replaced} == {
        k: v for k, v in pod.items() if k not in replaced
    }
    assert pod["--http-restricted-api"] == serving["--http-restricted-api"]
    assert pod["--http-restricted-api"].startswith("model-repository,shared-memory,trace,logging:mpismoe-admin-key=")
    assert (pod["--http-address"], pod["--http-port"]) == ("127.0.0.1", "8080")  # private, behind the guard
    assert (
        (pod["--grpc-port"], pod["--metrics-port"])
        == (serving["--grpc-port"], serving["--metrics-port"])
        == ("8001", "8002")
    )
    assert pod["--model-repository"] == "/models"


def test_pod_spec(rendered, gpu_repository):
    objs = load_rendered(rendered)
    c = containers(objs)
    triton, guard = c["triton"], c["guard"]
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["env"] == [
        {"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": "mp-ismoe-admin-key", "key": "key"}}}
    ]
    sup = SupervisorConfig()
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert (triton["readinessProbe"]["periodSeconds"], triton["readinessProbe"]["failureThreshold"]) == (
        sup.canary_interval_s,
        sup.canary_strikes,
    )
    assert (
        triton["livenessProbe"]["httpGet"]
        == triton["startupProbe"]["httpGet"]
        == {"path": "/v2/health/live", "port": 8000}
    )
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 600
    assert guard["command"] == ["python3", "-m", "deploy.sidecar"]
    assert "--task=nli:pair" in guard["args"] and "--task=sentiment" in guard["args"]
    assert "--upstream-port=8080" in guard["args"] and "--listen-port=8000" in guard["args"]
    for container in (triton, guard):
        sc = container["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        assert set(container["resources"]["limits"]) >= {"cpu", "memory"}
    pod = objs["manifests/30-deployment.yaml"]["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == 1000
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert (
        shm["medium"] == "Memory" and shm["sizeLimit"] == "448Mi"
    )  # 64 MiB x (2 tokenizers x 2 instances + 2 postprocess + 1)


def test_values_match_serve_config(rendered, gpu_repository):
    objs = load_rendered(rendered)
    notes = objs["manifests/30-deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
    summary = json.loads((gpu_repository / "repository.json").read_text())
    assert summary["serve_config"]["max_batch_size"] == SERVE.max_batch_size == int(notes["mp-ismoe/max-batch-size"])
    assert int(notes["mp-ismoe/max-queue-size"]) == SERVE.max_queue_size
    assert int(notes["mp-ismoe/queue-timeout-us"]) == SERVE.queue_timeout_us
    assert notes["mp-ismoe/tasks"] == "nli,sentiment" and notes["mp-ismoe/target"] == "gpu"
    assert notes["mp-ismoe/repository-sha256"] == load_repository(gpu_repository).sha256
    ports = {p["name"]: p["port"] for p in objs["manifests/40-service.yaml"]["spec"]["ports"]}
    defaults = ServerOptions(admin_key="x")
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port, "metrics": defaults.metrics_port}


def test_monitoring_and_autoscaling(rendered):
    objs = load_rendered(rendered)
    monitor, service = objs["manifests/80-servicemonitor.yaml"], objs["manifests/40-service.yaml"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    hpa = objs["manifests/70-hpa.yaml"]["spec"]
    (rule,) = objs[ADAPTER_VALUES]["rules"]["custom"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"] == "mp_ismoe_queue_time_us"
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "50000"}
    assert hpa["scaleTargetRef"]["name"] == objs["manifests/30-deployment.yaml"]["metadata"]["name"]
    assert "replicas" not in objs["manifests/30-deployment.yaml"]["spec"]  # the HPA owns it
    query = rule["metricsQuery"]
    assert re.search(r'nv_inference_request_success\{<<\.LabelMatchers>>,model=~"nli\|sentiment"\}', query)
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>}[1m])" in query
    assert query.count("(") == query.count(")") and query.count("{") == query.count("}")


def test_object_storage_digest_annotations(rendered_s3):
    objs = load_rendered(rendered_s3)
    assert (
        "manifests/20-pvc.yaml" not in objs
        and UPLOAD_POD not in objs
        and "manifests/80-servicemonitor.yaml" not in objs
    )
    dep = objs["manifests/30-deployment.yaml"]
    triton = containers(objs)["triton"]
    assert "--model-repository=s3://models-bucket/mp-ismoe/v1" in triton["args"]
    assert triton["envFrom"] == [{"secretRef": {"name": "mp-ismoe-object-store", "optional": True}}]
    assert all(v["name"] != "models" for v in dep["spec"]["template"]["spec"]["volumes"])
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    assert (notes["prometheus.io/scrape"], notes["prometheus.io/port"]) == ("true", "8002")
    assert not any("CKV_K8S_43" in v for v in dep["metadata"]["annotations"].values())  # a digest needs no skip
    assert (
        objs["manifests/70-hpa.yaml"]["spec"]["minReplicas"],
        objs["manifests/70-hpa.yaml"]["spec"]["maxReplicas"],
    ) == (2, 6)


def test_refusals(gpu_repository, tmp_path):
    repo = load_repository(gpu_repository)
    with pytest.raises(ConfigError, match="no TensorRT engine for adapter_nli, adapter_sentiment, backbone"):
        render(DeployConfig(), repo, tmp_path)
    with pytest.raises(ConfigError, match="not below the repository's queue_timeout_us 1500000"):
        render(DeployConfig(target_queue_us=1_500_000), repo, tmp_path, allow_incomplete=True)
    with pytest.raises(ConfigError, match="too little beside /dev/shm"):
        render(DeployConfig(memory="512Mi"), repo, tmp_path, allow_incomplete=True)
    for bad, match in [
        ({"image": "mp-ismoe-triton:latest"}, "deploy.image"),
        ({"replicas": 5}, "deploy.replicas"),
        ({"model_source": "/data/models"}, "deploy.model_source"),
        ({"name": "Bad_Name"}, "deploy.name"),
        ({"internal_http_port": 8001}, "deploy.internal_http_port"),
        ({"memory": "500m"}, "deploy.memory"),
        ({"cpu": "2Gi"}, "deploy.cpu"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DeployConfig(**bad)
    with pytest.raises(ConfigError, match="generate the repository first"):
        load_repository(tmp_path)
    assert not list(tmp_path.iterdir())  # a refused rendering writes nothing


def test_cli_rerender_removes_stale(gpu_repository, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(["--repository", str(gpu_repository), "--out", str(out), "--allow-incomplete"]) == 0
    assert (out / "manifests/20-pvc.yaml").is_file() and (out / UPLOAD_POD).is_file()
    assert (
        main(
            [
                "--repository",
                str(gpu_repository),
                "--out",
                str(out),
                "--allow-incomplete",
                "--model-source",
                "gs://bucket/repo",
                "--name",
                "other",
            ]
        )
        == 0
    )
    assert not (out / "manifests/20-pvc.yaml").exists() and not (out / UPLOAD_POD).exists()
    assert load_rendered(out)["manifests/30-deployment.yaml"]["metadata"]["name"] == "other"
    assert main(["--repository", str(gpu_repository), "--out", str(out)]) == 1  # engines missing
    assert "no TensorRT engine" in caplog.text
    assert mf.queue_metric(DeployConfig(name="other")) == "other_queue_time_us"
