"""Helpers for the hostile-input tests: raw HTTP, tensors, and the after-each check that the server still serves."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from serving.client import Client

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}
CANARY_TEXTS = ["the film was great and moving", "a dull, tedious plot"]


def raw_http(port: int, data: bytes, timeout_s: float = 30.0) -> tuple[int, str]:
    """Send raw bytes to 127.0.0.1:port and read one response: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before a response: {response[:200]!r}")
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        while length and len(body) < int(length.group(1)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ")[1]), body.decode(errors="replace")


def post(
    port: int, path: str, body: bytes | str, headers: dict | None = None, timeout_s: float = 60.0
) -> tuple[int, str]:
    """One HTTP POST with a Content-Length (http.client): (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def tensor(module, name: str, array: np.ndarray, dtype: str):
    t = module.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def text(module, rows, name: str = "text"):
    """A (B, 1) BYTES tensor from a list of str/bytes rows (or an already shaped list)."""
    rows = [[r.encode() if isinstance(r, str) else r] if not isinstance(r, list) else r for r in rows]
    return tensor(module, name, np.array(rows, dtype=object), "BYTES")


def backbone_feed(module, spec, ids: np.ndarray, mask: np.ndarray | None = None, types: np.ndarray | None = None):
    """Backbone inputs for int64 ids (B, T); the mask defaults to ones and the types to zeros."""
    arrays = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids) if mask is None else mask,
        "token_type_ids": np.zeros_like(ids) if types is None else types,
    }
    return [tensor(module, t.name, arrays[t.name].astype(np.int64), "INT64") for t in spec.backbone.inputs]


def canary_answer(server, task: str) -> list:
    """The task's predictions for CANARY_TEXTS over the guarded HTTP port."""
    with Client(server.http_url, "http", timeout_s=30) as client:
        return client.classify(task, CANARY_TEXTS)


def wait_ready(server, timeout_s: float) -> float:
    """Seconds until the guard's /v2/health/ready (a canary inference) says 200; AssertionError after timeout_s."""
    port = server.options.http_port
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if get(port, "/v2/health/ready")[0] == 200:
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout_s} s; log: {server.options.log_file}")


def assert_still_serving(server, task: str, before: list) -> None:
    """Ready (a real inference answered) and the canary texts answered exactly as before the case."""
    status, body = get(server.options.http_port, "/v2/health/ready")
    assert status == 200, f"not ready after the case: {body}"
    after = canary_answer(server, task)
    assert [p.label for p in after] == [p.label for p in before]
    for a, b in zip(after, before):  # the same graph on the same input (merged with others or not)
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6)


def component(server, task: str, kind: str) -> str:
    """The name of `task`'s tokenizer / backbone / adapter / postprocess model, from repository.json."""
    return json.loads((server.options.repository / "repository.json").read_text())["tasks"][task][kind]


def only_task(server) -> str:
    return next(iter(json.loads((server.options.repository / "repository.json").read_text())["tasks"]))
