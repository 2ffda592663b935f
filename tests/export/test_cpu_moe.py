"""Sparse CPU experts (export/cpu_moe.py) on a real MoEBlock exported by the project's dynamo exporter."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.cpu_graph import cpu_graph
from export.ort_session import make_session
from training.moe import FFNExperts, MoEBlock

pytestmark = pytest.mark.slow
DIM, BACKBONE_DIM, EXPERTS = 16, 24, 4


class MoEOnly(nn.Module):
    """One ISMoE block as a graph: x (B, T, D), salient (B, Db) -> y (B, T, D)."""

    def __init__(self, top_k: int):
        super().__init__()
        torch.manual_seed(0)
        self.block = MoEBlock(FFNExperts(DIM, 32, EXPERTS), DIM, BACKBONE_DIM, top_k)
        nn.init.normal_(self.block.router.weight, std=1.0)  # routing that varies by token

    def forward(self, x, salient, mask):
        return self.block(x, salient, mask)[0]


def _export(tmp_path, top_k: int):
    x, salient, mask = torch.randn(2, 5, DIM), torch.randn(2, BACKBONE_DIM), torch.ones(2, 5)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    path = tmp_path / f"moe_k{top_k}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            MoEOnly(top_k).eval(),
            (x, salient, mask),
            input_names=["x", "salient", "mask"],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch}, {0: batch, 1: seq}),
            dynamo=True,
        ).save(str(path))
    return path


def _feeds(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(batch, seq, DIM)).astype(np.float32),
        "salient": rng.normal(size=(batch, BACKBONE_DIM)).astype(np.float32),
        "mask": np.ones((batch, seq), np.float32),
    }


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_experts_replace_the_dense_combination_exactly(tmp_path, top_k):
    path = _export(tmp_path, top_k)
    model, changes = cpu_graph(onnx.load(str(path)), "exact")
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert changes["sparse_moe"] == 1 and "Einsum" not in ops
    assert ops["Gemm"] == 2 * EXPERTS and ops["ScatterND"] == EXPERTS  # two GEMMs and one scatter per expert
    dense, sparse = make_session(path, threads=1, runtime="qdq"), make_session(path, threads=1, runtime="exact")
    for batch, seq in ((3, 9), (1, 1), (8, 64)):
        feeds = _feeds(batch, seq)
        np.testing.assert_allclose(sparse.run(None, feeds)[0], dense.run(None, feeds)[0], rtol=1e-6, atol=1e-6)


def test_an_expert_no_token_chose_adds_nothing(tmp_path):
    """One token, top-1: three of the four experts get no rows, and the graph still answers."""
    path = _export(tmp_path, 1)
    dense, sparse = make_session(path, threads=1, runtime="qdq"), make_session(path, threads=1, runtime="int8")
    feeds = _feeds(1, 1, seed=3)
    np.testing.assert_allclose(sparse.run(None, feeds)[0], dense.run(None, feeds)[0], rtol=1e-6, atol=1e-6)


def test_graphs_without_experts_are_left_alone(tmp_path):
    linear = tmp_path / "linear.onnx"
    torch.onnx.export(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), dynamo=True).save(str(linear))
    before = [n.op_type for n in onnx.load(str(linear)).graph.node]
    model, changes = cpu_graph(onnx.load(str(linear)), "exact")
    assert changes["sparse_moe"] == 0 and [n.op_type for n in model.graph.node] == before
