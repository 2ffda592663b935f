"""Task names: a task is served as a Triton model named after it, so the rule for a valid name lives
here, where training (which names a task from its data file before it starts) and serving both read it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

TOKENIZER = "tokenizer"
BACKBONE = "backbone"
ADAPTER_PREFIX, POSTPROCESS_PREFIX = "adapter_", "postprocess_"  # serving's component model names
_RESERVED = (TOKENIZER, BACKBONE, ADAPTER_PREFIX, POSTPROCESS_PREFIX)
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9_-]+")
log = logging.getLogger(__name__)


def check_task_name(task: str) -> str:
    """A task names a Triton model: letters, digits, `_`, `-`; not one of the component names."""
    if not _TASK_NAME.match(task):
        raise ValueError(
            f"task name {task!r} is not a valid model name: use letters, digits, '_' or '-', starting with a letter"
        )
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
        log.warning(
            "data file %s: %r is not a valid task name (letters, digits, '_' or '-', starting with a letter, "
            "not a component name); the task is named %r",
            path,
            stem,
            name,
        )
    return name
