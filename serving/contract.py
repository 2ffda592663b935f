"""What the serving stage adds to the export's I/O spec: text in, label out, and the model names.

The backbone and adapter tensors come from `export/io_spec.py` unchanged. The ensemble's own
inputs (`text`, `text_pair`) and outputs (`label`, `probabilities`) are defined here once, and the
config generator, the python models and the client all read them from here.
"""

from __future__ import annotations

from contracts.task_names import (  # noqa: F401 (re-exported)
    ADAPTER_PREFIX,
    BACKBONE,
    POSTPROCESS_PREFIX,
    TOKENIZER,
    check_task_name,
    task_name_from_file,
)
from export.io_spec import IOSpec, TensorSpec

TEXT = "text"
TEXT_PAIR = "text_pair"
LABEL = "label"
PROBABILITIES = "probabilities"
SCORE = "score"  # regression tasks: one number per example instead of label + probabilities

_ADAPTER, _POSTPROCESS = ADAPTER_PREFIX, POSTPROCESS_PREFIX


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
    return model[len(_POSTPROCESS) :] if model.startswith(_POSTPROCESS) else None


def text_inputs(spec: IOSpec) -> tuple[TensorSpec, ...]:
    """The ensemble's (and tokenizer's) inputs: one UTF-8 string per example, (B, 1)."""
    names = (TEXT, TEXT_PAIR) if spec.text_pair else (TEXT,)
    return tuple(TensorSpec(n, "bytes", (-1, 1)) for n in names)


def prediction_outputs(spec: IOSpec) -> tuple[TensorSpec, ...]:
    """The ensemble's (and postprocess's) outputs: the label (B, 1) and softmax probabilities (B, C),
    or for a regression task the score (B, 1)."""
    logits = spec.adapter.outputs[0]
    if spec.task_type == "regression":
        return (TensorSpec(SCORE, "float32", (-1, 1)),)
    return (TensorSpec(LABEL, "bytes", (-1, 1)), TensorSpec(PROBABILITIES, "float32", logits.shape))
