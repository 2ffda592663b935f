"""ServeConfig: how the model repository batches, replicates, bounds and warms up its models.

max_queue_delay_us defaults to 0: on CPU the models are busy enough under load that requests
queue up and are merged anyway, while any delay is paid in full at low load (measured with
benchmarks/serving_bench.py on the test export: 2000 us tripled p50 at concurrency 1 and lowered
throughput at concurrency 16). On GPU, raise it to fill larger batches.

Bounds: every component model has a queue policy (at most max_queue_size requests wait,
each at most queue_timeout_us, then Triton REJECTs it with "Request timeout expired" or "Exceeds
maximum queue size"), and a text longer than max_text_bytes UTF-8 bytes is rejected, not truncated:
the model reads only max_length tokens, so megabytes of text are a client error, and cutting bytes
could silently change the answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from export.cpu_graph import RUNTIMES
from export.ort_session import EXACT_ACCURACY_LEVEL
from training.config import ConfigError

TARGETS = ("cpu", "gpu")


def _opt(default, help: str):
    """A field with its --help text (serving/cli.py builds its flags from these)."""
    return field(default=default, metadata={"help": help})


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ServeConfig:
    """Options for `model_repository/` generation; checks itself on construction."""

    target: str = _opt("cpu", "cpu: python-backend models running ONNX Runtime | gpu: tensorrt_plan engines")
    max_batch_size: int = _opt(32, "largest batch per request and per dynamic batch, for every model and the ensemble")
    max_queue_delay_us: int = _opt(
        0,
        "how long the dynamic batcher of backbone/adapter waits to fill a batch (us); "
        "0 merges only what queued while the model was busy",
    )
    preferred_batch_sizes: tuple[int, ...] = _opt((), "dynamic-batcher target sizes, each <= max_batch_size")
    tokenizer_instances: int = _opt(1, "tokenizer model instances (processes)")
    backbone_instances: int = _opt(1, "backbone model instances (each holds its own ONNX Runtime session / engine)")
    adapter_instances: int = _opt(1, "instances of each adapter_<task> model")
    postprocess_instances: int = _opt(1, "instances of each postprocess_<task> model")
    ort_threads: int = _opt(0, "ONNX Runtime intra-op threads per session (0 = ONNX Runtime's default, all cores)")
    accuracy_level: int = _opt(
        EXACT_ACCURACY_LEVEL, "MatMulNBits accuracy level: 1 exact (default), 4 faster, int8 activations"
    )
    cpu_runtime: str = _opt(
        "auto",
        "graph ONNX Runtime runs (export/cpu_graph.py): auto (each export's parity.json served_runtime: int8 "
        "where its accuracy gate passed, else exact) | int8 (int8 GEMMs, calibrated activations) | exact "
        "(int8 weights folded to float once at load, equal to the checkpoint) | qdq (the exported graph as is)",
    )
    warmup: bool = _opt(True, "Triton model_warmup on every non-ensemble model before the server reports ready")
    warmup_seq_len: int = _opt(16, "sequence length of the backbone/adapter warmup batch")
    max_queue_size: int = _opt(128, "requests that may wait in each model's queue; more are rejected at once")
    queue_timeout_us: int = _opt(2_000_000, "longest wait in each model's queue (us) before the request is rejected")
    allow_timeout_override: bool = _opt(True, "clients may ask for a shorter queue timeout per request")
    max_text_bytes: int = _opt(65536, "longest text (and text_pair) in UTF-8 bytes; longer ones are rejected (400)")

    def __post_init__(self):
        self.preferred_batch_sizes = tuple(self.preferred_batch_sizes)
        _check(self.target in TARGETS, "serve.target", f"must be one of {list(TARGETS)}, got {self.target!r}")
        _check(
            1 <= self.max_batch_size <= 4096, "serve.max_batch_size", f"must be in [1, 4096], got {self.max_batch_size}"
        )
        _check(
            0 <= self.max_queue_delay_us <= 10_000_000,
            "serve.max_queue_delay_us",
            f"must be in [0, 10 s] (microseconds), got {self.max_queue_delay_us}",
        )
        for b in self.preferred_batch_sizes:
            _check(
                1 <= b <= self.max_batch_size,
                "serve.preferred_batch_sizes",
                f"{b} is not in [1, max_batch_size={self.max_batch_size}]",
            )
        for kind in ("tokenizer", "backbone", "adapter", "postprocess"):
            n = getattr(self, f"{kind}_instances")
            _check(1 <= n <= 64, f"serve.{kind}_instances", f"must be in [1, 64], got {n}")
        _check(self.ort_threads >= 0, "serve.ort_threads", f"must be >= 0 (0 = default), got {self.ort_threads}")
        _check(
            self.accuracy_level in (0, 1, 2, 3, 4), "serve.accuracy_level", f"must be 0-4, got {self.accuracy_level}"
        )
        _check(
            self.cpu_runtime in ("auto", *RUNTIMES),
            "serve.cpu_runtime",
            f"must be auto or one of {list(RUNTIMES)}, got {self.cpu_runtime!r}",
        )
        _check(self.warmup_seq_len >= 2, "serve.warmup_seq_len", f"must be >= 2, got {self.warmup_seq_len}")
        _check(
            1 <= self.max_queue_size <= 100_000,
            "serve.max_queue_size",
            f"must be in [1, 100000], got {self.max_queue_size}",
        )
        _check(
            1000 <= self.queue_timeout_us <= 600_000_000,
            "serve.queue_timeout_us",
            f"must be in [1 ms, 600 s] (microseconds), got {self.queue_timeout_us}",
        )
        _check(
            16 <= self.max_text_bytes <= 64 * 2**20,
            "serve.max_text_bytes",
            f"must be in [16, 64 MiB], got {self.max_text_bytes}",
        )

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["ServeConfig", "ConfigError", "TARGETS"]
