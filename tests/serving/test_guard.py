"""The HTTP guard's checks without a server: JSON depth outside strings, request shape, request heads."""

import pytest

from serving.guard import GuardLimits, RequestHead, check_json, error_response, json_depth


@pytest.mark.parametrize(
    "data, depth",
    [
        (b"", 0),
        (b'{"a": 1}', 1),
        (b"[[[]]]", 3),
        (b'{"inputs":[{"data":[["x"]]}]}', 5),
        (b'["[[[[[[", "]]]"]', 1),  # brackets inside strings do not count
        (b'["a \\" [[[[ \\\\", [1]]', 2),  # nor after escaped quotes
        (b"[" * 100_000 + b"]" * 100_000, 100_000),
    ],
)
def test_json_depth_counts_brackets_outside_strings(data, depth):
    assert json_depth(data) == depth


@pytest.mark.parametrize(
    "data, infer, message",
    [
        (b'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]}', True, None),
        (b"[" * 65 + b"]" * 65, False, "nested 65 levels deep; at most 64"),
        (b'{"inputs": [', True, "not valid JSON"),
        (b'{"outputs": []}', True, '"inputs" list'),
        (b'{"outputs": []}', False, None),  # only /infer bodies must carry inputs
        (b'"just a string"', True, "JSON object"),
        (b'{"inputs": [{"data": ["\\ud800"]}]}', True, "lone UTF-16 surrogate"),
        (b'{"inputs": [{"data": ["\\ud83d\\ude00"]}]}', True, None),  # a surrogate pair is an emoji
    ],
)
def test_check_json(data, infer, message):
    got = check_json(data, 64, infer)
    assert (got is None) if message is None else (message in got)


def test_request_heads_parse_or_are_refused():
    head = RequestHead.parse(
        b"POST /v2/models/a/infer HTTP/1.1\r\nHost: x:1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert head.method == "POST" and head.values("content-length") == ["5"] and head.values("host") == ["x:1"]
    assert b"Expect" not in head.forwarded() and b"Content-Length: 5" in head.forwarded()
    for bad in (
        b"HELLO\r\n\r\n",
        b"GET / SPDY/3\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\n: v\r\n\r\n",
    ):
        assert RequestHead.parse(bad) is None, bad


def test_refusals_carry_tritons_error_body():
    response = error_response(413, "too big", retry_after=2)
    assert response.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n") and b"Retry-After: 2" in response
    assert response.endswith(b'\r\n\r\n{"error": "too big"}') and b"Connection: close" in response


def test_limits_refuse_values_that_serve_nothing():
    with pytest.raises(ValueError, match="too small"):
        GuardLimits(max_body_bytes=10)
