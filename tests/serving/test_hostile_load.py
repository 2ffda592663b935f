"""Hostile traffic in bulk against a real, supervised tritonserver: mixed batches, concurrency, connections, overload.

Every case asserts its answers, and afterwards that the server is ready and answers the canary texts as before.
"""

import concurrent.futures as cf
import socket
import threading

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from serving.client import Client, RequestError, ServerBusyError
from serving.config import ServeConfig
from serving.repository import generate_repository
from serving.server import ServerOptions, TritonServer
from tests.serving.hostile import (
    PROTOCOLS,
    assert_still_serving,
    backbone_feed,
    canary_answer,
    component,
    only_task,
    post,
)

pytestmark = pytest.mark.slow

GOOD = ["the film was great", "awful plot and dull actors", "a charming, moving story", "really quite tedious"]
BAD = ["\u200b", "\x00", "\ufeff\u200f", "\ufffd"]


@pytest.fixture(scope="module")
def before(supervised, specs):
    return canary_answer(supervised.server, specs["single"].task)


@pytest.fixture(autouse=True)
def still_serving(request, supervised, specs, before):
    yield
    if "tight" not in request.fixturenames:
        assert_still_serving(supervised.server, specs["single"].task, before)


def _stats(server, model: str) -> tuple[int, int]:
    """(executions, requests answered) of `model` so far."""
    s = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)["model_stats"][0]
    return s["execution_count"], s["inference_stats"]["success"]["count"] + s["inference_stats"]["fail"]["count"]


def _at_once(calls: list, workers: int | None = None) -> list:
    """Run the calls on as many threads, released together; each result or the exception it raised."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - the test inspects them
            return e

    with cf.ThreadPoolExecutor(workers or len(calls)) as pool:
        return list(pool.map(run, calls))


BAD_IDS = {
    "negative id": ([[101, -3, 102]], None, "is outside"),
    "id past the vocabulary": ([[101, 99999, 102]], None, "is outside"),
    "all-zero mask": ([[101, 102]], [[0, 0]], "has no 1"),
    "too long": ([[101] * 600], None, "sequence length 600"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_merged_with_good_ones_fail_alone(supervised, specs, protocol):
    """The dynamic batcher merges concurrent requests; only the bad ones get an error, the good ones their answer."""
    server, spec, module = supervised.server, specs["single"], PROTOCOLS[protocol]
    url = server.http_url if protocol == "http" else server.grpc_url
    backbone = component(server, spec.task, "backbone")
    rng = np.random.default_rng(0)
    good = [rng.integers(1000, 5000, (1 + i % 3, 4 + 3 * i)) for i in range(6)]
    alone = [
        module.InferenceServerClient(url).infer(backbone, backbone_feed(module, spec, g)).as_numpy("hidden_states")
        for g in good
    ]
    calls = [
        lambda g=g: (
            module.InferenceServerClient(url).infer(backbone, backbone_feed(module, spec, g)).as_numpy("hidden_states")
        )
        for g in good
    ]
    calls += [
        lambda b=b: module.InferenceServerClient(url).infer(
            backbone, backbone_feed(module, spec, np.array(b[0]), None if b[1] is None else np.array(b[1]))
        )
        for b in BAD_IDS.values()
    ]
    executions, answered = _stats(server, backbone)
    results = _at_once(calls)
    for got, want in zip(results[: len(good)], alone):
        assert not isinstance(got, Exception), got
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got, (_, _, message) in zip(results[len(good) :], BAD_IDS.values()):
        assert isinstance(got, InferenceServerException) and message in got.message(), got
    executions_after, answered_after = _stats(server, backbone)
    assert answered_after - answered >= len(calls)  # (plus the supervisor's canaries)
    assert executions_after - executions < answered_after - answered  # some requests were merged into one execution


def test_contentless_texts_among_good_ones_at_once(supervised, specs):
    server, task = supervised.server, specs["single"].task
    with Client(server.http_url) as c:
        reference = c.classify(task, GOOD)
    calls = [
        lambda i=i, t=t: Client(server.grpc_url if i % 2 else server.http_url, "grpc" if i % 2 else "http").classify(
            task, [t]
        )
        for i, t in enumerate(GOOD + BAD)
    ]
    results = _at_once(calls)
    for got, want in zip(results[: len(GOOD)], reference):
        assert not isinstance(got, Exception), got
        assert got[0].label == want.label and np.allclose(
            list(got[0].probabilities.values()), list(want.probabilities.values()), atol=1e-6
        )
    assert all(isinstance(r, RequestError) and "has no content" in str(r) for r in results[len(GOOD) :])


def test_200_requests_at_concurrency_16_with_one_in_five_bad(supervised, specs):
    server, single, pair = supervised.server, specs["single"].task, specs["pair"].task
    with Client(server.http_url) as c:
        ref_single, ref_pair = c.classify(single, GOOD), c.classify(pair, GOOD, GOOD[::-1])
    local = threading.local()

    def one(i):
        protocol = "grpc" if i % 2 else "http"
        if getattr(local, protocol, None) is None:
            setattr(local, protocol, Client(server.grpc_url if i % 2 else server.http_url, protocol))
        client, k = getattr(local, protocol), i % len(GOOD)
        if i % 5 == 0:
            with pytest.raises(RequestError, match="has no content"):
                client.classify(single, [BAD[k]])
            return "bad"
        if i % 7 == 0:
            (p,) = client.classify(pair, [GOOD[k]], [GOOD[::-1][k]])
            assert p.label == ref_pair[k].label
            return "pair"
        (p,) = client.classify(single, [GOOD[k]])
        assert p.label == ref_single[k].label
        return "single"

    with cf.ThreadPoolExecutor(16) as pool:
        kinds = list(pool.map(one, range(200)))  # an assertion in any request raises here
    assert kinds.count("bad") == 40 and kinds.count("pair") + kinds.count("single") == 160


def test_slow_and_vanishing_clients_do_not_block_others(supervised, specs):
    server, port, task = supervised.server, supervised.server.options.http_port, specs["single"].task
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(f"POST /v2/models/{task}/infer HTTP/1.1\r\nContent-Le".encode())  # a head that never ends
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(f'POST /v2/models/{task}/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{{"inp'.encode())
    half.close()  # gone mid-body
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        with Client(server.http_url, timeout_s=20) as c:
            assert len(c.classify(task, GOOD)) == len(GOOD)
    finally:
        for s in [slow, *idle]:
            s.close()


def test_clients_that_leave_before_their_answer(supervised, specs):
    port, task = supervised.server.options.http_port, specs["single"].task
    body = '{"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":["the film was great"]}]}'
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"POST /v2/models/{task}/infer HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        s.close()
    status, answer = post(port, f"/v2/models/{task}/infer", body)
    assert status == 200 and '"label"' in answer


# Overload: a separate server whose backbone queue holds 2 requests and waits 200 ms to fill a batch.
TIGHT = ServeConfig(max_batch_size=8, max_queue_delay_us=200_000, max_queue_size=2, queue_timeout_us=5_000_000)


@pytest.fixture(scope="module")
def tight(serve_runs, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tight") / "model_repository"
    generate_repository([serve_runs["single"]], repo, TIGHT)
    with TritonServer(
        ServerOptions.on_free_ports(repository=repo, log_file=repo.parent / "tritonserver.log")
    ) as server:
        server.before = canary_answer(server, only_task(server))
        yield server
    assert server.process.poll() is not None


@pytest.fixture(autouse=True)
def tight_still_serving(request):
    yield
    if "tight" in request.fixturenames:
        server = request.getfixturevalue("tight")
        assert_still_serving(server, only_task(server), server.before)


def test_a_full_queue_is_a_clear_rejection(tight, specs):
    module, spec = PROTOCOLS["http"], specs["single"]
    feed = backbone_feed(module, spec, np.full((2, 6), 2000))
    results = _at_once(
        [
            lambda: module.InferenceServerClient(tight.http_url).infer("backbone", feed).as_numpy("cls_states")
            for _ in range(12)
        ]
    )
    rejected = [r for r in results if isinstance(r, Exception)]
    assert rejected and len(rejected) < len(results)
    assert all(
        isinstance(r, InferenceServerException) and r.status() == "503" and "Exceeds maximum queue size" in r.message()
        for r in rejected
    ), rejected


def test_overload_through_the_client_is_server_busy(tight):
    task = only_task(tight)
    results = _at_once(
        [
            lambda i=i: Client(tight.grpc_url if i % 2 else tight.http_url, "grpc" if i % 2 else "http").classify(
                task, GOOD[:2]
            )
            for i in range(16)
        ]
    )
    busy = [r for r in results if isinstance(r, Exception)]
    assert busy and all(isinstance(r, ServerBusyError) and "Exceeds maximum queue size" in str(r) for r in busy), busy
    assert all(len(r) == 2 for r in results if not isinstance(r, Exception))


def test_a_request_may_ask_for_a_shorter_queue_timeout(tight):
    task = only_task(tight)
    body = (
        '{"parameters":{"timeout":1000},"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":["great"]}]}'
    )
    status, answer = post(tight.options.http_port, f"/v2/models/{task}/infer", body)
    assert status == 503 and "Request timeout expired" in answer
