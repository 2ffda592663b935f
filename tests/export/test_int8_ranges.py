"""Calibrated activation ranges (export/int8_ranges.py) and the static int8 CPU graph built from them."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from export.cpu_graph import RANGES_KEY, activation_ranges, cpu_graph, int8_linear_inputs
from export.int8_ranges import calibrate, store
from export.onnx_export import external_data_file
from export.ort_session import make_session
from tests.export.conftest import backbone_feeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibrated(backbone, tmp_path_factory):  # noqa: F811
    """A copy of the tiny backbone with ranges from a few random batches."""
    path = tmp_path_factory.mktemp("ranges") / "backbone.onnx"
    shutil.copy(backbone, path)
    shutil.copy(external_data_file(backbone), external_data_file(path))
    session = make_session(path, threads=1)
    ranges = calibrate(path, [backbone_feeds(session, batch=8, seq=16, seed=s) for s in range(3)], threads=1)
    store(path, ranges)
    return path, ranges


def test_ranges_cover_every_int8_linear_input_and_live_in_metadata(calibrated):
    path, ranges = calibrated
    model = onnx.load(str(path))
    assert set(ranges) == set(int8_linear_inputs(model)) and activation_ranges(model) == ranges
    assert all(lo < hi for lo, hi in ranges.values())
    assert sum(p.key == RANGES_KEY for p in model.metadata_props) == 1


def test_storing_ranges_leaves_the_weights_alone(backbone, calibrated):  # noqa: F811
    path, _ = calibrated
    assert external_data_file(path).read_bytes() == external_data_file(backbone).read_bytes()
    feeds = backbone_feeds(make_session(backbone, threads=1))
    for a, b in zip(make_session(backbone, threads=1).run(None, feeds), make_session(path, threads=1).run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_static_int8_graph_is_close_and_independent_of_the_batch(calibrated):
    path, _ = calibrated
    model, changes = cpu_graph(onnx.load(str(path)), "int8")
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulIntegerToFloat", "QuantizeLinear"} <= ops and "MatMulNBits" not in ops
    exact, int8 = make_session(path, threads=1, runtime="exact"), make_session(path, threads=1, runtime="int8")
    feeds = backbone_feeds(exact, batch=4)
    want, together = exact.run(None, feeds), int8.run(None, feeds)
    for w, t in zip(want, together):
        assert 0 < np.abs(t - w).max() < 0.25 * np.abs(w).max()
    for row in range(4):  # fixed ranges: what the dynamic batcher merges cannot change a row's answer
        alone = int8.run(None, {k: v[row : row + 1] for k, v in feeds.items()})
        for a, t in zip(alone, together):
            np.testing.assert_allclose(a[0], t[row], atol=1e-5 * np.abs(t).max())
