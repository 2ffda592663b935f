"""A small HTTP/1.1 guard in front of tritonserver's HTTP endpoint: bounded heads, bodies and JSON depth.

Triton 2.51 (the newest in nvidia-pytriton 0.7.0, so it cannot be upgraded) dies with SIGSEGV on one
request whose JSON nests 100,000 arrays (~200 KB), and reads bodies of any size. The guard listens
on the public HTTP port and forwards a request to tritonserver (on a private 127.0.0.1 port) only if

- its head is at most `max_head_bytes` (431) and it has a Content-Length: chunked or compressed bodies
  are refused (411, 415), since their size and depth are unknown until decoded;
- its body is at most `max_body_bytes` (413);
- its JSON (the whole body, or the first Inference-Header-Content-Length bytes of a request carrying
  binary tensors) nests arrays and objects at most `max_json_depth` deep (400), and for an /infer
  request parses as an object with an "inputs" list (400; Triton would answer malformed JSON with 500).

`GET /v2/health/ready` is answered by `readiness()` (a canary inference), because Triton's own stays
200 when a python-backend stub has died. While tritonserver is down every request gets a 503 saying
so. Responses are copied back unchanged. Clients must not pipeline requests (tritonclient, curl and
requests do not).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np

from serving.errors import ServerError

READY_PATH = "/v2/health/ready"
UNAVAILABLE = "the inference server is not running (it is being restarted); retry in a few seconds"
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int = 16 * 2**20
    max_json_depth: int = 64
    max_head_bytes: int = 64 * 2**10

    def __post_init__(self):
        if self.max_body_bytes < 1024 or self.max_json_depth < 8 or self.max_head_bytes < 1024:
            raise ValueError(f"guard limits too small to serve any request: {self}")


def json_depth(data: bytes) -> int:
    """Deepest nesting of [ and { outside JSON strings (malformed JSON may read deeper, never shallower)."""
    if b"[" not in data and b"{" not in data:
        return 0
    a = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    step = np.zeros(256, np.int8)
    for byte, d in _BRACKETS.items():
        step[byte] = d
    return int(np.cumsum(step[a], dtype=np.int32).max(initial=0))


def check_json(data: bytes, max_depth: int, infer: bool) -> str | None:
    """Why the JSON part of a request is refused (too deep; for /infer: not a JSON object with inputs), or None.

    Triton itself answers malformed JSON with a 500; a client error is a 400.
    """
    depth = json_depth(data)
    if depth > max_depth:
        return f"JSON nested {depth} levels deep; at most {max_depth} are accepted (a KServe v2 request needs fewer than 10)"
    if not infer:
        return None
    try:
        request = json.loads(data)
    except ValueError as e:
        return f"the request body is not valid JSON: {e}"
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        return 'an inference request must be a JSON object with an "inputs" list (KServe v2 protocol)'
    if SURROGATE_ESCAPE.search(data) and not _is_text(request):
        return "a string in the request holds a lone UTF-16 surrogate (\\ud800-\\udfff escape), which is not text"
    return None


# A "\\ud800" escape is valid JSON but a lone one is not Unicode text (Triton answers it with a 500).
# Only bodies holding such an escape are re-encoded: the common request pays one regex scan.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_text(request) -> bool:
    """Whether every string in the parsed request encodes as UTF-8 (surrogate pairs do, lone halves not)."""
    try:
        json.dumps(request, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error_response(status: int, message: str, close: bool = True, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with Triton's error body {"error": message}."""
    body = json.dumps({"error": message}).encode()
    lines = (
        [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        + (["Connection: close"] if close else [])
        + ([f"Retry-After: {retry_after}"] if retry_after else [])
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class RequestHead:
    method: str
    target: str
    headers: list[tuple[str, str]]
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> RequestHead | None:
        try:
            lines = raw.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:] if line]
        except ValueError:
            return None
        if not version.startswith("HTTP/1.") or any(len(h) != 2 or not h[0] for h in headers):
            return None
        return cls(method, target, headers, raw)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def forwarded(self) -> bytes:
        """The head without Expect (the guard answered 100 Continue itself)."""
        if not self.values("expect"):
            return self.raw
        lines = [line for line in self.raw.split(b"\r\n") if not line.lower().startswith(b"expect:")]
        return b"\r\n".join(lines)


class _Connection:
    """One client connection: its upstream connection and whether a forwarded request awaits its answer."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.upstream: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task | None = None
        self.awaiting = False


class HttpGuard:
    """The guard on (host, port), forwarding to `target` (None while tritonserver is down), in its own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        limits: GuardLimits = GuardLimits(),
        readiness: Callable[[], tuple[bool, str]] | None = None,
    ):
        self.host, self.port, self.limits = host, port, limits
        self.readiness = readiness
        self.target: tuple[str, int] | None = None
        self.rejected: Counter = Counter()  # HTTP status -> requests the guard refused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HttpGuard:
        ready, error = threading.Event(), []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(ready, error), name=f"http-guard-{self.port}", daemon=True
        )
        self._thread.start()
        ready.wait(30)
        if error:
            self._thread.join(5)
            raise ServerError(
                f"http port {self.port} on {self.host}: {error[0]}; stop what uses it or pick another port (--http-port)"
            )
        return self

    def _run(self, ready: threading.Event, error: list) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                asyncio.start_server(
                    self._serve, self.host, self.port, limit=self.limits.max_head_bytes, reuse_address=True
                )
            )
        except OSError as e:
            error.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._thread = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        try:
            while await self._one_request(reader, conn):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn.pump is not None:
                conn.pump.cancel()
            for w in (conn.upstream, writer):
                if w is not None:
                    w.close()

    async def _refuse(self, conn: _Connection, status: int, message: str, **kwargs) -> bool:
        self.rejected[status] += 1
        conn.writer.write(error_response(status, message, **kwargs))
        await conn.writer.drain()
        return False

    async def _one_request(self, reader: asyncio.StreamReader, conn: _Connection) -> bool:
        """Read, check and forward one request; False ends the connection."""
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        except asyncio.LimitOverrunError:
            return await self._refuse(conn, 431, f"request head over {self.limits.max_head_bytes} bytes")
        head = RequestHead.parse(raw)
        if head is None:
            return await self._refuse(conn, 400, "malformed HTTP/1.1 request head")
        if head.method == "GET" and head.target.split("?")[0] == READY_PATH and self.readiness is not None:
            return await self._ready(conn)
        length, problem = self._check_head(head)
        if problem:
            return await self._refuse(conn, *problem)
        if length > self.limits.max_body_bytes:
            await self._refuse(
                conn,
                413,
                f"request body of {length} bytes is over the limit of "
                f"{self.limits.max_body_bytes} bytes (--max-request-bytes); send smaller batches",
            )
            await _discard(reader, length)
            return False
        if head.values("expect"):
            conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await reader.readexactly(length)
        problem = await self._check_body(head, body)
        if problem:
            return await self._refuse(conn, *problem)
        return await self._forward(conn, head.forwarded() + body)

    def _check_head(self, head: RequestHead) -> tuple[int, tuple | None]:
        """(body length, None) or (0, (status, message)) for a head the guard refuses."""
        if head.values("transfer-encoding"):
            return 0, (411, "chunked request bodies are not accepted: send a Content-Length")
        if any(v.lower() != "identity" for v in head.values("content-encoding")):
            return 0, (415, "compressed request bodies are not accepted: send them uncompressed")
        lengths = set(head.values("content-length"))
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            return 0, (400, f"invalid Content-Length {sorted(lengths)}")
        return (int(next(iter(lengths))) if lengths else 0), None

    async def _check_body(self, head: RequestHead, body: bytes) -> tuple | None:
        json_part = head.values("inference-header-content-length")
        size = int(json_part[0]) if json_part and json_part[0].isdigit() else len(body)
        infer = head.method == "POST" and head.target.split("?")[0].endswith("/infer")
        check = functools.partial(check_json, body[:size], self.limits.max_json_depth, infer)
        message = check() if size < 2**20 else await asyncio.get_running_loop().run_in_executor(None, check)
        return (400, message) if message else None

    async def _ready(self, conn: _Connection) -> bool:
        ok, reason = await asyncio.get_running_loop().run_in_executor(None, self.readiness)
        if not ok:
            return await self._refuse(conn, 503, f"not ready: {reason}", close=False)
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await conn.writer.drain()
        return True

    async def _forward(self, conn: _Connection, data: bytes) -> bool:
        if conn.upstream is None:
            target = self.target
            try:
                if target is None:
                    raise ConnectionRefusedError
                up_reader, conn.upstream = await asyncio.open_connection(*target)
            except OSError:
                return await self._refuse(conn, 503, UNAVAILABLE, retry_after=2)
            conn.pump = asyncio.create_task(self._pump(up_reader, conn))
        conn.awaiting = True
        conn.upstream.write(data)
        await conn.upstream.drain()
        return True

    async def _pump(self, up_reader: asyncio.StreamReader, conn: _Connection) -> None:
        """Copy tritonserver's responses to the client until it closes; a request it dropped gets a 502."""
        try:
            while data := await up_reader.read(2**16):
                conn.awaiting = False
                conn.writer.write(data)
                await conn.writer.drain()
            if conn.awaiting:
                self.rejected[502] += 1
                conn.writer.write(
                    error_response(
                        502,
                        "the inference server closed the connection without answering "
                        "(it crashed; it is being restarted)",
                    )
                )
                await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.writer.close()


async def _discard(reader: asyncio.StreamReader, length: int, timeout_s: float = 5.0) -> None:
    """Read and drop up to `length` body bytes, so that a client still sending gets to read the refusal."""

    async def drain() -> None:
        left = length
        while left > 0 and (chunk := await reader.read(min(left, 2**20))):
            left -= len(chunk)

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
