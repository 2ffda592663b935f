"""Helpers the Triton python-backend models share: read the config once, answer each request.

`pb_utils` (triton_python_backend_utils) exists only inside the backend's stub process, so the
models pass it in. Every request gets exactly one response; an exception while serving one request
becomes that request's TritonError and never reaches the other requests or the stub.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.io_spec import TRITON_DTYPES, TensorSpec
from serving.errors import InputError

_NUMPY_DTYPES = {v: k for k, v in TRITON_DTYPES.items()}  # "TYPE_FP32" -> "float32"


def tensor_specs(config: dict, key: str) -> tuple[TensorSpec, ...]:
    """The `input` or `output` list of a parsed model config as TensorSpecs (batch dim first)."""
    batch = (-1,) if int(config.get("max_batch_size", 0)) > 0 else ()
    return tuple(
        TensorSpec(t["name"], _NUMPY_DTYPES[t["data_type"]], batch + tuple(int(d) for d in t["dims"]))
        for t in config.get(key, [])
    )


def parameters(config: dict) -> dict[str, str]:
    """The config's `parameters` map as plain strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def version_dir(args: dict) -> Path:
    """The directory holding this model version's files (model.py and its data)."""
    return Path(args["model_repository"]) / args["model_version"]


def read_inputs(pb_utils, request, specs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """The request's input tensors by name; absent (optional) ones are left out."""
    feed = {}
    for spec in specs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:
            feed[spec.name] = tensor.as_numpy()
    return feed


def response(pb_utils, outputs: dict[str, np.ndarray]):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in outputs.items()]
    )


def error_response(pb_utils, exc: BaseException, model: str):
    """InputError -> INVALID_ARG with its message; anything else -> INTERNAL, traceback logged."""
    codes = getattr(pb_utils, "TritonError", None)
    if isinstance(exc, InputError):
        code, message = getattr(codes, "INVALID_ARG", None), f"{model}: {exc}"
    else:
        pb_utils.Logger.log_error(f"{model}: {traceback.format_exc()}")
        code, message = getattr(codes, "INTERNAL", None), f"{model}: internal error: {type(exc).__name__}: {exc}"
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def respond_each(pb_utils, requests, specs, handle: Callable[[dict], dict], model: str) -> list:
    """One response per request from `handle(inputs) -> outputs`, errors caught per request."""
    responses = []
    for request in requests:
        try:
            responses.append(response(pb_utils, handle(read_inputs(pb_utils, request, specs))))
        except Exception as exc:  # noqa: BLE001 - one bad request must not fail the others
            responses.append(error_response(pb_utils, exc, model))
    return responses


def respond_merged(
    pb_utils, requests, specs, check: Callable[[dict], None], run: Callable[[list[dict]], list[dict]], model: str
) -> list:
    """Check each request alone, run the valid ones together, answer every request in order.

    If the merged run fails, each valid request is run again alone, so that only the request
    that causes the failure gets an error.
    """
    responses: list = [None] * len(requests)
    valid: list[tuple[int, dict]] = []
    for i, request in enumerate(requests):
        try:
            feed = read_inputs(pb_utils, request, specs)
            check(feed)
            valid.append((i, feed))
        except Exception as exc:  # noqa: BLE001
            responses[i] = error_response(pb_utils, exc, model)
    try:
        results = run([feed for _, feed in valid])
    except Exception as exc:  # noqa: BLE001 - retried one by one below
        if len(valid) == 1:
            responses[valid[0][0]] = error_response(pb_utils, exc, model)
            return responses
        results = None
    for k, (i, feed) in enumerate(valid):
        try:
            responses[i] = response(pb_utils, results[k] if results is not None else run([feed])[0])
        except Exception as exc:  # noqa: BLE001 - a failing request fails alone
            responses[i] = error_response(pb_utils, exc, model)
    return responses
