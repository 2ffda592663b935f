"""Validate a generated model repository before Triton sees it.

Each `config.pbtxt` is re-parsed into `model_config_pb2.ModelConfig` (a misspelled or unknown
field is an error naming the model and the field), checked for the files its backend needs, and
every ensemble's wiring is checked: each step's model exists, each step input is produced by the
ensemble's inputs or an earlier step with the same dtype and compatible dims, every required input
of a step is fed, and every ensemble output is produced.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import RepositoryError

CONFIG_FILE = "config.pbtxt"


def parse_config(path: str | Path) -> mc.ModelConfig:
    """Parse one config.pbtxt; RepositoryError names the model and the offending field."""
    path = Path(path)
    model = path.parent.name
    try:
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"model {model!r}: {path} does not parse as a Triton ModelConfig: {e}") from None
    if config.name != model:
        raise RepositoryError(f"model {model!r}: field 'name' is {config.name!r}, it must equal the directory name")
    return config


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def _check_model(directory: Path, config: mc.ModelConfig) -> None:
    name = config.name
    if not (config.backend or config.platform):
        raise RepositoryError(f"model {name!r}: neither field 'backend' nor 'platform' is set")
    if config.max_batch_size < 0:
        raise RepositoryError(f"model {name!r}: field 'max_batch_size' is negative")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for t in tensors:
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise RepositoryError(
                    f"model {name!r}: {kind} {t.name!r} field 'dims' {list(t.dims)} must be non-empty, -1 or > 0"
                )
            if t.data_type == mc.TYPE_INVALID:
                raise RepositoryError(f"model {name!r}: {kind} {t.name!r} field 'data_type' is not set")
    if config.platform == "ensemble":
        return
    version = directory / "1"
    expected = "model.py" if config.backend == "python" else (config.default_model_filename or "model.plan")
    if config.platform == "tensorrt_plan":
        files = list(config.cc_model_filenames.values()) or [expected]
        if not any((version / f).is_file() for f in files):
            return  # engines are added on the GPU machine; repository.py writes a note saying so
    elif not (version / expected).is_file():
        raise RepositoryError(f"model {name!r}: {version / expected} is missing")


def _compatible(a, b) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b))


def _tensor(dtype: int, dims, batch: bool) -> tuple:
    """What must agree between a producer and a consumer: (dtype, dims without batch, batched)."""
    return (dtype, tuple(dims), batch)


def _check_step(where: str, step, target: mc.ModelConfig, available: dict[str, tuple]) -> None:
    """One ensemble step: every mapped input exists and matches, every required input is fed."""
    inputs = {t.name: t for t in target.input}
    batched = target.max_batch_size > 0
    for model_tensor, ens_tensor in step.input_map.items():
        if model_tensor not in inputs:
            raise RepositoryError(
                f"{where}: input_map key {model_tensor!r} is not an input of {step.model_name} ({sorted(inputs)})"
            )
        if ens_tensor not in available:
            raise RepositoryError(
                f"{where}: input_map value {ens_tensor!r} is produced by no earlier step and is no ensemble input"
            )
        want, got = _tensor(inputs[model_tensor].data_type, inputs[model_tensor].dims, batched), available[ens_tensor]
        if want[0] != got[0] or not _compatible(want[1], got[1]) or want[2] != got[2]:
            raise RepositoryError(
                f"{where}: input {model_tensor!r} is {_dtype(want[0])} {list(want[1])}, "
                f"but {ens_tensor!r} is {_dtype(got[0])} {list(got[1])}"
            )
    missing = [t for t in inputs if t not in step.input_map and not inputs[t].optional]
    if missing:
        raise RepositoryError(f"{where}: field 'input_map' does not feed the required inputs {missing}")
    outputs = {t.name: t for t in target.output}
    for model_tensor, ens_tensor in step.output_map.items():
        if model_tensor not in outputs:
            raise RepositoryError(
                f"{where}: output_map key {model_tensor!r} is not an output of {step.model_name} ({sorted(outputs)})"
            )
        available[ens_tensor] = _tensor(outputs[model_tensor].data_type, outputs[model_tensor].dims, batched)


def check_ensemble(config: mc.ModelConfig, models: dict[str, mc.ModelConfig]) -> None:
    """Refuse an ensemble whose steps do not connect, naming the ensemble, step and tensor."""
    name, batched = config.name, config.max_batch_size > 0
    available = {t.name: _tensor(t.data_type, t.dims, batched) for t in config.input}
    if not config.ensemble_scheduling.step:
        raise RepositoryError(f"ensemble {name!r}: field 'ensemble_scheduling' has no steps")
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"ensemble {name!r} step {i} ({step.model_name})"
        target = models.get(step.model_name)
        if target is None:
            raise RepositoryError(f"{where}: field 'model_name' names a model that is not in the repository")
        if batched and config.max_batch_size > target.max_batch_size:
            raise RepositoryError(
                f"{where}: max_batch_size {target.max_batch_size} is below the ensemble's {config.max_batch_size}"
            )
        _check_step(where, step, target, available)
    for t in config.output:
        got = available.get(t.name)
        if got is None:
            raise RepositoryError(f"ensemble {name!r}: output {t.name!r} is produced by no step")
        if got[0] != t.data_type or not _compatible(got[1], t.dims):
            raise RepositoryError(
                f"ensemble {name!r}: output {t.name!r} is declared {_dtype(t.data_type)} {list(t.dims)}, "
                f"the step produces {_dtype(got[0])} {list(got[1])}"
            )


def validate_repository(root: str | Path) -> dict[str, mc.ModelConfig]:
    """Parse and check every model under `root`; return the configs by model name."""
    root = Path(root)
    models = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise RepositoryError(f"model {directory.name!r}: {path} is missing")
        models[directory.name] = parse_config(path)
        _check_model(directory, models[directory.name])
    for config in models.values():
        if config.platform == "ensemble":
            check_ensemble(config, models)
    return models
