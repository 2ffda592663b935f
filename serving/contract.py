"""What the serving stage adds to the export's I/O spec: text in, label out, and the model names.

The backbone and adapter tensors come from `export/io_spec.py` unchanged. The ensemble's own
inputs (`text`, `text_pair`) and outputs (`label`, `probabilities`) are defined here once, and the
config generator, the python models and the client all read them from here.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from export.io_spec import IOSpec, TensorSpec

TEXT = "text"
TEXT_PAIR = "text_pair"
LABEL = "label"
PROBABILITIES = "probabilities"

TOKENIZER = "tokenizer"
BACKBONE = "backbone"
_ADAPTER, _POSTPROCESS = "adapter_", "postprocess_"
_RESERVED = (TOKENIZER, BACKBONE, _ADAPTER, _POSTPROCESS)
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_-]+")
log = logging.getLogger(__name__)


def check_task_name(task: str) -> str:
    """A task names a Triton model: letters, digits, `_`, `-`; not one of the component names."""
    if not _TASK_NAME.match(task):
        raise ValueError(f"task name {task!r} is not a valid model name: use letters, digits, '_' or '-', starting with a letter")
    if any(task == r or task.startswith(r) for r in _RESERVED):
        raise ValueError(f"task name {task!r} collides with the component models {list(_RESERVED)}; rename the task")
    return task


def task_name_from_file(path: str | Path) -> str:
    """The task name for a user data file: its stem, made a valid name (a logged note says how).

    Training calls this before it starts, so `my reviews.csv` trains the task `my_reviews` rather
    than a run that `make serve` refuses an hour later.
    """
    stem = Path(path).stem
    name = _INVALID_RUN.sub("_", stem).strip("_-")
    if not name[:1].isalpha() or any(name == r or name.startswith(r) for r in _RESERVED):
        name = f"task_{name}".rstrip("_")
    name = name[:64].rstrip("_-")
    check_task_name(name)
    if name != stem:
        log.warning("data file %s: %r is not a valid task name (letters, digits, '_' or '-', starting with a letter, "
                    "not a component name); the task is named %r", path, stem, name)
    return name


def adapter_model(task: str) -> str:
    return _ADAPTER + task


def postprocess_model(task: str) -> str:
    return _POSTPROCESS + task


def backbone_model(task: str, shared: bool) -> str:
    return BACKBONE if shared else f"{BACKBONE}_{task}"


def tokenizer_model(task: str, shared: bool) -> str:
    return TOKENIZER if shared else f"{TOKENIZER}_{task}"


def task_of_postprocess(model: str) -> str | None:
    """`postprocess_<task>` -> task; how a client tells tasks from components in the repository index."""
    return model[len(_POSTPROCESS):] if model.startswith(_POSTPROCESS) else None


def text_inputs(spec: IOSpec) -> tuple[TensorSpec, ...]:
    """The ensemble's (and tokenizer's) inputs: one UTF-8 string per example, (B, 1)."""
    names = (TEXT, TEXT_PAIR) if spec.text_pair else (TEXT,)
    return tuple(TensorSpec(n, "bytes", (-1, 1)) for n in names)


def prediction_outputs(spec: IOSpec) -> tuple[TensorSpec, ...]:
    """The ensemble's (and postprocess's) outputs: the label (B, 1) and softmax probabilities (B, C)."""
    logits = spec.adapter.outputs[0]
    return (TensorSpec(LABEL, "bytes", (-1, 1)),
            TensorSpec(PROBABILITIES, "float32", logits.shape))
