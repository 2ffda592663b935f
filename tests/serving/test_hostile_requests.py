"""Hostile single requests against a real, supervised tritonserver: parser, size, encoding, shape, dtype, components.

Every case asserts its own answer (a 4xx naming the problem, or a correct answer), and afterwards
that the server is ready (a canary inference answered) and answers the canary texts as before.
"""

import json
import re

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.serving.hostile import (
    PROTOCOLS,
    assert_still_serving,
    backbone_feed,
    canary_answer,
    post,
    raw_http,
    tensor,
    text,
)

pytestmark = pytest.mark.slow

CLIENT_ERRORS = {"http": ("400", "404", "413"), "grpc": ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")}
NO_CONTENT = "has no content: nothing is left after tokenization but special tokens"
N = 100_000


@pytest.fixture(scope="module")
def before(supervised, specs):
    return canary_answer(supervised.server, specs["single"].task)


@pytest.fixture(autouse=True)
def still_serving(supervised, specs, before):
    yield
    assert_still_serving(supervised.server, specs["single"].task, before)


def _infer_body(data, task_shape=(1, 1)) -> str:
    return json.dumps({"inputs": [{"name": "text", "shape": list(task_shape), "datatype": "BYTES", "data": data}]})


def _raw(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode()
        + extra
        + b"\r\n"
        + body
    )


RAW_CASES = {  # case -> (request bytes for the task's infer path, expected status, expected message)
    "nested arrays 100k in data (crashes Triton 2.51)": (
        lambda p: _raw(
            p,
            ('{"inputs":[{"name":"text","shape":[1,1],"datatype":"BYTES","data":' + "[" * N + "]" * N + "}]}").encode(),
        ),
        400,
        r"JSON nested 1000\d\d levels deep; at most 64",
    ),
    "nested objects 100k": (
        lambda p: _raw(p, ('{"a":' * N + "1" + "}" * N).encode()),
        400,
        "JSON nested 100000 levels",
    ),
    "nesting just over the limit": (lambda p: _raw(p, ("[" * 65 + "]" * 65).encode()), 400, "nested 65 levels"),
    "truncated JSON": (lambda p: _raw(p, b'{"inputs":[{"name":'), 400, "not valid JSON"),
    "a JSON array instead of an object": (lambda p: _raw(p, b"[1, 2]"), 400, 'JSON object with an "inputs" list'),
    "an object without inputs": (lambda p: _raw(p, b'{"outputs": []}'), 400, '"inputs" list'),
    "an empty body": (lambda p: _raw(p, b""), 400, "not valid JSON"),
    "invalid UTF-8 inside the JSON": (
        lambda p: _raw(p, _infer_body(["x"]).replace('"x"', '"\udcff"').encode("utf-8", "surrogateescape")),
        400,
        "not valid JSON",
    ),
    "an escaped lone surrogate in the JSON": (
        lambda p: _raw(p, _infer_body(["x"]).replace('"x"', '"\\ud800"').encode()),
        400,
        "lone UTF-16 surrogate",
    ),
    "chunked body": (
        lambda p: f"POST {p} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode(),
        411,
        "chunked request bodies are not accepted",
    ),
    "gzip body": (
        lambda p: _raw(p, b"\x1f\x8b\x08\x00", b"Content-Encoding: gzip\r\n"),
        415,
        "compressed request bodies",
    ),
    "two different Content-Lengths": (
        lambda p: _raw(p, b"{}", b"Content-Length: 7\r\n"),
        400,
        "invalid Content-Length",
    ),
    "a non-numeric Content-Length": (
        lambda p: f"POST {p} HTTP/1.1\r\nContent-Length: -5\r\n\r\n".encode(),
        400,
        "invalid Content-Length",
    ),
    "a 70 KB header": (
        lambda p: _raw(p, b"{}", b"X-Big: " + b"a" * 70_000 + b"\r\n"),
        431,
        "request head over 65536 bytes",
    ),
    "a garbage request line": (lambda p: b"HELLO\r\n\r\n", 400, "malformed HTTP/1.1 request head"),
    "an HTTP/2 preface": (lambda p: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed"),
    "a 20 MB body": (
        lambda p: _raw(p, b" " * (20 * 2**20)),
        413,
        "request body of 20971520 bytes is over the limit of 16777216",
    ),
    "Expect: 100-continue with 1 GB announced": (
        lambda p: f"POST {p} HTTP/1.1\r\nContent-Length: {2**30}\r\nExpect: 100-continue\r\n\r\n".encode(),
        413,
        "over the limit",
    ),
    "binary-tensor header longer than the body": (
        lambda p: _raw(p, _infer_body(["x"]).encode(), b"Inference-Header-Content-Length: 9999\r\n"),
        400,
        r"inference header size should be in range \(0, 83\), got: 9999",
    ),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_http(supervised, specs, case):
    build, status, message = RAW_CASES[case]
    got, body = raw_http(supervised.server.options.http_port, build(f"/v2/models/{specs['single'].task}/infer"))
    assert got == status, body
    error = json.loads(body)["error"]
    assert re.search(message, error), error


def _texts(rows, name="text"):
    return lambda m, s: [text(m, rows, name)]


def _pair(rows, pairs):
    return lambda m, s: [text(m, rows), text(m, pairs, "text_pair")]


def _backbone(ids, mask=None, types=None):
    return lambda m, s: backbone_feed(
        m, s, np.array(ids), None if mask is None else np.array(mask), None if types is None else np.array(types)
    )


def _adapter(t=8, k=None, value=0.0):
    def build(m, s):
        t_ = s.max_length + 8 if t == "too long" else t
        spec = {x.name: x for x in s.adapter.inputs}
        hs, cls = spec["hidden_states"].shape, spec["cls_states"].shape
        h = np.zeros((1, k or hs[1], t_, hs[3]), np.float32)
        h[0, 0, 0, 0] = value
        return [
            tensor(m, "hidden_states", h, "FP32"),
            tensor(m, "cls_states", np.zeros((1, cls[1], cls[2]), np.float32), "FP32"),
            tensor(m, "attention_mask", np.ones((1, t_), np.int64), "INT64"),
        ]

    return build


def _logits(values):
    return lambda m, s: [tensor(m, "logits", np.array([values], np.float32), "FP32")]


VOCAB = 30522  # the fake export uses the real MiniLM tokenizer
OK = None
CASES = {  # case -> (model: single | pair | backbone | adapter | postprocess | tokenizer | a name, inputs, message or OK)
    "zero-width space": ("single", _texts(["\u200b"]), NO_CONTENT),
    "NUL": ("single", _texts(["\x00"]), NO_CONTENT),
    "BOM + RLM": ("single", _texts(["\ufeff\u200f"]), NO_CONTENT),
    "U+FFFD": ("single", _texts(["\ufffd"]), NO_CONTENT),
    "a lone combining mark": ("single", _texts(["\u0301"]), NO_CONTENT),
    "control characters only": ("single", _texts(["\x01\x02\x7f"]), NO_CONTENT),
    "whitespace only": ("single", _texts([" \t\n"]), r"text\[0\] is empty"),
    "an empty string": ("single", _texts([""]), r"text\[0\] is empty"),
    "invalid UTF-8": ("single", _texts([b"\xff\xfe\xfd"]), "not valid UTF-8"),
    "an encoded surrogate": ("single", _texts([b"\xed\xa0\x80"]), "not valid UTF-8"),
    "an overlong encoding": ("single", _texts([b"\xc0\xaf"]), "not valid UTF-8"),
    "one contentless row among three": (
        "single",
        _texts(["fine", "good", "\u200b\u200b"]),
        r"text\[2\] has no content",
    ),
    "a contentless pair": ("pair", _pair(["a man sleeps"], ["\u200b"]), r"text_pair\[0\] has no content"),
    "emoji only (an [UNK] token is content)": ("single", _texts(["\U0001f642\U0001f642"]), OK),
    "a zero-width space inside words": ("single", _texts(["a gre\u200bat film"]), OK),
    "right-to-left and mixed scripts": (
        "single",
        _texts(["\u05e1\u05e8\u05d8 \u0641\u064a\u0644\u0645 film \u6620\u753b"]),
        OK,
    ),
    "one byte over the text limit": ("single", _texts([b"a" * 65537]), r"text\[0\] is 65537 bytes; the limit is 65536"),
    "exactly the text limit (truncated, not refused)": ("single", _texts([("good film " * 6554)[:65536]]), OK),
    "a pair over the text limit": ("pair", _pair(["ok"], [b"b" * 70_000]), r"text_pair\[0\] is 70000 bytes"),
    "INT64 text": ("single", lambda m, s: [tensor(m, "text", np.zeros((1, 1), np.int64), "INT64")], "(?i)data-?type"),
    "FP32 text": ("single", lambda m, s: [tensor(m, "text", np.zeros((1, 1), np.float32), "FP32")], "(?i)data-?type"),
    "rank 1 text": ("single", lambda m, s: [tensor(m, "text", np.array([b"a", b"b"], dtype=object), "BYTES")], "shape"),
    "shape (1, 2) text": ("single", _texts([[b"a", b"b"]]), "shape"),
    "batch 9 over max_batch_size 8": ("single", _texts(["x"] * 9), "batch-size must be <= 8"),
    "batch 0": ("single", lambda m, s: [tensor(m, "text", np.zeros((0, 1), dtype=object), "BYTES")], "got 0|batch"),
    "a missing text_pair": ("pair", _texts(["x"]), "text_pair"),
    "an unknown extra input": (
        "single",
        lambda m, s: [text(m, ["fine"]), text(m, ["x"], "bogus")],
        "expected 1 inputs but got 2",
    ),
    "an unknown model": ("no_such_model", _texts(["x"]), "unknown model"),
    "backbone: an id equal to the vocabulary size": (
        "backbone",
        _backbone([[101, 2000, VOCAB, 102]]),
        rf"input_ids\[0, 2\] = {VOCAB} is outside \[0, {VOCAB}\)",
    ),
    "backbone: a negative id": ("backbone", _backbone([[101, -7, 102]]), r"input_ids\[0, 1\] = -7 is outside"),
    "backbone: token type 2": ("backbone", _backbone([[101, 102]], types=[[0, 2]]), r"token_type_ids\[0, 1\] = 2"),
    "backbone: mask value 2": ("backbone", _backbone([[101, 102]], mask=[[1, 2]]), r"attention_mask\[0, 1\] = 2"),
    "backbone: an all-zero mask": ("backbone", _backbone([[101, 102]], mask=[[0, 0]]), "row 0 has no 1"),
    "backbone: one token over max_length": (
        "backbone",
        lambda m, s: _backbone([[101] + [2000] * s.max_length])(m, s),
        r"sequence length (\d+) is outside \[1, \d+\]: the model serves up to max_length",
    ),
    "backbone: lengths that disagree": (
        "backbone",
        lambda m, s: [
            tensor(m, t.name, np.ones((1, 6 if t.name == "attention_mask" else 5), np.int64), "INT64")
            for t in s.backbone.inputs
        ],
        "sequence length",
    ),
    "backbone: INT32 ids": (
        "backbone",
        lambda m, s: [
            tensor(
                m,
                t.name,
                np.ones((1, 4), np.int32 if t.name == "input_ids" else np.int64),
                "INT32" if t.name == "input_ids" else "INT64",
            )
            for t in s.backbone.inputs
        ],
        "(?i)data-?type",
    ),
    "backbone: a valid direct call": ("backbone", _backbone([[101, 2000, 102]]), OK),
    "adapter: NaN hidden states": ("adapter", _adapter(value=np.nan), "hidden_states contains NaN or infinity"),
    "adapter: infinite hidden states": ("adapter", _adapter(value=np.inf), "NaN or infinity"),
    "adapter: 8 positions over max_length": (
        "adapter",
        _adapter(t="too long"),
        r"sequence length \d+ is outside \[1, \d+\]",
    ),
    "adapter: the wrong number of taps": ("adapter", _adapter(k=9), "shape"),
    "postprocess: NaN logits": ("postprocess", _logits([np.nan, 1.0]), "NaN or infinity"),
    "postprocess: three logits for two labels": ("postprocess", _logits([0.0, 1.0, 2.0]), "shape"),
    "tokenizer called directly with contentless text": ("tokenizer", _texts(["\u200b"]), NO_CONTENT),
}


def _model(target: str, supervised, specs) -> str:
    plan = {
        t["adapter"]: t
        for t in json.loads((supervised.server.options.repository / "repository.json").read_text())["tasks"].values()
    }
    task = specs["single"].task
    single = next(t for t in plan.values() if t["postprocess"].endswith(task))
    return {
        "single": task,
        "pair": specs["pair"].task,
        "backbone": single["backbone"],
        "adapter": single["adapter"],
        "postprocess": single["postprocess"],
        "tokenizer": single["tokenizer"],
    }.get(target, target)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_request(supervised, specs, case, protocol):
    target, build, message = CASES[case]
    module, server = PROTOCOLS[protocol], supervised.server
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    inputs = build(module, specs["pair" if target == "pair" else "single"])
    if message is OK:
        result = client.infer(_model(target, supervised, specs), inputs)
        assert result.get_response() is not None
        return
    with pytest.raises(InferenceServerException) as info:
        client.infer(_model(target, supervised, specs), inputs)
    assert info.value.status() in CLIENT_ERRORS[protocol], f"{info.value.status()}: {info.value.message()}"
    assert re.search(message, info.value.message()), info.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_20_mb_text_is_refused_quickly_on_both_protocols(supervised, specs, protocol):
    module, server = PROTOCOLS[protocol], supervised.server
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.infer(specs["single"].task, [text(module, [b"x" * (20 * 2**20)])])
    expected = {
        "http": ("413", "over the limit of 16777216 bytes"),
        "grpc": ("StatusCode.INVALID_ARGUMENT", "is 20971520 bytes"),
    }
    assert info.value.status() == expected[protocol][0] and expected[protocol][1] in info.value.message()


def test_restricted_apis_need_the_admin_key(supervised):
    server, port = supervised.server, supervised.server.options.http_port
    key = {"mpismoe-admin-key": server.admin_key_file.read_text().strip()}
    for path in (
        "/v2/repository/index",
        "/v2/repository/models/x/load",
        "/v2/systemsharedmemory/region/x/register",
        "/v2/trace/setting",
        "/v2/logging",
    ):
        status, body = post(port, path, "{}")
        assert status == 403 and "restricted" in body, (path, body)
    assert post(port, "/v2/repository/index", "{}", key)[0] == 200
    grpc = PROTOCOLS["grpc"].InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.register_system_shared_memory("steal", "/mpismoe-x", 64)
    assert grpc.get_model_repository_index(headers={"triton-grpc-protocol-mpismoe-admin-key": key["mpismoe-admin-key"]})
    assert (server.admin_key_file.stat().st_mode & 0o777) == 0o600
