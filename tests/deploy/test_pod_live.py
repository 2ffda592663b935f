"""The rendered pod's two containers, run here as the pod would run them (127.0.0.1 only, free ports).

tritonserver 2.51 (embedded; the NGC image's is newer, with the same flags) runs with the triton
container's rendered args on the CPU repository, and deploy/sidecar.py with the guard container's
rendered args. The probes' paths then answer as the manifests expect, the restricted APIs need the
key, and Triton's metrics carry the series the autoscaling rule reads, per ensemble (task).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.k8s.config import DeployConfig, load_repository
from deploy.k8s.render import ADAPTER_VALUES, render
from serving.server import backend_directory, find_tritonserver, free_port
from tests.deploy.conftest import load_rendered

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
KEY = "test-admin-key"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def with_flags(args: list[str], values: dict) -> list[str]:
    """`args` with --flag=value replaced for each flag in `values`."""
    return [f"{a.split('=', 1)[0]}={values[a.split('=', 1)[0]]}" if a.split("=", 1)[0] in values else a for a in args]


def call(port: int, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int | None, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {})
    try:
        with DIRECT.open(request, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, str(e).encode()


def wait_for(port: int, path: str, status: int, timeout_s: float) -> tuple[int | None, bytes]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = call(port, path)
        if got[0] == status or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


@pytest.fixture(scope="module")
def pod(cpu_repository, tmp_path_factory):
    """tritonserver + sidecar from the rendered Deployment; yields (ports, processes, rendered objects)."""
    out = tmp_path_factory.mktemp("rendered-live")
    render(DeployConfig(), load_repository(cpu_repository), out)
    objs = load_rendered(out)
    triton, guard = objs["manifests/30-deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    ports = {"guard": free_port(), "http": free_port(), "grpc": free_port(), "metrics": free_port()}
    install = find_tritonserver()
    triton_cmd = [
        str(install.binary),
        f"--backend-directory={backend_directory(install)}",
        *with_flags(
            [a.replace("$(MPISMOE_ADMIN_KEY)", KEY) for a in triton["args"]],
            {
                "--model-repository": cpu_repository,
                "--http-port": ports["http"],
                "--grpc-port": ports["grpc"],
                "--metrics-port": ports["metrics"],
                "--grpc-address": "127.0.0.1",
                "--metrics-address": "127.0.0.1",
            },
        ),
    ]
    guard_cmd = [
        sys.executable,
        *guard["command"][1:],
        "--listen-host=127.0.0.1",
        *with_flags(
            guard["args"], {"--listen-port": ports["guard"], "--upstream-port": ports["http"], "--drain-seconds": 0.2}
        ),
    ]
    # As in the image: the project on PYTHONPATH (the models put it on sys.path), the stub's python3 first on PATH.
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        LD_LIBRARY_PATH=str(install.libs),
    )
    log = open(out / "tritonserver.log", "wb")
    procs = {
        "triton": subprocess.Popen(triton_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
        "guard": subprocess.Popen(guard_cmd, env=env, start_new_session=True),
    }
    try:
        yield ports, procs, objs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
        log.close()


def test_probes_inference_and_restrictions(pod):
    ports, procs, objs = pod
    triton = objs["manifests/30-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert wait_for(ports["guard"], triton["startupProbe"]["httpGet"]["path"], 200, 120)[0] == 200
    assert (
        wait_for(ports["guard"], triton["readinessProbe"]["httpGet"]["path"], 200, 30)[0] == 200
    )  # the canary answered
    text = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a gorgeous, witty film"]}]}
    status, body = call(
        ports["guard"], "/v2/models/sentiment/infer", json.dumps(text).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and json.loads(body)["outputs"][1]["data"][0] in ("neg", "pos")
    assert call(ports["guard"], "/v2/repository/index", b"{}")[0] == 403
    status, body = call(ports["guard"], "/v2/repository/index", b"{}", {"mpismoe-admin-key": KEY})
    assert status == 200 and {m["name"] for m in json.loads(body)} >= {"sentiment", "nli", "backbone"}
    deep = b'{"inputs": ' + b"[" * 200 + b"]" * 200 + b"}"
    assert call(ports["guard"], "/v2/models/sentiment/infer", deep, {"Content-Type": "application/json"})[0] == 400


def test_metrics_feed_the_autoscaling_rule(pod):
    ports, procs, objs = pod
    assert wait_for(ports["guard"], "/v2/health/ready", 200, 120)[0] == 200
    status, body = call(ports["metrics"], "/metrics")
    assert status == 200
    query = objs[ADAPTER_VALUES]["rules"]["custom"][0]["metricsQuery"]
    tasks = re.search(r'model=~"([^"]+)"', query).group(1)
    for metric in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        models = set(re.findall(rf'^{metric}{{model="([^"]+)"', body.decode(), re.M))
        assert {m for m in models if re.fullmatch(tasks, m)} == {"sentiment", "nli"}, metric


def test_dead_tritonserver_fails_the_probes_and_the_guard_drains(pod):
    ports, procs, _ = pod
    assert wait_for(ports["guard"], "/v2/health/ready", 200, 120)[0] == 200
    os.killpg(procs["triton"].pid, signal.SIGKILL)
    procs["triton"].wait(30)
    assert wait_for(ports["guard"], "/v2/health/ready", 503, 10)[0] == 503
    assert call(ports["guard"], "/v2/health/live")[0] == 503  # liveness fails: the kubelet restarts the container
    procs["guard"].send_signal(signal.SIGTERM)
    assert procs["guard"].wait(15) == 0
