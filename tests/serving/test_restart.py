"""Killing the server mid-load gives the client a clear connection error; a restart serves again."""

import concurrent.futures as cf
import threading
import time

import pytest

from serving.client import Client, ServerUnavailableError
from serving.config import ServeConfig
from serving.repository import generate_repository
from serving.server import ServerOptions, TritonServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def options(serve_runs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("restart") / "model_repository"
    generate_repository([serve_runs["single"]], repo, ServeConfig(max_batch_size=8))
    return ServerOptions.on_free_ports(repository=repo, log_file=repo.parent / "tritonserver.log")


def _hammer(url: str, protocol: str, task: str, stop: threading.Event) -> list[BaseException]:
    """Classify in a loop until `stop` or the first error; return the errors seen."""
    with Client(url, protocol, timeout_s=10) as client:
        while not stop.is_set():
            try:
                client.classify(task, ["the film was great", "awful plot"])
            except Exception as e:  # noqa: BLE001 - the test inspects them
                return [e]
    return []


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kill_mid_load_then_restart(options, specs, protocol):
    task = specs["single"].task
    server = TritonServer(options).start()
    url = server.http_url if protocol == "http" else server.grpc_url
    stop = threading.Event()
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_hammer, url, protocol, task, stop) for _ in range(4)]
            time.sleep(1.0)  # under load
            server.kill()
            done, _ = cf.wait(futures, timeout=60)
            stop.set()
        errors = [e for f in done for e in f.result()]
        assert len(done) == 4 and len(errors) == 4
        for e in errors:
            assert isinstance(e, ServerUnavailableError), repr(e)
            assert url in str(e) and "make serve" in str(e)
        with pytest.raises(ServerUnavailableError, match="make serve"):
            Client(url, protocol, timeout_s=5).classify(task, ["anyone there?"])
    finally:
        stop.set()
        server.stop()
    with TritonServer(options) as again:
        with Client(url, protocol) as client:
            (pred,) = client.classify(task, ["the film was great"])
        assert pred.label in specs["single"].labels and again.is_ready()
