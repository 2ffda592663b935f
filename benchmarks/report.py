"""What every benchmark's section of docs/BENCHMARKS.md shares: loading its JSON, and saying when it is absent.

Each producer (export_bench, serving_bench, soak, memory, gpu_inference, experiments.compare and
.ablation) owns its JSON schema and renders its own section with `summary(docs)`; run_all only
concatenates them, so a schema change is an error in its producer, not a silently skipped section.
"""

from __future__ import annotations

import json
from pathlib import Path


def absent(what: str, command: str) -> list[str]:
    """The sentence a report section shows when its input was not measured (never a made-up figure)."""
    return [f"Not measured in this run: no {what}. `{command}` produces it.", ""]


def load_json(path: Path) -> dict | None:
    """A JSON file, or None when it is absent; a corrupt file is an error, not an absent input."""
    return json.loads(path.read_text()) if path.is_file() else None
