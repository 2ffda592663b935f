"""Classify text with a served task: `Client(url, protocol).classify(task, texts, pairs=None)`.

CLI: `python -m serving.client --task sentiment "a great film" "a dull one"`, or `--file F`, or
text on stdin (one example per line; `--pair-sep TAB` splits each line into text and pair).
Errors say what to do: a refused connection names the URL and `make serve`; an unknown task lists
the tasks the server has (ensembles `X` with a `postprocess_X` model among the loaded models, read
from the statistics API: the repository API needs the admin key). A request the server's queues
reject under overload raises ServerBusyError: retry later.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tritonclient.utils import InferenceServerException

from serving.canary import OVERLOAD_MARKERS
from serving.contract import LABEL, PROBABILITIES, SCORE, TEXT, TEXT_PAIR, postprocess_model, task_of_postprocess
from serving.guard import UNAVAILABLE
from serving.postprocess import Prediction

DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001"}


@dataclass(frozen=True)
class TaskInfo:
    labels: tuple[str, ...]
    max_batch_size: int
    text_pair: bool
    task_type: str = "classification"


class ServingError(RuntimeError):
    """Base class of the client's errors."""


class ServerUnavailableError(ServingError):
    """No Triton server answers at the URL."""


class UnknownTaskError(ServingError):
    """The server has no task (ensemble) of that name."""

    def __init__(self, task: str, available: list[str]):
        super().__init__(f"unknown task {task!r}; this server serves {available or 'no tasks'}")
        self.task, self.available = task, available


class RequestError(ServingError):
    """The server answered the request with an error (bad input, batch too large, ...)."""


class ServerBusyError(RequestError):
    """The server is overloaded: a model queue was full or the request waited past its queue timeout."""


def _protocol_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, EOFError)):  # refused, reset, broken pipe, timeouts (HTTP)
        return True
    if isinstance(exc, InferenceServerException):  # gRPC: status UNAVAILABLE; HTTP: the guard's 502/503
        text = f"{exc.status()} {exc}"
        if any(m in text for m in OVERLOAD_MARKERS):
            return False
        return any(
            s in text
            for s in (
                "UNAVAILABLE",
                "Connection refused",
                "Broken pipe",
                "Socket closed",
                UNAVAILABLE,
                "closed the connection without answering",
            )
        )
    return type(exc).__module__.startswith(("geventhttpclient", "gevent"))  # HTTP parser errors on a cut connection


class Client:
    """A thin, typed wrapper over tritonclient for the served classification ensembles."""

    def __init__(self, url: str | None = None, protocol: str = "http", timeout_s: float = 60.0):
        self.protocol = protocol
        self._module = _protocol_module(protocol)
        self.url = (url or DEFAULT_URLS[protocol]).split("://", 1)[-1].rstrip("/")
        kwargs = {"connection_timeout": timeout_s, "network_timeout": timeout_s} if protocol == "http" else {}
        self._client = self._module.InferenceServerClient(self.url, **kwargs)
        self._timeout_s = timeout_s
        self._tasks: dict[str, TaskInfo] = {}

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - translated into the client's errors
            if _is_unavailable(exc):
                raise ServerUnavailableError(
                    f"cannot reach the Triton server at {self.protocol}://{self.url} ({type(exc).__name__}: {exc}); "
                    "start it with `make serve` (or `python -m serving --runs runs/<name>`)"
                ) from exc
            raise

    def tasks(self) -> list[str]:
        """The tasks the server serves, from the statistics of its loaded models (open without the admin key)."""
        stats = self._call(self._client.get_inference_statistics)
        names = (
            [m["name"] for m in stats["model_stats"]]
            if self.protocol == "http"
            else [m.name for m in stats.model_stats]
        )
        return sorted(t for t in map(task_of_postprocess, names) if t in names)

    def _get_config(self, model: str) -> dict:
        if self.protocol == "http":
            return self._call(self._client.get_model_config, model)
        return self._call(self._client.get_model_config, model, as_json=True)["config"]

    def task_info(self, task: str) -> TaskInfo:
        """Labels, max batch size and text-pair flag of `task`; UnknownTaskError if it is not served."""
        if task not in self._tasks:
            try:
                ensemble, post = self._get_config(task), self._get_config(postprocess_model(task))
            except InferenceServerException:
                raise UnknownTaskError(task, self.tasks()) from None
            params = post["parameters"]
            self._tasks[task] = TaskInfo(
                tuple(json.loads(params["labels"]["string_value"])),
                int(ensemble.get("max_batch_size", 0)),
                any(t["name"] == TEXT_PAIR for t in ensemble.get("input", [])),
                params.get("task_type", {}).get("string_value", "classification"),
            )
        return self._tasks[task]

    def _inputs(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list:
        def tensor(name: str, values: Sequence[str]):
            array = np.array(
                [[v.encode("utf-8") if isinstance(v, str) else bytes(v)] for v in values], dtype=np.object_
            )
            t = self._module.InferInput(name, list(array.shape), "BYTES")  # (B, 1)
            t.set_data_from_numpy(array)
            return t

        return [tensor(TEXT, texts)] + ([tensor(TEXT_PAIR, pairs)] if pairs is not None else [])

    def _infer(self, task: str, info: TaskInfo, texts: Sequence[str], pairs: Sequence[str] | None) -> list[Prediction]:
        regression = info.task_type == "regression"
        outputs = [self._module.InferRequestedOutput(n) for n in ((SCORE,) if regression else (LABEL, PROBABILITIES))]
        kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self._call(self._client.infer, task, self._inputs(texts, pairs), outputs=outputs, **kwargs)
        except InferenceServerException as exc:
            busy = any(m in str(exc.message()) for m in OVERLOAD_MARKERS)
            raise (ServerBusyError if busy else RequestError)(f"task {task!r}: {exc.message()}") from exc
        if regression:
            return [Prediction(f"{float(s[0]):.4g}", {}, float(s[0])) for s in result.as_numpy(SCORE)]  # (B, 1)
        labels, probs = result.as_numpy(LABEL), result.as_numpy(PROBABILITIES)  # (B, 1), (B, C)
        return [
            Prediction(bytes(lab[0]).decode("utf-8"), dict(zip(info.labels, map(float, p))))
            for lab, p in zip(labels, probs)
        ]

    def classify(self, task: str, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Prediction]:
        """One Prediction per text, in order; sent in chunks of the task's max_batch_size."""
        info = self.task_info(task)
        if info.text_pair != (pairs is not None):
            raise ValueError(
                f"task {task!r} {'classifies text pairs: pass pairs=' if info.text_pair else 'takes single texts: drop pairs='}"
            )
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
        step = info.max_batch_size or len(texts) or 1
        predictions: list[Prediction] = []
        for i in range(0, len(texts), step):
            predictions += self._infer(task, info, texts[i : i + step], None if pairs is None else pairs[i : i + step])
        return predictions

    def is_ready(self) -> bool:
        try:
            return bool(self._call(self._client.is_server_ready))
        except ServingError:
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_examples(args) -> tuple[list[str], list[str] | None]:
    if args.texts:
        lines = args.texts
    elif args.file:
        with open(args.file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    elif not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    else:
        raise SystemExit("give texts as arguments, --file F, or pipe them on stdin (one per line)")
    lines = [line for line in lines if line.strip()]
    if args.pair_sep is None:
        return lines, None
    sep = args.pair_sep.encode().decode("unicode_escape")
    parts = [line.split(sep, 1) for line in lines]
    bad = [i for i, p in enumerate(parts) if len(p) != 2]
    if bad:
        raise SystemExit(f"line {bad[0] + 1} has no {args.pair_sep!r} separating text and pair")
    return [p[0] for p in parts], [p[1] for p in parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("texts", nargs="*", help="texts to classify (else --file, else stdin)")
    parser.add_argument("--task", required=True, help="served task (ensemble) name, e.g. sentiment")
    parser.add_argument("--url", help="server address host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--file", help="a UTF-8 file with one example per line")
    parser.add_argument("--pair-sep", help=r"split each example into text and pair at this separator (e.g. '\t')")
    parser.add_argument("--json", action="store_true", help="print one JSON object per example")
    args = parser.parse_args(argv)
    texts, pairs = _read_examples(args)
    try:
        with Client(args.url, args.protocol) as client:
            predictions = client.classify(args.task, texts, pairs)
    except (ServingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, ServerUnavailableError) else 4 if isinstance(e, UnknownTaskError) else 1
    for text, p in zip(texts, predictions):
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        **(
                            {"score": p.score}
                            if p.score is not None
                            else {"label": p.label, "probabilities": p.probabilities}
                        ),
                    }
                )
            )
        elif p.score is not None:
            print(f"score={p.score:.4f}\t{text}")
        else:
            probs = " ".join(f"{k}={v:.4f}" for k, v in p.probabilities.items())
            print(f"{p.label}\t{probs}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
