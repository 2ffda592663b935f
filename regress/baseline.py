"""The regression baseline file: format-checked on read, written atomically (a crash never leaves half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

BASELINE_FILE = "baseline.json"
BASELINE_FORMAT = 1


class RegressError(RuntimeError):
    """A usage or verification problem (not a regression): one line naming the file."""


def load_baseline(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegressError(f"{path} is not valid JSON ({e}); fix it or rewrite it with --update") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT or not isinstance(data.get("metrics"), dict):
        raise RegressError(
            f"{path} is not a format-{BASELINE_FORMAT} regression baseline (no 'metrics'); rewrite it with --update"
        )
    return data


def write_baseline(path: Path, figs, tolerances: dict, command: str) -> None:
    """Write the baseline through a temporary file in the same directory, then rename it into place."""
    data = {
        "format": BASELINE_FORMAT,
        "command": command,
        "environment": figs.info.get("environment"),
        "tolerances": tolerances,
        "metrics": figs.metrics,
        "info": {k: v for k, v in figs.info.items() if k != "environment"},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
