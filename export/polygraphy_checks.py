"""Polygraphy as the parity and lint tool (docs/DESIGN.md section 5, "Checks").

Reference data is written in Polygraphy's own formats, so the real CLI reads it back:
inputs as the JSON `List[Dict[str, ndarray]]` that `--load-inputs` accepts (`polygraphy.json.save_json`),
outputs as a `polygraphy.comparator.RunResults` under runner name "pytorch" (`RunResults.save`),
which `--load-outputs` accepts.

What `polygraphy run --onnxrt` runs ONNX Runtime with (Polygraphy 0.53, `SessionFromOnnx`): a fresh
`SessionOptions` with intra_op = inter_op = number of usable CPUs, the providers from `--providers`
(default CPU), and graph optimization from `--graph-optimization-level` (default ORT_ENABLE_ALL).
There is no flag for session config entries, so `session.qdq_matmulnbits_accuracy_level` keeps ONNX
Runtime's default. At ORT_ENABLE_EXTENDED and above ORT fuses int8/int4 DequantizeLinear -> MatMul
into MatMulNBits, and with the default accuracy level that kernel quantizes activations to int8
(measured here: the same output as level 4, off by about 0.5-0.7% of the output range), not the
exact level 1 that export/ort_session.py uses for parity. ORT_ENABLE_BASIC does not fuse (DQ, then an
fp32 MatMul: as exact as level 1), so parity runs pass `--graph-optimization-level ORT_ENABLE_BASIC`
by default. To check ORT's default fast path, pass graph_optimization_level=None with an absolute
tolerance of about 1e-2 * max|output|: near-zero outputs make any rtol-only check fail.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

REFERENCE_RUNNER = "pytorch"
INPUTS_FILE = "reference_inputs.json"
OUTPUTS_FILE = "reference_outputs.json"
PARITY_OPT_LEVEL = "ORT_ENABLE_BASIC"  # no DQ->MatMulNBits fusion: exact, like accuracy level 1
_LAUNCHER = "import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; sys.exit(main())"


def save_reference_outputs(
    outputs: list[dict[str, np.ndarray]],
    inputs: list[dict[str, np.ndarray]],
    out_dir: str | Path,
    runner_name: str = REFERENCE_RUNNER,
) -> tuple[Path, Path]:
    """Write (inputs JSON for --load-inputs, RunResults JSON for --load-outputs); one dict per iteration."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    if len(outputs) != len(inputs) or not inputs:
        raise ValueError(f"need one output dict per input dict, got {len(inputs)} inputs, {len(outputs)} outputs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_path, outputs_path = out_dir / INPUTS_FILE, out_dir / OUTPUTS_FILE
    feeds = [{name: np.ascontiguousarray(arr) for name, arr in feed.items()} for feed in inputs]
    save_json(feeds, str(inputs_path), description="reference inputs")
    results = RunResults()
    results.add(
        [{name: np.ascontiguousarray(arr) for name, arr in out.items()} for out in outputs], runner_name=runner_name
    )
    results.save(str(outputs_path))
    return inputs_path, outputs_path


def polygraphy_command() -> list[str]:
    """The venv's `polygraphy` script next to sys.executable, else the same interpreter running its main()."""
    script = Path(sys.executable).parent / "polygraphy"
    return [str(script)] if script.is_file() else [sys.executable, "-c", _LAUNCHER]


def _tolerance_args(flag: str, tol: dict[str, float] | float) -> list[str]:
    """`--atol 1e-5` for one value; `--atol out0:1e-5 out1:1e-3` per output."""
    if isinstance(tol, dict):
        if not tol:
            raise ValueError(f"{flag}: empty tolerance dict")
        return [flag, *(f"{name}:{float(v)!r}" for name, v in tol.items())]
    return [flag, repr(float(tol))]


def _run_polygraphy(args: list[str], timeout_s: float) -> tuple[int, str, str]:
    cmd = polygraphy_command() + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    return proc.returncode, shlex.join(["polygraphy", *args]), proc.stdout + proc.stderr


def polygraphy_run_onnxrt(
    onnx_path: str | Path,
    inputs_json: str | Path,
    outputs_json: str | Path,
    atol: dict[str, float] | float,
    rtol: dict[str, float] | float,
    trt: bool = False,
    graph_optimization_level: str | None = PARITY_OPT_LEVEL,
    timeout_s: float = 600.0,
) -> dict:
    """Run `polygraphy run --onnxrt [--trt]` on the saved inputs and compare with the saved outputs.

    An element fails only when it exceeds both atol and rtol (rtol is relative to the saved outputs).
    Returns {"passed", "command", "log_tail", "returncode"}.
    """
    args = [
        "run",
        str(onnx_path),
        "--onnxrt",
        *(["--trt"] if trt else []),
        "--load-inputs",
        str(inputs_json),
        "--load-outputs",
        str(outputs_json),
        *_tolerance_args("--atol", atol),
        *_tolerance_args("--rtol", rtol),
    ]
    if graph_optimization_level:
        args += ["--graph-optimization-level", graph_optimization_level]
    rc, command, log = _run_polygraphy(args, timeout_s)
    return {"passed": rc == 0, "command": command, "log_tail": log[-4000:], "returncode": rc}


def polygraphy_lint(onnx_path: str | Path, report_path: str | Path | None = None, timeout_s: float = 600.0) -> dict:
    """`polygraphy check lint <model> -o report.json`, parsed: {"passed", "errors", "warnings", ...}.

    Lint entries of level "warning" are warnings; "error" and "exception" entries are errors.
    """
    onnx_path = Path(onnx_path)
    report = Path(report_path) if report_path else onnx_path.with_suffix(".lint.json")
    report.unlink(missing_ok=True)
    rc, command, log = _run_polygraphy(["check", "lint", str(onnx_path), "-o", str(report)], timeout_s)
    if not report.is_file():
        raise RuntimeError(f"`{command}` wrote no report (exit {rc}):\n{log[-4000:]}")
    entries = json.loads(report.read_text()).get("lint_entries", [])
    errors = [e for e in entries if e.get("level") != "warning"]
    warnings = [e for e in entries if e.get("level") == "warning"]
    return {
        "passed": rc == 0 and not errors,
        "errors": errors,
        "warnings": warnings,
        "report": str(report),
        "command": command,
        "returncode": rc,
    }
