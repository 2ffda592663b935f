"""Offline validation of the rendered manifests: Kubernetes' own schemas and checkov's security rules."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate as kv
import pytest

from deploy.k8s.manifests import CHECKOV_SKIPS, DIGEST_SKIP
from tests.deploy.checkov_env import run_checkov
from tests.deploy.conftest import load_rendered

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"
VERSIONS = sorted(set(kv.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))  # shipped: 1.25 - 1.37
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema in the wheel: checked structurally below


def objects(out: Path) -> dict[str, dict]:
    return {name: obj for name, obj in load_rendered(out).items() if "kind" in obj}


def test_schema_versions_shipped():
    assert VERSIONS[0] == "1.25.0" and VERSIONS[-1] == "1.37.0" and len(VERSIONS) == 13


@pytest.mark.parametrize("fixture", ["rendered", "rendered_s3"])
def test_kubernetes_schemas_strict(fixture, request):
    """Every manifest validates against every shipped Kubernetes version, with unknown fields refused."""
    objs = {
        n: o for n, o in objects(request.getfixturevalue(fixture)).items() if (o["apiVersion"], o["kind"]) not in CRDS
    }
    assert len(objs) >= 7
    for name, obj in objs.items():
        for version in VERSIONS:
            assert kv.validate(obj, version, strict=True) == version.rsplit(".", 1)[0], (name, version)


def test_kubernetes_schemas_catch_mistakes(rendered):
    """The validator is not vacuous: a misspelt field and a wrong type are refused."""
    deployment = objects(rendered)["manifests/30-deployment.yaml"]
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, VERSIONS[-1], strict=True)


def test_service_monitor_structure(rendered):
    """The ServiceMonitor CRD's required shape, and that it selects the Service's metrics port."""
    objs = objects(rendered)
    monitor, service = objs["manifests/80-servicemonitor.yaml"], objs["manifests/40-service.yaml"]
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "15s"}
    assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"])
    metrics = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
    assert metrics["port"] == 8002
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]


def _skips(report: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for check in report["results"]["skipped_checks"]:
        out.setdefault(check["check_id"], set()).add(check["resource"])
        assert check["check_result"]["suppress_comment"], check["check_id"]  # every skip says why
    return out


def test_checkov_kubernetes(rendered):
    report = run_checkov(rendered, "kubernetes")
    assert report["results"]["failed_checks"] == [], [
        (c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]
    ]
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 150
    skips = _skips(report)
    assert skips == {
        "CKV_K8S_35": {"Deployment.mp-ismoe.mp-ismoe"},
        "CKV_K8S_40": {"Deployment.mp-ismoe.mp-ismoe", "Pod.mp-ismoe.mp-ismoe-upload"},
        DIGEST_SKIP[0]: {"Deployment.mp-ismoe.mp-ismoe", "Pod.mp-ismoe.mp-ismoe-upload"},
    }
    reasons = {c["check_id"]: c["check_result"]["suppress_comment"] for c in report["results"]["skipped_checks"]}
    assert reasons == {**CHECKOV_SKIPS, DIGEST_SKIP[0]: DIGEST_SKIP[1]}
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    # the rules this deployment is meant to meet: probes, limits, no root, no escalation, read-only root, seccomp
    assert passed >= {
        "CKV_K8S_8",
        "CKV_K8S_9",
        "CKV_K8S_11",
        "CKV_K8S_13",
        "CKV_K8S_20",
        "CKV_K8S_22",
        "CKV_K8S_23",
        "CKV_K8S_28",
        "CKV_K8S_31",
        "CKV_K8S_37",
        "CKV_K8S_38",
        "CKV2_K8S_6",
    }


def test_checkov_kubernetes_digest_image(rendered_s3):
    """With an image digest there is nothing left to skip but the two reasoned ones."""
    report = run_checkov(rendered_s3, "kubernetes")
    assert report["results"]["failed_checks"] == []
    assert _skips(report) == {
        "CKV_K8S_35": {"Deployment.mp-ismoe.mp-ismoe"},
        "CKV_K8S_40": {"Deployment.mp-ismoe.mp-ismoe"},
    }
    assert "CKV_K8S_43" in {c["check_id"] for c in report["results"]["passed_checks"]}


def test_checkov_dockerfile():
    report = run_checkov(DOCKERFILE, "dockerfile")
    assert report["results"]["failed_checks"] == [], [c["check_id"] for c in report["results"]["failed_checks"]]
    assert report["results"]["skipped_checks"] == []
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    assert passed >= {
        "CKV_DOCKER_2",
        "CKV_DOCKER_3",
        "CKV_DOCKER_7",
        "CKV_DOCKER_8",
    }  # healthcheck, user, pinned base, not root
