"""`python3 -m deploy.sidecar`: the pod's public HTTP port, serving's guard and canary in front of tritonserver.

In a pod, Kubernetes restarts containers, so the supervisor is not needed; what `python -m serving`
still adds in front of tritonserver is kept: serving/guard.py (bounded request heads, bodies and JSON
depth; a 503 while tritonserver is down) and a /v2/health/ready that is 200 only when serving/canary.py's
inference answered for every task as it first did (the readiness probe). tritonserver's own HTTP
endpoint listens on 127.0.0.1 inside the pod, reachable only through this guard.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from serving.canary import Canary
from serving.errors import ServerError
from serving.guard import GuardLimits, HttpGuard

log = logging.getLogger("deploy.sidecar")


def parse_task(value: str) -> tuple[str, bool]:
    """`name` or `name:pair` (a text-pair task) -> (name, pair)."""
    name, _, kind = value.partition(":")
    if not name or kind not in ("", "pair"):
        raise argparse.ArgumentTypeError(f"expected TASK or TASK:pair, got {value!r}")
    return name, kind == "pair"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m deploy.sidecar", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--listen-port", type=int, default=8000)
    p.add_argument("--upstream-port", type=int, default=8080, help="tritonserver's HTTP port on 127.0.0.1")
    p.add_argument(
        "--task",
        type=parse_task,
        action="append",
        required=True,
        help="a served task (ensemble); TASK:pair for text pairs",
    )
    p.add_argument("--canary-timeout", type=float, default=10.0)
    p.add_argument("--max-request-bytes", type=int, default=GuardLimits().max_body_bytes)
    p.add_argument("--max-json-depth", type=int, default=GuardLimits().max_json_depth)
    p.add_argument(
        "--drain-seconds", type=float, default=5.0, help="keep forwarding this long after SIGTERM (tritonserver drains)"
    )
    return p


class Readiness:
    """The guard's readiness callback: a canary result at most 1 s old; logs each change of state."""

    def __init__(self, canary: Canary):
        self.canary, self.last = canary, None

    def __call__(self) -> tuple[bool, str]:
        result = self.canary.cached(1.0)
        if result.kind != self.last:
            (log.info if result.ok else log.warning)("readiness: %s (%s)", result.kind, result.detail)
            self.last = result.kind
        return result.ok, result.detail


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    upstream = ("127.0.0.1", args.upstream_port)
    canary = Canary(f"{upstream[0]}:{upstream[1]}", dict(args.task), args.canary_timeout)
    limits = GuardLimits(max_body_bytes=args.max_request_bytes, max_json_depth=args.max_json_depth)
    guard = HttpGuard(args.listen_host, args.listen_port, limits, Readiness(canary))
    guard.target = upstream
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        guard.start()
    except ServerError as e:
        log.error("%s", e)
        return 1
    log.info(
        "guard on %s:%d -> tritonserver %s:%d; tasks %s",
        args.listen_host,
        args.listen_port,
        *upstream,
        ", ".join(name for name, _ in args.task),
    )
    stop.wait()
    log.info(
        "stopping in %.1f s (tritonserver drains its requests meanwhile); guard rejections: %s",
        args.drain_seconds,
        dict(guard.rejected),
    )
    time.sleep(args.drain_seconds)
    guard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
