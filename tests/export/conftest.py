"""Fixtures shared by the export tests: the session's tiny trained run and its exported graphs."""

from __future__ import annotations

import numpy as np
import pytest

from export.onnx_export import export_adapter, export_backbone
from export.pipeline import io_spec_for
from tests.training.test_trainer import trained_tiny_run
from training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_csv):
    """The session's tiny trained run: (model, int8-weight I/O spec, a fresh directory)."""
    run, _ = trained_tiny_run(tmp_path_factory, toy_csv)
    model, _, meta, _ = load_checkpoint(run / "checkpoint")
    return model, io_spec_for(meta, "int8-weight"), tmp_path_factory.mktemp("cpu_graph")


@pytest.fixture(scope="module")
def backbone(tiny):
    """Its int8-weight backbone.onnx."""
    model, spec, out = tiny
    return export_backbone(model, spec.backbone, out / "backbone.onnx")


@pytest.fixture(scope="module")
def adapter(tiny):
    """Its adapter.onnx: the side network with top-k experts."""
    model, spec, out = tiny
    return export_adapter(model, spec.adapter, out / "adapter.onnx")


def backbone_feeds(session, batch=3, seq=12, seed=0):
    """Random token ids for `session`'s inputs, row 1 half padded."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq // 2 :] = 0  # a padded row: attention must keep ignoring padding
    feeds = {"input_ids": rng.integers(5, 200, (batch, seq)), "attention_mask": mask}
    names = {i.name for i in session.get_inputs()}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feeds
