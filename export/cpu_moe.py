"""The adapter's top-k experts run sparsely on CPU: each token through the experts its gate chose.

The exported adapter combines experts densely (`training.moe`, Mixtral's advice for export): every
expert runs on every token, an Einsum weights them by a gate that is zero outside the top k. That
is static-shaped, what TensorRT wants, but on CPU it is k/N useful work: at batch 32 x 128 tokens
the dense experts were ~2/3 of the adapter's time. `sparse_experts` rewrites each
`Einsum("btn,btnd->btd", gate, experts(x))` into, per expert e,

    rows = NonZero(gate[:, e]); y[rows] += gate[rows, e] * FFN_e(x[rows])

with the expert's own weights as 2-D Gemms. The gate is the graph's own (whatever routing made it),
so the choice of experts, their weights and the arithmetic per row are the dense graph's: the
outputs matched it exactly on the default export. ONNX Runtime's com.microsoft MoE op was tried
first: slower than the dense graph here (413 vs 338 ms) and its GELU is the tanh approximation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import GraphIndex

EQUATION = "btn,btnd->btd"  # gate (B, T, N) x expert outputs (B, T, N, D) -> (B, T, D)


def _const_behind(g: GraphIndex, name: str) -> np.ndarray:
    """An initializer, or one behind an Unsqueeze (how the dynamo export broadcasts the expert biases)."""
    value = g.const(name)
    if value is None:
        value = g.const(g.made_by(name, "Unsqueeze").input[0])
    if value is None:
        raise LookupError(f"{name} is not constant")
    return value


def _dense_experts(g: GraphIndex, einsum: onnx.NodeProto) -> dict:
    """x and the stacked weights behind `Transpose(Reshape(Gemm2(Gelu(Gemm1(Expand(Reshape(x)))))))`."""
    reshape = g.made_by(g.made_by(einsum.input[1], "Transpose").input[0], "Reshape")
    add2 = g.made_by(reshape.input[0], "Add")
    mm2 = g.made_by(add2.input[0], "MatMul")
    gelu = g.made_by(mm2.input[0], "Gelu")
    add1 = g.made_by(gelu.input[0], "Add")
    mm1 = g.made_by(add1.input[0], "MatMul")
    x = g.made_by(g.made_by(mm1.input[0], "Expand").input[0], "Reshape").input[0]
    w1, w2 = g.const(mm1.input[1]), g.const(mm2.input[1])  # (N, D, F), (N, F, D)
    if w1 is None or w2 is None or w1.ndim != 3 or w2.shape != w1.shape[:1] + w1.shape[2:0:-1]:
        raise LookupError("expert weights are not constant (N, D, F) and (N, F, D)")
    n, d, f = w1.shape
    b1 = _const_behind(g, add1.input[1]).reshape(n, f)
    b2 = _const_behind(g, add2.input[1]).reshape(n, d)
    gelu_attrs = {a.name: helper.get_attribute_value(a) for a in gelu.attribute}
    return dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, gelu=gelu_attrs)


def _expert_nodes(g: GraphIndex, name: str, e: int, ex: dict, gate: str, x: str, acc: str, out: str) -> list:
    """y[rows] += gate[rows, e] * FFN_e(x[rows]) for the rows whose gate for expert e is nonzero."""
    p = f"{name}_e{e}"
    return [
        helper.make_node("Gather", [gate, g.add_const(p + "_index", np.array(e, np.int64))], [p + "_gate"], axis=1),
        helper.make_node("NonZero", [p + "_gate"], [p + "_nz"]),  # (1, n_e)
        helper.make_node("Transpose", [p + "_nz"], [p + "_rows2"], perm=[1, 0]),  # (n_e, 1): ScatterND indices
        helper.make_node("Squeeze", [p + "_rows2", name + "_axis1"], [p + "_rows"]),  # (n_e,)
        helper.make_node("Gather", [x, p + "_rows"], [p + "_x"], axis=0),  # (n_e, D)
        helper.make_node(
            "Gemm", [p + "_x", g.add_const(p + "_w1", ex["w1"][e]), g.add_const(p + "_b1", ex["b1"][e])], [p + "_h0"]
        ),  # (n_e, F)
        helper.make_node("Gelu", [p + "_h0"], [p + "_h"], **ex["gelu"]),
        helper.make_node(
            "Gemm", [p + "_h", g.add_const(p + "_w2", ex["w2"][e]), g.add_const(p + "_b2", ex["b2"][e])], [p + "_y0"]
        ),  # (n_e, D)
        helper.make_node("Gather", [p + "_gate", p + "_rows"], [p + "_w"], axis=0),  # (n_e,)
        helper.make_node("Unsqueeze", [p + "_w", name + "_axis1"], [p + "_w2d"]),  # (n_e, 1)
        helper.make_node("Mul", [p + "_y0", p + "_w2d"], [p + "_y"]),  # (n_e, D)
        helper.make_node("ScatterND", [acc, p + "_rows2", p + "_y"], [out], reduction="add"),  # (BT, D)
    ]


def sparse_experts(g: GraphIndex) -> int:
    """Rewrite every dense top-k combination in `g`; returns how many."""
    rewritten = 0
    for einsum in [n for n in g.graph.node if n.op_type == "Einsum"]:
        equation = next((a.s.decode() for a in einsum.attribute if a.name == "equation"), "")
        if equation.replace(" ", "") != EQUATION:
            continue
        try:
            ex = _dense_experts(g, einsum)
        except (LookupError, KeyError):
            continue
        n, d, _ = ex["w1"].shape
        name = f"cpu_moe_{rewritten}"
        g.add_const(name + "_axis1", np.array([1], np.int64))
        x2, gate2 = name + "_x", name + "_gate"
        nodes = [
            helper.make_node("Reshape", [ex["x"], g.add_const(name + "_xs", np.array([-1, d], np.int64))], [x2]),
            helper.make_node(
                "Reshape", [einsum.input[0], g.add_const(name + "_gs", np.array([-1, n], np.int64))], [gate2]
            ),  # (BT, N)
            helper.make_node("Shape", [x2], [name + "_x_shape"]),
            helper.make_node(
                "ConstantOfShape",
                [name + "_x_shape"],
                [name + "_acc"],
                value=numpy_helper.from_array(np.zeros(1, ex["w1"].dtype)),
            ),
        ]
        acc = name + "_acc"  # (BT, D) zeros, then each expert's rows added in
        for e in range(n):
            nodes += _expert_nodes(g, name, e, ex, gate2, x2, acc, f"{name}_acc{e}")
            acc = f"{name}_acc{e}"
        nodes += [
            helper.make_node("Shape", [ex["x"]], [name + "_shape"]),
            helper.make_node("Reshape", [acc, name + "_shape"], [einsum.output[0]]),  # (B, T, D)
        ]
        for i, node in enumerate(nodes):
            node.name = f"{name}_{i}"
        g.replace([einsum], nodes)
        rewritten += 1
    return rewritten
