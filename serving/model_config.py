"""Triton model configs as `model_config_pb2.ModelConfig` messages, built from the I/O spec only.

One builder per model kind (tokenizer, ONNX Runtime python model, TensorRT plan, postprocess,
ensemble). Names, dtypes and shapes come from `export/io_spec.py` and `serving/contract.py`; the
batch dimension is implicit (max_batch_size > 0), so config dims are the spec's shape without it.
"""

from __future__ import annotations

import json

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.io_spec import IOSpec, ModelIO, TensorSpec
from serving.config import ServeConfig
from serving.contract import prediction_outputs, text_inputs

PYTHON_MODEL_FILE = "model.py"
PLAN_FILE = "model.plan"
WARMUP_DIR = "warmup"
WARMUP_TEXT = "A short warmup sentence."


def _dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:])  # batch dim is implicit


def _dynamic_non_batch(spec: TensorSpec) -> bool:
    return any(d == -1 for d in spec.shape[1:])


def _add_io(config: mc.ModelConfig, io: ModelIO | tuple, ragged: bool = False) -> None:
    inputs, outputs = (io.inputs, io.outputs) if isinstance(io, ModelIO) else io
    for s in inputs:
        config.input.add(
            name=s.name, data_type=s.triton_dtype, dims=_dims(s), allow_ragged_batch=ragged and _dynamic_non_batch(s)
        )
    for s in outputs:
        config.output.add(name=s.name, data_type=s.triton_dtype, dims=_dims(s))


def _base(name: str, cfg: ServeConfig, instances: int, kind: int = mc.ModelInstanceGroup.KIND_CPU) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=cfg.max_batch_size)
    config.instance_group.add(kind=kind, count=instances)
    return config


def _python(config: mc.ModelConfig, params: dict[str, object]) -> mc.ModelConfig:
    config.backend = "python"
    for k, v in params.items():
        config.parameters[k].string_value = str(v)
    return config


def _dynamic_batching(config: mc.ModelConfig, cfg: ServeConfig, merge: bool = True) -> None:
    """A dynamic batcher with a bounded queue: overload is a clear rejection, not unbounded latency.

    `merge=False` (tokenizer, postprocess) keeps the queue policy without waiting to fill batches.
    """
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = cfg.max_queue_delay_us if merge else 0
    if merge:
        batching.preferred_batch_size.extend(cfg.preferred_batch_sizes)
    policy = batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = cfg.queue_timeout_us
    policy.allow_timeout_override = cfg.allow_timeout_override
    policy.max_queue_size = cfg.max_queue_size


def _warmup(
    config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], cfg: ServeConfig, files: dict[str, str] | None = None
) -> None:
    """One batch-1 warmup request: zeros of length warmup_seq_len, or a file's data for strings."""
    if not cfg.warmup:
        return
    warmup = config.model_warmup.add(name="warmup", batch_size=1, count=1)
    for s in inputs:
        entry = warmup.inputs[s.name]
        entry.data_type = s.triton_dtype
        entry.dims.extend(cfg.warmup_seq_len if d == -1 else d for d in _dims(s))
        if files and s.name in files:
            entry.input_data_file = files[s.name]
        else:
            entry.zero_data = True


def warmup_files(spec: IOSpec) -> dict[str, bytes]:
    """TYPE_STRING warmup data (4-byte little-endian length + UTF-8 bytes per element)."""
    data = WARMUP_TEXT.encode()
    return {s.name: len(data).to_bytes(4, "little") + data for s in text_inputs(spec)}


def graph_warmup_files(io: ModelIO, cfg: ServeConfig) -> dict[str, bytes]:
    """An attention_mask of ones (int64): the models refuse an all-padding sequence, warmup included."""
    return {s.name: np.ones(cfg.warmup_seq_len, np.int64).tobytes() for s in io.inputs if s.name == "attention_mask"}


def tokenizer_config(name: str, spec: IOSpec, cfg: ServeConfig, tokenizer_dir: str) -> mc.ModelConfig:
    config = _python(
        _base(name, cfg, cfg.tokenizer_instances),
        {"tokenizer_dir": tokenizer_dir, "max_length": spec.max_length, "max_text_bytes": cfg.max_text_bytes},
    )
    _add_io(config, (text_inputs(spec), spec.backbone.inputs))
    _dynamic_batching(config, cfg, merge=False)
    _warmup(config, text_inputs(spec), cfg, {s.name: s.name for s in text_inputs(spec)})
    return config


def onnx_python_config(
    name: str,
    io: ModelIO,
    cfg: ServeConfig,
    instances: int,
    onnx_file: str,
    limits: dict[str, int] | None = None,
    runtime: str = "exact",
) -> mc.ModelConfig:
    """CPU target: a python-backend model that runs `onnx_file` with ONNX Runtime, rewritten for `runtime`.

    `limits` (max_length, vocab_size, type_vocab_size) bound what a direct caller may send.
    """
    params = {
        "onnx_file": onnx_file,
        "threads": cfg.ort_threads,
        "accuracy_level": cfg.accuracy_level,
        "runtime": runtime,
    }
    config = _python(_base(name, cfg, instances), {**params, **(limits or {})})
    _add_io(config, io, ragged=True)  # the python model pads requests of different lengths itself
    _dynamic_batching(config, cfg)
    _warmup(config, io.inputs, cfg, {n: n for n in graph_warmup_files(io, cfg)})
    return config


def tensorrt_config(
    name: str, io: ModelIO, cfg: ServeConfig, instances: int, cc_files: dict[str, str]
) -> mc.ModelConfig:
    """GPU target (NGC Triton container): a TensorRT plan; cc_files maps "9.0" -> engine file."""
    config = _base(name, cfg, instances, mc.ModelInstanceGroup.KIND_GPU)
    config.platform = "tensorrt_plan"
    config.default_model_filename = PLAN_FILE
    for cc, filename in cc_files.items():
        config.cc_model_filenames[cc] = filename
    _add_io(config, io)
    _dynamic_batching(config, cfg)
    _warmup(config, io.inputs, cfg, {n: n for n in graph_warmup_files(io, cfg)})
    return config


def postprocess_config(name: str, spec: IOSpec, cfg: ServeConfig) -> mc.ModelConfig:
    config = _python(
        _base(name, cfg, cfg.postprocess_instances),
        {"labels": json.dumps(list(spec.labels)), "task_type": spec.task_type},
    )
    _add_io(config, (spec.adapter.outputs, prediction_outputs(spec)))
    _dynamic_batching(config, cfg, merge=False)
    _warmup(config, spec.adapter.outputs, cfg)
    return config


def _step(config: mc.ModelConfig, model: str, inputs, outputs) -> None:
    step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for s in inputs:
        step.input_map[s.name] = s.name  # model tensor -> ensemble tensor of the same name
    for s in outputs:
        step.output_map[s.name] = s.name


def ensemble_config(
    spec: IOSpec, cfg: ServeConfig, tokenizer: str, backbone: str, adapter: str, postprocess: str
) -> mc.ModelConfig:
    """The task's ensemble: tokenizer -> backbone -> adapter -> postprocess."""
    config = mc.ModelConfig(name=spec.task, platform="ensemble", max_batch_size=cfg.max_batch_size)
    _add_io(config, (text_inputs(spec), prediction_outputs(spec)))
    _step(config, tokenizer, text_inputs(spec), spec.backbone.inputs)
    _step(config, backbone, spec.backbone.inputs, spec.backbone.outputs)
    _step(config, adapter, spec.adapter.inputs, spec.adapter.outputs)
    _step(config, postprocess, spec.adapter.outputs, prediction_outputs(spec))
    return config


def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)
