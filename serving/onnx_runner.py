"""One ONNX Runtime session serving a list of requests in one run: pad, concatenate, run, split.

Triton's dynamic batcher hands a python model several requests at once. Their sequence lengths
differ, so each request is zero-padded along its sequence axis to the longest one (attention_mask
0 marks the padding, exactly as the tokenizer pads within a request), the batch is run once, and
each output is cut back to its request's rows and length. The sequence axis of a tensor is its one
dynamic non-batch dimension in the I/O spec (T in (B, T) and (B, K, T, D)); a tensor has at most one.

Each request is checked alone before merging (`InputLimits`): token ids inside the vocabulary,
token types inside the type vocabulary, a 0/1 attention mask with a token to attend to, a sequence
length in [1, max_length], finite floats. ONNX Runtime would answer an id past the vocabulary with an
internal error for the whole merged batch and wrap a negative id around silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.io_spec import TensorSpec
from export.ort_session import EXACT_ACCURACY_LEVEL, make_session
from serving.errors import InputError


def sequence_axis(spec: TensorSpec) -> int | None:
    """Index of the dynamic non-batch dimension of `spec`, or None if all of them are fixed."""
    axes = [i for i, d in enumerate(spec.shape) if i > 0 and d == -1]
    if len(axes) > 1:
        raise ValueError(
            f"{spec.name} {spec.shape} has {len(axes)} dynamic non-batch dims; at most one (the sequence) is supported"
        )
    return axes[0] if axes else None


def check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    """Raise InputError unless `array` has the spec's dtype, rank and fixed dims."""
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(f"{spec.name} must be {spec.dtype}, got {array.dtype}")
    if array.ndim != len(spec.shape) or any(d not in (-1, n) for d, n in zip(spec.shape, array.shape)):
        raise InputError(f"{spec.name} must have shape {spec.shape} (-1 = any), got {tuple(array.shape)}")


@dataclass(frozen=True)
class InputLimits:
    """What a direct caller may send, from the export (io_spec.json, its tokenizer); None = unchecked."""

    max_length: int | None = None
    vocab_size: int | None = None
    type_vocab_size: int | None = None

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> InputLimits:
        """The limits repository.py writes into the model config's parameters."""
        return cls(
            *(int(params[k]) if params.get(k) else None for k in ("max_length", "vocab_size", "type_vocab_size"))
        )


def _check_range(name: str, array: np.ndarray, high: int | None, what: str) -> None:
    """InputError naming the first value outside [0, high)."""
    bad = (array < 0) | (array >= high) if high is not None else array < 0
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        bound = f"[0, {high})" if high is not None else ">= 0"
        raise InputError(f"{name}{list(where)} = {int(array[where])} is outside {bound}: {what}")


def check_values(feed: dict[str, np.ndarray], limits: InputLimits) -> None:
    """Raise InputError for ids, types, masks or floats the graph must not see (one request)."""
    if "input_ids" in feed:
        _check_range("input_ids", feed["input_ids"], limits.vocab_size, "token ids index the vocabulary")
    if "token_type_ids" in feed:
        _check_range(
            "token_type_ids", feed["token_type_ids"], limits.type_vocab_size, "token types index the type vocabulary"
        )
    mask = feed.get("attention_mask")
    if mask is not None:
        _check_range("attention_mask", mask, 2, "the mask is 1 for a token and 0 for padding")
        empty = np.flatnonzero(mask.max(axis=-1, initial=0) == 0)
        if empty.size:
            raise InputError(f"attention_mask row {int(empty[0])} has no 1: every sequence must attend to a token")
    for name, array in feed.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError(f"{name} contains NaN or infinity")


def _pad_to(array: np.ndarray, axis: int | None, length: int) -> np.ndarray:
    if axis is None or array.shape[axis] == length:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - array.shape[axis])
    return np.pad(array, widths)


class OnnxRunner:
    """Validate, merge and run per-request feeds on one session; outputs come back per request."""

    def __init__(
        self,
        path: str | Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        threads: int | None = None,
        accuracy_level: int = EXACT_ACCURACY_LEVEL,
        limits: InputLimits = InputLimits(),
        runtime: str = "exact",
    ):
        self.limits = limits
        self.session = make_session(path, threads=threads or None, accuracy_level=accuracy_level, runtime=runtime)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [t.name for t in self.inputs if t.name not in graph_inputs] + [
            t.name for t in self.outputs if t.name not in graph_outputs
        ]
        if missing:
            raise ValueError(
                f"{path} has no tensors named {missing} (graph inputs {sorted(graph_inputs)}, outputs {sorted(graph_outputs)})"
            )
        self._in_axes = {t.name: sequence_axis(t) for t in self.inputs}
        self._out_axes = {t.name: sequence_axis(t) for t in self.outputs}

    def _seq_len(self, feed: dict[str, np.ndarray]) -> int | None:
        """The request's sequence length; every tensor with a sequence axis must agree on it."""
        lengths = {name: feed[name].shape[axis] for name, axis in self._in_axes.items() if axis is not None}
        if len(set(lengths.values())) > 1:
            raise InputError(f"inputs disagree on the sequence length: {lengths}")
        return next(iter(lengths.values()), None)

    def check(self, feed: dict[str, np.ndarray]) -> None:
        for spec in self.inputs:
            if spec.name not in feed:
                raise InputError(f"input {spec.name} is missing")
            check_tensor(spec, feed[spec.name])
        sizes = {feed[s.name].shape[0] for s in self.inputs}
        if len(sizes) > 1:
            raise InputError(f"inputs disagree on the batch size: {sorted(sizes)}")
        if 0 in sizes:
            raise InputError("the batch is empty (batch size 0)")
        length, most = self._seq_len(feed), self.limits.max_length
        if length is not None and not 1 <= length <= (most or length):
            raise InputError(
                f"sequence length {length} is outside [1, {most}]: the model serves up to max_length={most} "
                "tokens (io_spec.json); truncate longer sequences, as the tokenizer model does"
            )
        check_values(feed, self.limits)

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Run already-checked feeds as one batch; return each feed's outputs."""
        if not feeds:
            return []
        if len(feeds) == 1:
            return [
                dict(zip((o.name for o in self.outputs), self.session.run([o.name for o in self.outputs], feeds[0])))
            ]
        lengths = [self._seq_len(f) for f in feeds]
        longest = max((n for n in lengths if n is not None), default=None)
        merged = {
            s.name: np.concatenate([_pad_to(f[s.name], self._in_axes[s.name], longest) for f in feeds])
            for s in self.inputs
        }
        results = self.session.run([o.name for o in self.outputs], merged)
        rows = np.cumsum([0] + [f[self.inputs[0].name].shape[0] for f in feeds])
        return [
            {
                o.name: self._cut(r, self._out_axes[o.name], rows[i], rows[i + 1], lengths[i])
                for o, r in zip(self.outputs, results)
            }
            for i in range(len(feeds))
        ]

    @staticmethod
    def _cut(array: np.ndarray, axis: int | None, start: int, stop: int, length: int | None) -> np.ndarray:
        part = array[start:stop]
        if axis is not None and length is not None:
            part = np.take(part, np.arange(length), axis=axis)
        return np.ascontiguousarray(part)
