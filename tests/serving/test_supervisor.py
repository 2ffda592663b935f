"""Supervision against a real tritonserver: a crash and a dead python stub are recovered without a human.

Also `python -m serving` as make serve runs it: ports and the repository's server are checked before
anything is generated, and SIGTERM stops it cleanly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving import cli
from serving.client import Client
from serving.repository import PROJECT_ROOT, generate_repository
from serving.server import CACHE_DIR, ServerOptions, TritonServer, free_port
from serving.supervisor import RepositoryLock, Supervisor, SupervisorConfig, serving_processes
from tests.serving.hostile import CANARY_TEXTS, assert_still_serving, canary_answer, component, get, wait_ready

pytestmark = pytest.mark.slow

RECOVERY_S = 15.0
NESTED = (
    '{"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":' + "[" * 100_000 + "]" * 100_000 + "}]}"
).encode()


@pytest.fixture(scope="module")
def before(supervised, specs):
    return canary_answer(supervised.server, specs["single"].task)


def _status(supervisor) -> dict:
    return json.loads(supervisor.status_file.read_text())


def _crash_with_nested_json(server, task: str) -> None:
    """The 2.51 parser bug, sent to tritonserver's own HTTP port (the guard refuses it on the public one)."""
    with socket.create_connection(("127.0.0.1", server.backend_http_port), timeout=30) as s:
        s.sendall(f"POST /v2/models/{task}/infer HTTP/1.1\r\nContent-Length: {len(NESTED)}\r\n\r\n".encode() + NESTED)
        assert s.recv(100) == b""  # no answer: the process died


def test_a_segfault_is_recovered_within_15_s_without_a_human(supervised, specs, before):
    server, restarts, pid = supervised.server, supervised.restarts, supervised.server.process.pid
    t0 = time.monotonic()
    _crash_with_nested_json(server, specs["single"].task)
    while supervised.restarts == restarts and time.monotonic() - t0 < RECOVERY_S:
        time.sleep(0.05)
    wait_ready(server, max(0.1, RECOVERY_S - (time.monotonic() - t0)))
    recovery = time.monotonic() - t0
    print(f"\nrecovered from SIGSEGV in {recovery:.2f} s")
    assert recovery < RECOVERY_S and supervised.restarts == restarts + 1 and server.process.pid != pid
    status = _status(supervised)
    assert status["state"] == "ready" and status["restarts"] == restarts + 1
    assert "was killed by signal 11 (SIGSEGV)" in status["crashes"][-1]["cause"]
    assert (
        server.options.log_file.read_text().count("==== tritonserver starting") == restarts + 2
    )  # every run's log is kept
    assert_still_serving(server, specs["single"].task, before)


def _stub_pid(server, model: str) -> int:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server.process.pid and f"/{model}/1/model.py".encode() in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"no python stub for {model} under pid {server.process.pid}")


def test_a_dead_python_stub_is_not_ready_then_restarted(supervised, specs, before):
    server, restarts = supervised.server, supervised.restarts
    port = server.options.http_port
    os.kill(_stub_pid(server, component(server, specs["single"].task, "tokenizer")), signal.SIGKILL)
    t0, seen = time.monotonic(), None
    while seen is None and time.monotonic() - t0 < RECOVERY_S:
        status, body = get(port, "/v2/health/ready")
        seen = body if status == 503 else None
        time.sleep(0.02)
    assert seen and ("not healthy" in seen or "not running" in seen), seen  # Triton's own ready said 200 throughout
    while supervised.restarts == restarts and time.monotonic() - t0 < RECOVERY_S:
        time.sleep(0.05)
    wait_ready(server, max(0.1, RECOVERY_S - (time.monotonic() - t0)))
    assert supervised.restarts == restarts + 1
    assert "stopped answering" in _status(supervised)["crashes"][-1]["cause"]
    assert_still_serving(server, specs["single"].task, before)


def test_a_crash_loop_makes_the_supervisor_give_up(serve_runs, tmp_path):
    repo = tmp_path / "model_repository"
    generate_repository([serve_runs["single"]], repo)
    server = TritonServer(ServerOptions.on_free_ports(repository=repo, log_file=tmp_path / "log.txt"))
    supervisor = Supervisor(
        server,
        SupervisorConfig(backoff_initial_s=0.1, max_restarts=1, canary_interval_s=0.5),
        status_file=tmp_path / "status.json",
    ).start_background()
    for _ in range(2):
        pid = server.process.pid
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        while (
            (server.process is None or server.process.pid == pid or supervisor.state != "ready")
            and supervisor.state != "failed"
            and time.monotonic() - t0 < RECOVERY_S
        ):
            time.sleep(0.05)
    supervisor._thread.join(RECOVERY_S)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "failed" and status["restarts"] == 1 and len(status["crashes"]) == 2
    assert all("signal 9 (SIGKILL)" in c["cause"] for c in status["crashes"])
    assert server.process.poll() is not None and server.guard is None


def _tree(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_a_busy_port_is_refused_before_the_repository_is_touched(fake_runs, tmp_path, caplog):
    repo = tmp_path / "repo"
    generate_repository([fake_runs["sentiment"]], repo)
    before = _tree(repo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        code = cli.main(
            [
                "--runs",
                str(fake_runs["nli"]),
                "--repository",
                str(repo),
                "--grpc-port",
                str(busy),
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
            ]
        )
    assert code == 1 and f"grpc port {busy} on 127.0.0.1 is already in use" in caplog.text
    assert _tree(repo) == before


def test_a_served_repository_is_not_regenerated(served, fake_runs, caplog):
    repo = served.options.repository
    before = _tree(repo)
    for extra in ([], ["--generate-only"]):
        code = cli.main(
            [
                "--runs",
                str(fake_runs["topic"]),
                "--repository",
                str(repo),
                "--http-port",
                str(free_port()),
                "--grpc-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                *extra,
            ]
        )
        assert code == 1 and f"is serving {repo}" in caplog.text
    assert _tree(repo) == before and served.is_ready()


def test_a_repository_locked_by_another_serve_is_refused(fake_runs, tmp_path, caplog):
    repo = tmp_path / "repo"
    with RepositoryLock(repo, CACHE_DIR).acquire("a test"):
        assert cli.main(["--runs", str(fake_runs["sentiment"]), "--repository", str(repo), "--generate-only"]) == 1
    assert "holds the repository" in caplog.text and not repo.exists()
    assert cli.main(["--runs", str(fake_runs["sentiment"]), "--repository", str(repo), "--generate-only"]) == 0


def test_python_m_serving_serves_supervised_and_stops_on_sigterm(fake_runs, tmp_path):
    """What `make serve` runs: ready with a status file, answers, and SIGTERM leaves no tritonserver behind."""
    repo, ports = tmp_path / "repo", [free_port() for _ in range(3)]
    log = tmp_path / "tritonserver.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--runs",
            str(fake_runs["sentiment"]),
            "--repository",
            str(repo),
            "--http-port",
            str(ports[0]),
            "--grpc-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--log-file",
            str(log),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    status_file = log.with_suffix(".status.json")
    try:
        t0 = time.monotonic()
        while not (status_file.is_file() and json.loads(status_file.read_text())["state"] == "ready"):
            assert proc.poll() is None and time.monotonic() - t0 < 120, proc.stdout.read().decode()
            time.sleep(0.1)
        with Client(f"127.0.0.1:{ports[0]}") as client:
            assert [p.label for p in client.classify("sentiment", CANARY_TEXTS)]
        assert serving_processes(repo)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert "ready: http://127.0.0.1" in out and "stopped; 0 restart(s)" in out
    assert not serving_processes(repo) and json.loads(status_file.read_text())["state"] == "stopped"
