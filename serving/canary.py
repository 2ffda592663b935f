"""Readiness that means a real inference answered: one canary request per served task.

Triton's /v2/health/ready stays 200 when a python-backend stub has died, while every request fails
with "Stub process '<model>' is not healthy". The canary classifies one fixed text (and pair) per
task over plain HTTP/JSON, remembers the first answer, and is healthy only while every task answers
the same (label and probabilities within 1e-4). A queue rejection is not a failure of the server:
it is reported as overloaded, so that a busy server is not restarted.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import PROBABILITIES, SCORE, TEXT, TEXT_PAIR

CANARY_TEXT = "A short canary sentence to check that the model answers."
OVERLOAD_MARKERS = ("Exceeds maximum queue size", "Request timeout expired")  # Triton's queue-policy rejections
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through an http_proxy


@dataclass(frozen=True)
class CanaryResult:
    """kind: ok | overloaded (alive, shedding load) | broken (no answer, an error, or a changed answer)."""

    kind: str
    detail: str
    at: float  # time.time()
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail, "at": self.at, "latency_s": round(self.latency_s, 4)}


def tasks_of(repository: Path) -> dict[str, bool]:
    """Task -> text-pair flag, from the repository.json the generator wrote ({} without one)."""
    try:
        summary = json.loads((Path(repository) / "repository.json").read_text())
    except (OSError, ValueError):
        return {}
    return {task: bool(info.get("text_pair", False)) for task, info in summary.get("tasks", {}).items()}


class Canary:
    """Classify the canary text with each task at `url` (host:port of tritonserver's own HTTP endpoint)."""

    def __init__(self, url: str, tasks: dict[str, bool], timeout_s: float = 10.0, tolerance: float = 1e-4):
        self.url, self.tasks, self.timeout_s, self.tolerance = url, dict(tasks), timeout_s, tolerance
        self.baseline: dict[str, np.ndarray] = {}
        self.last: CanaryResult | None = None
        self._lock = threading.Lock()

    def _infer(self, task: str, pair: bool) -> np.ndarray:
        inputs = [
            {"name": n, "shape": [1, 1], "datatype": "BYTES", "data": [CANARY_TEXT]}
            for n in ((TEXT, TEXT_PAIR) if pair else (TEXT,))
        ]
        body = json.dumps({"inputs": inputs}).encode()  # every output: probabilities, or a regression's score
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{task}/infer", body, {"Content-Type": "application/json"}
        )
        with DIRECT.open(request, timeout=self.timeout_s) as r:
            outputs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        return np.asarray(outputs[PROBABILITIES if PROBABILITIES in outputs else SCORE]["data"], np.float64)

    def _check_task(self, task: str, pair: bool) -> tuple[str, str]:
        try:
            probs = self._infer(task, pair)
        except urllib.error.HTTPError as e:
            message = e.read().decode(errors="replace")[:300]
            kind = "overloaded" if any(m in message for m in OVERLOAD_MARKERS) else "broken"
            return kind, f"task {task}: HTTP {e.code} {message}"
        except (OSError, ValueError, KeyError) as e:  # refused, reset, timed out, not JSON
            return "broken", f"task {task}: no answer ({type(e).__name__}: {e})"
        first = self.baseline.setdefault(task, probs)
        if first.shape != probs.shape or np.abs(first - probs).max() > self.tolerance:
            return (
                "broken",
                f"task {task}: answered {probs.round(5).tolist()}, the first canary {first.round(5).tolist()}",
            )
        return "ok", ""

    def check(self) -> CanaryResult:
        """One canary inference per task now; the worst outcome wins."""
        with self._lock:
            t0, results = time.perf_counter(), []
            for task, pair in self.tasks.items():
                results.append(self._check_task(task, pair))
            bad = [r for r in results if r[0] == "broken"] or [r for r in results if r[0] == "overloaded"]
            kind, detail = bad[0] if bad else ("ok", f"{len(results)} task(s) answered as before")
            self.last = CanaryResult(kind, detail, time.time(), time.perf_counter() - t0)
            return self.last

    def cached(self, max_age_s: float) -> CanaryResult:
        """The last result if younger than `max_age_s`, else a fresh check."""
        last = self.last
        if last is not None and time.time() - last.at < max_age_s:
            return last
        return self.check()
