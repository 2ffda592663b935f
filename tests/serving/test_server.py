"""The tritonserver launcher without starting it (fast), and its startup errors (slow)."""

import importlib.metadata
import importlib.util
import os
import socket
import sys

import pytest

from serving import server as srv
from serving.errors import ServerError
from serving.repository import PROJECT_ROOT, generate_repository
from serving.server import ServerOptions, TritonServer, backend_directory, find_tritonserver, free_port


def test_finds_the_pytriton_tritonserver():
    install = find_tritonserver()
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(install.stub)


def test_missing_pytriton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServerError, match="pip install nvidia-pytriton"):
        find_tritonserver()


def test_backend_directory_holds_backend_and_stub(tmp_path):
    install = find_tritonserver()
    for _ in range(2):  # idempotent
        d = backend_directory(install, tmp_path)
    python = d / "python"
    assert (python / "libtriton_python.so").resolve() == (install.python_backend / "libtriton_python.so").resolve()
    assert (python / "triton_python_backend_stub").resolve() == install.stub.resolve()


def test_command_binds_every_endpoint_to_localhost(tmp_path):
    opts = ServerOptions(repository=tmp_path, http_port=18000, grpc_port=18001, metrics_port=18002)
    cmd = TritonServer(opts).command()
    for flag in (
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--http-port=18000",
        "--grpc-port=18001",
        "--metrics-port=18002",
        f"--model-repository={tmp_path}",
    ):
        assert flag in cmd
    assert opts.log_file.name == "tritonserver-18000.log"


def test_environment_puts_the_venv_and_project_first(tmp_path):
    env = TritonServer(ServerOptions(repository=tmp_path)).environment()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PROJECT_ROOT)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")


def test_options_refuse_duplicate_ports(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        ServerOptions(repository=tmp_path, http_port=9000, grpc_port=9000)
    opts = ServerOptions.on_free_ports(repository=tmp_path)
    assert len({opts.http_port, opts.grpc_port, opts.metrics_port}) == 3


def test_numpy_2_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.0")
    with pytest.raises(ServerError, match="numpy<2"):
        srv.check_numpy()
    monkeypatch.undo()
    srv.check_numpy()  # the project venv pins numpy<2


def test_empty_repository_is_refused_before_starting(tmp_path):
    with pytest.raises(ServerError, match="empty or missing"):
        TritonServer(ServerOptions.on_free_ports(repository=tmp_path)).start()


def test_busy_port_is_refused_before_starting(fake_runs, tmp_path):
    generate_repository([fake_runs["sentiment"]], tmp_path / "r")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        opts = ServerOptions(
            repository=tmp_path / "r", http_port=s.getsockname()[1], grpc_port=free_port(), metrics_port=free_port()
        )
        with pytest.raises(ServerError, match=r"http port \d+ on 127.0.0.1 is already in use"):
            TritonServer(opts).start()


@pytest.mark.slow
def test_model_that_fails_to_load_is_reported_with_the_log(fake_runs, tmp_path):
    repo = tmp_path / "r"
    generate_repository([fake_runs["sentiment"]], repo)
    (repo / "adapter_sentiment" / "1" / "adapter.onnx").write_bytes(b"not an onnx graph")
    server = TritonServer(ServerOptions.on_free_ports(repository=repo, log_file=tmp_path / "log.txt"))
    with pytest.raises(ServerError, match=r"(?s)exited with code 1.*log.txt.*adapter_sentiment"):
        server.start()
    assert server.process.poll() is not None
