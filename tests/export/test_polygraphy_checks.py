"""export/polygraphy_checks.py: the real `polygraphy run` / `polygraphy check lint` CLI on tiny graphs.

The reference outputs are exact float64 numpy values (what PyTorch gives for these graphs), saved in
Polygraphy's own formats under the runner name "pytorch".
"""

import numpy as np
import pytest
from polygraphy.comparator import RunResults
from polygraphy.json import load_json

from export.polygraphy_checks import (
    REFERENCE_RUNNER,
    _tolerance_args,
    polygraphy_lint,
    polygraphy_run_onnxrt,
    save_reference_outputs,
)
from tests import onnx_fixtures as fx


@pytest.fixture(scope="module")
def linear_case(tmp_path_factory):
    """int8_linear graph + two iterations of inputs + exact outputs, saved for polygraphy."""
    d = tmp_path_factory.mktemp("pg_linear")
    q, s = fx.int8_weight()
    rng = np.random.default_rng(0)
    inputs = [{"x": rng.standard_normal((b, fx.K)).astype(np.float32)} for b in (3, 5)]
    outputs = [{"y": fx.reference_linear(feed["x"], q, s)} for feed in inputs]
    model = fx.save(fx.int8_linear(), d, "linear")
    inputs_json, outputs_json = save_reference_outputs(outputs, inputs, d / "ref")
    return model, inputs_json, outputs_json, inputs, outputs, d


def test_saved_in_polygraphy_formats(linear_case):
    _, inputs_json, outputs_json, inputs, outputs, _ = linear_case
    loaded_inputs = load_json(str(inputs_json))
    assert len(loaded_inputs) == 2 and np.array_equal(loaded_inputs[1]["x"], inputs[1]["x"])
    results = RunResults.load(str(outputs_json))
    assert list(results.keys()) == [REFERENCE_RUNNER]
    assert np.array_equal(results[REFERENCE_RUNNER][0]["y"], outputs[0]["y"])


def test_save_rejects_mismatched_iterations(tmp_path):
    with pytest.raises(ValueError, match="one output dict per input dict"):
        save_reference_outputs([{"y": np.zeros(1)}], [], tmp_path)


def test_tolerance_args():
    assert _tolerance_args("--atol", 1e-5) == ["--atol", "1e-05"]
    assert _tolerance_args("--rtol", {"y": 0.01, "z": 1}) == ["--rtol", "y:0.01", "z:1.0"]


def test_run_passes_on_matching_outputs(linear_case):
    model, inputs_json, outputs_json, *_ = linear_case
    result = polygraphy_run_onnxrt(model, inputs_json, outputs_json, atol={"y": 1e-4}, rtol={"y": 1e-4})
    assert result["passed"], result["log_tail"]
    assert result["command"].startswith("polygraphy run ") and "--onnxrt" in result["command"]
    assert "--atol y:0.0001" in result["command"] and "--graph-optimization-level ORT_ENABLE_BASIC" in result["command"]


def test_run_fails_on_perturbed_outputs(linear_case):
    model, inputs_json, _, inputs, outputs, d = linear_case
    perturbed = [{"y": out["y"].copy()} for out in outputs]
    perturbed[1]["y"][2, 7] += 0.5  # one element, far beyond 1e-4 absolute and relative
    _, bad_outputs = save_reference_outputs(perturbed, inputs, d / "perturbed")
    result = polygraphy_run_onnxrt(model, inputs_json, bad_outputs, atol=1e-4, rtol=1e-4)
    assert not result["passed"] and result["returncode"] != 0
    assert "FAILED" in result["log_tail"]


def test_default_ort_session_is_not_exact_for_int8_weights(linear_case):
    """Without --graph-optimization-level, ORT fuses DQ->MatMul into MatMulNBits at its default accuracy
    level (int8 activations): ~0.7% of the output range, so parity needs atol ~1e-2 * max|y|."""
    model, inputs_json, outputs_json, _, outputs, _ = linear_case
    tight = polygraphy_run_onnxrt(model, inputs_json, outputs_json, 1e-4, 1e-4, graph_optimization_level=None)
    assert not tight["passed"]
    scale = max(float(np.abs(o["y"]).max()) for o in outputs)
    loose = polygraphy_run_onnxrt(model, inputs_json, outputs_json, 2e-2 * scale, 0.0, graph_optimization_level=None)
    assert loose["passed"], loose["log_tail"]


def test_lint_passes_on_a_good_model(tmp_path):
    report = polygraphy_lint(fx.save(fx.int8_linear(), tmp_path, "good"))
    assert report["passed"] and report["errors"] == []
    assert report["report"].endswith("good.lint.json")


@pytest.mark.parametrize(
    "build,words,node",
    [
        (fx.dangling_input, "missing", None),
        (fx.wrong_input_type, "tensor(int64)", "add_wrong_type"),
    ],
    ids=["dangling-input", "wrong-type"],
)
def test_lint_reports_errors_on_broken_models(tmp_path, build, words, node):
    report = polygraphy_lint(fx.save(build(), tmp_path, "broken"), report_path=tmp_path / "lint.json")
    assert not report["passed"] and report["returncode"] != 0
    assert any(words in e["message"] for e in report["errors"]), report["errors"]
    if node:
        assert any(node in e.get("nodes", []) for e in report["errors"])
