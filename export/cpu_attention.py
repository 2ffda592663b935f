"""Attention in the CPU graphs: the dynamo export's MatMul-Softmax-MatMul becomes com.microsoft
MultiHeadAttention, and w8a8's quantized attention runs in float.

Where the attention bias is nothing but the padding mask (encoders: measured by running the bias's
own subgraph on a probe, `padding_mask_input`), the fused attention takes the (B, T) mask as its
key padding mask instead of the (B, 1, T, T) bias: same result (difference 0.0), and ONNX Runtime's
CPU kernel then ran a batch-32 x 128 layer in 41 ms instead of 62 (one thread). A bias that holds
more than padding (relative positions, causal masks) stays an attention bias.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .onnx_graph import MS_DOMAIN, GraphIndex, prune

MASK_INPUT = "attention_mask"  # the graph input holding 1 for tokens, 0 for padding, (B, T)
MASK_INT32 = MASK_INPUT + "_int32"
MASKED_BELOW = -1e4  # a bias at or below this at padded keys masks them (the export uses the dtype's min)


def _perm(node: onnx.NodeProto) -> list[int]:
    return list(next(a.ints for a in node.attribute if a.name == "perm"))


def _heads_input(g: GraphIndex, transpose: onnx.NodeProto, perm: list[int]) -> tuple[str, int | None, int]:
    """(B, T, D) tensor behind Reshape(-> (B, T, H, d)) -> Transpose(perm), H where constant, and d."""
    if _perm(transpose) != perm:
        raise LookupError("not a head transpose")
    reshape = g.made_by(transpose.input[0], "Reshape")
    concat = g.made_by(reshape.input[1], "Concat")
    head_dim = g.const(concat.input[-1])
    if head_dim is None or head_dim.reshape(-1)[0] <= 0:
        raise LookupError("head size not constant")
    heads = g.const(concat.input[-2]) if len(concat.input) >= 4 else None
    heads = int(heads.reshape(-1)[0]) if heads is not None and heads.reshape(-1)[0] > 0 else None
    return reshape.input[0], heads, int(head_dim.reshape(-1)[0])


def float_attention(g: GraphIndex) -> int:
    """MatMuls between two quantized activations (w8a8's attention) read the float tensors instead.

    The w8a8 graph quantizes q, k, v and the softmax for TensorRT's int8 attention. ONNX Runtime's
    CPU kernels have no int8 attention, and with the Q/DQ pairs in place the attention cannot fuse.
    """
    rewired = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        try:
            sources = [
                g.made_by(g.made_by(i, "DequantizeLinear").input[0], "QuantizeLinear").input[0] for i in mm.input
            ]
        except LookupError:
            continue
        if any(s in g.inits for s in sources):  # a weight: a linear layer, left to the int8 kernels
            continue
        mm.input[:] = sources
        rewired += 1
    return rewired


def _probe_feeds(model: onnx.ModelProto, mask: np.ndarray) -> dict:
    """Inputs for the graph: `mask` as the attention mask, ones of the same shape for every other input."""
    feeds = {}
    for i in model.graph.input:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = mask.astype(dtype) if i.name == MASK_INPUT else np.full(mask.shape, 1, dtype)
    return feeds


def padding_mask_input(model: onnx.ModelProto, bias: str) -> str | None:
    """MASK_INPUT when `bias` is its padding mask and nothing else (0 at tokens, masked at padding, the
    same for every query and head), measured on a probe with padding at different places; else None."""
    inputs = {i.name: i for i in model.graph.input}
    if MASK_INPUT not in inputs or len(inputs[MASK_INPUT].type.tensor_type.shape.dim) != 2:
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(bias, onnx.TensorProto.FLOAT, None))
    prune(probe)  # the mask's own few ops, no weights
    mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]])
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        (value,) = session.run(None, _probe_feeds(probe, mask))
    except Exception:  # noqa: BLE001 - any failure means: keep the bias
        return None
    value = np.broadcast_to(value, (3, value.shape[1], 8, 8))  # (B, H|1, T, T)
    keys = np.broadcast_to(mask[:, None, None, :].astype(bool), value.shape)
    return MASK_INPUT if np.all(value[keys] == 0) and np.all(value[~keys] <= MASKED_BELOW) else None


def fuse_attention(g: GraphIndex) -> int:
    """softmax(q k^T * scale + bias) v over heads -> MultiHeadAttention(q, k, v, padding mask or bias)."""
    fused, padding = 0, {}  # bias -> MASK_INPUT or None
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        try:
            add = g.made_by(softmax.input[0], "Add")
            mul = next(g.producer[i] for i in add.input if i in g.producer and g.producer[i].op_type == "Mul")
            bias = next(i for i in add.input if i != mul.output[0])
            scale_name = next(i for i in mul.input if i in g.inits)
            qk = g.made_by(next(i for i in mul.input if i != scale_name), "MatMul")
            q, heads, head_dim = _heads_input(g, g.made_by(qk.input[0], "Transpose"), [0, 2, 1, 3])
            k, _, _ = _heads_input(g, g.made_by(qk.input[1], "Transpose"), [0, 2, 3, 1])
            (av,) = g.users[softmax.output[0]]
            v, _, _ = _heads_input(g, g.made_by(av.input[1], "Transpose"), [0, 2, 1, 3])
            (out_t,) = g.users[av.output[0]]
            (out_r,) = g.users[out_t.output[0]]
            heads = heads or _width(g, q) // head_dim
        except (StopIteration, LookupError, ValueError):
            continue
        if av.op_type != "MatMul" or out_t.op_type != "Transpose" or _perm(out_t) != [0, 2, 1, 3]:
            continue
        if out_r.op_type != "Reshape" or heads < 1:
            continue
        scale = float(g.const(scale_name).reshape(-1)[0])
        if bias not in padding:
            padding[bias] = padding_mask_input(g.model, bias)
        if padding[bias] and MASK_INT32 not in g.producer:  # once: MultiHeadAttention takes an int32 mask
            cast = helper.make_node("Cast", [MASK_INPUT], [MASK_INT32], to=onnx.TensorProto.INT32)
            g.graph.node.insert(0, cast)
            g.producer[MASK_INT32] = cast
        masks = [MASK_INT32, ""] if padding[bias] else ["", bias]  # key padding (B, T), or bias (B|1, H|1, T, T)
        inputs = [q, k, v, "", *masks]  # query, key, value, bias, key_padding_mask, attention_bias
        mha = helper.make_node(
            "MultiHeadAttention",
            inputs[:5] if not inputs[5] else inputs,
            [out_r.output[0]],
            name=softmax.name + "_mha",
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=scale,
        )
        g.replace([out_r], [mha])
        fused += 1
    return fused


def _width(g: GraphIndex, name: str) -> int:
    """Output width of the linear that made `name` (its weight's last axis)."""
    node = g.producer[name]
    if node.op_type == "Add":  # an unfused bias: its length (w8a8's q, k, v come from one split GEMM)
        bias = next((g.const(i) for i in node.input if i in g.inits), None)
        if bias is not None and bias.ndim == 1:
            return int(bias.shape[0])
        node = next(g.producer[i] for i in node.input if i in g.producer)
    if node.op_type == "MatMulNBits":
        return int(next(a.i for a in node.attribute if a.name == "N"))
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or w.ndim != 2:
        raise LookupError(f"cannot tell the width of {name}")
    return int(w.shape[1])
