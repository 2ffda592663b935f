"""The graph ONNX Runtime serves on CPU, rewritten at load from the exported (TensorRT-facing) graph.

The exported `backbone.onnx` is what TensorRT needs: symmetric int8 DequantizeLinear -> MatMul plus
an exact rank-1 zero-point correction (`export.qdq`). ONNX Runtime's CPU kernels run that pattern
slowly (the weights are dequantized on every call, the correction is three more ops per linear,
and the dynamo attention gets no fusion). The file on disk stays as exported (int8); at session
creation one of these rewrites builds the graph actually run:

- `exact`: each int8 linear becomes one MatMul on float weights s * (q - z) computed once
  (the trained function, rounding only);
- `int8`: each int8 linear's input is quantized by QuantizeLinear with the range calibrated at
  export (`export.int8_ranges`, in the model metadata) and the linear becomes com.microsoft
  MatMulIntegerToFloat on the trained codes, z - 128 as a per-column zero point (so the weights are
  exactly the trained ones), the bias folded in: int8 GEMM kernels (VNNI, AMX) run, at an accuracy
  cost the export's parity gate measures. Fixed ranges, not per call: a request's answer does not
  depend on what the dynamic batcher merged into its batch (DynamicQuantizeMatMul's per-tensor
  scale would; it changed hidden states by up to 1.1 between a row alone and in a batch). A graph
  without ranges (an older export) gets MatMulNBits (bits 8, accuracy level 4: per-row activation
  quantization, also batch-independent, but no faster than float GEMMs on the machine measured).
  In a w8a8 graph the linears already carry Q/DQ (ONNX Runtime fuses them into int8 GEMMs); its
  attention's Q/DQ pairs are dropped (`_float_attention`): CPU has no int8 attention kernel, and
  float attention fuses (hidden states as far from the trained function as with int8 attention:
  mean |difference| 0.096 against 0.097 on the default export);
- both: MatMul-Softmax-MatMul attention becomes com.microsoft MultiHeadAttention, and the
  adapter's dense top-k experts run sparsely, each token through its k experts only
  (`export.cpu_moe`, exact).
`qdq` runs the exported graph unchanged. The parity gate runs each rewrite it may serve
(`export.pipeline`), so what is served is what was checked. Rewrites that find nothing to rewrite
(an fp32 adapter's linears, a w8a8 graph's linear Q/DQ) leave those parts as they are.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .cpu_moe import sparse_experts

RUNTIMES = ("qdq", "exact", "int8")
INT8_ACCURACY_LEVEL = 4  # MatMulNBits: quantize A to int8 per row and block of K, run int8 GEMMs
RANGES_KEY = "mp_ismoe.int8_activation_ranges"  # model metadata: {linear input: [min, max]} (export.int8_ranges)
MS_DOMAIN = "com.microsoft"


class _Graph:
    """Lookups over one graph: initializers, producers, consumers."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def made_by(self, name: str, op: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type != op:
            raise LookupError(f"{name} is not made by {op}")
        return node

    def add_const(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        """Put `new` (in order) where the last of `old` was (their inputs exist by then) and drop `old`."""
        at = max(list(self.graph.node).index(n) for n in old)
        for node in reversed(new):
            self.graph.node.insert(at, node)
        for n in old:
            self.graph.node.remove(n)


def _int8_linears(g: _Graph) -> list[dict]:
    """Every `MatMul(x, DQ(q', s)) + ReduceSum(x) * corr [+ bias]` of `export.qdq.SymmetricInt8Linear`."""
    found = []
    for add in [n for n in g.graph.node if n.op_type == "Add"]:
        try:
            mm = next(g.producer[i] for i in add.input if i in g.producer and g.producer[i].op_type == "MatMul")
            mul = next(g.producer[i] for i in add.input if i in g.producer and g.producer[i].op_type == "Mul")
            dq = g.made_by(mm.input[1], "DequantizeLinear")
            corr = next(i for i in mul.input if i in g.inits)
            reduce = g.made_by(next(i for i in mul.input if i != corr), "ReduceSum")
        except (StopIteration, LookupError):
            continue
        q, s = g.const(dq.input[0]), g.const(dq.input[1])
        if reduce.input[0] != mm.input[0] or q is None or s is None or q.ndim != 2 or len(dq.input) > 2:
            continue
        nodes, out, bias = [add, mm, mul, dq], add.output[0], None
        (user, *more) = g.users.get(out, [None])
        if user is not None and not more and user.op_type == "Add":
            b = next((g.const(i) for i in user.input if i in g.inits), None)
            if b is not None and b.shape == (q.shape[1],):
                nodes, out, bias = nodes + [user], user.output[0], b.astype(np.float32)
        s, corr = s.astype(np.float32), g.const(corr).astype(np.float32)
        found.append(
            dict(
                nodes=nodes,
                out=out,
                x=mm.input[0],
                q=q,  # (in, out) int8 q' = q - 128
                s=s,  # (out,)
                corr=corr,  # (out,) s * (128 - z)
                zero_point=np.rint(-corr / s).astype(np.int8),  # (out,) z - 128, so s * (q' - zp) = s * (q - z)
                bias=np.zeros(q.shape[1], np.float32) if bias is None else bias,  # (out,)
            )
        )
    return found


def activation_ranges(model: onnx.ModelProto) -> dict[str, list[float]]:
    """Calibrated [min, max] of each int8 linear's input, stored in the model's metadata at export."""
    raw = next((p.value for p in model.metadata_props if p.key == RANGES_KEY), None)
    return json.loads(raw) if raw else {}


def int8_linear_inputs(model: onnx.ModelProto) -> list[str]:
    """The tensors the int8 linears read (what calibration records), each once, in graph order."""
    return list(dict.fromkeys(lin["x"] for lin in _int8_linears(_Graph(model))))


def _exact_linear(g: _Graph, name: str, lin: dict) -> list[onnx.NodeProto]:
    """MatMul on the float weights s * (q - z), computed once, then the bias."""
    w = lin["q"].astype(np.float32) * lin["s"] + lin["corr"]  # (in, out)
    return [
        helper.make_node("MatMul", [lin["x"], g.add_const(name + "_w", w)], [name + "_y"], name=name),
        helper.make_node("Add", [name + "_y", g.add_const(name + "_b", lin["bias"])], [lin["out"]], name=name + "_b"),
    ]


def _static_int8(
    g: _Graph, name: str, lin: dict, lo: float, hi: float, quantized: dict[str, list[str]]
) -> list[onnx.NodeProto]:
    """QuantizeLinear(x) with the calibrated range (once per x) -> MatMulIntegerToFloat on the trained codes.

    Activations: asymmetric uint8 over [min(lo, 0), max(hi, 0)]; weights: q' = q - 128 (int8) with
    z - 128 as a per-column zero point, so s * (q' - (z - 128)) = s * (q - z), the trained weight.
    """
    x = lin["x"]
    if x not in quantized:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = np.float32(max(hi - lo, 1e-8) / 255.0)
        zero = np.uint8(np.clip(np.rint(-lo / scale), 0, 255))
        a_scale, a_zero = g.add_const(name + "_a_scale", np.array(scale)), g.add_const(name + "_a_zp", np.array(zero))
        made_at = next((i for i, n in enumerate(g.graph.node) if x in n.output), -1)  # -1: a graph input
        g.graph.node.insert(
            made_at + 1,
            helper.make_node("QuantizeLinear", [x, a_scale, a_zero], [name + "_xq"], name=name + "_quantize"),
        )
        quantized[x] = [name + "_xq", a_scale, a_zero]
    xq, a_scale, a_zero = quantized[x]
    inputs = [xq, g.add_const(name + "_q", lin["q"]), a_scale, g.add_const(name + "_s", lin["s"]), a_zero]
    inputs += [g.add_const(name + "_zp", lin["zero_point"]), g.add_const(name + "_b", lin["bias"])]
    return [helper.make_node("MatMulIntegerToFloat", inputs, [lin["out"]], name=name, domain=MS_DOMAIN)]


def _nbits_int8(g: _Graph, name: str, lin: dict) -> list[onnx.NodeProto]:
    """MatMulNBits (bits 8) on the trained uint8 codes q and zero points z, one scale per row over its blocks."""
    k, n = lin["q"].shape
    block = next(b for b in (128, 64, 32, 16, k) if k % b == 0)
    blocks = k // block
    codes = (lin["q"].astype(np.int16) + 128).astype(np.uint8).T  # (out, in): q
    zero_point = (lin["zero_point"].astype(np.int16) + 128).astype(np.uint8)  # (out,): z
    inputs = [
        lin["x"],
        g.add_const(name + "_q", codes.reshape(n, blocks, block)),  # (N, blocks, bytes per block)
        g.add_const(name + "_s", np.repeat(lin["s"], blocks)),  # (N * blocks,) every block of a row shares s
        g.add_const(name + "_zp", np.repeat(zero_point[:, None], blocks, 1)),  # (N, blocks)
        "",  # g_idx
        g.add_const(name + "_b", lin["bias"]),
    ]
    attrs = dict(K=k, N=n, bits=8, block_size=block, accuracy_level=INT8_ACCURACY_LEVEL)
    return [helper.make_node("MatMulNBits", inputs, [lin["out"]], name=name, domain=MS_DOMAIN, **attrs)]


def _rewrite_linears(g: _Graph, runtime: str) -> int:
    linears, ranges, quantized = _int8_linears(g), activation_ranges(g.model), {}
    for i, lin in enumerate(linears):
        name = f"cpu_linear_{i}"
        if runtime == "exact":
            new = _exact_linear(g, name, lin)
        elif lin["x"] in ranges:  # calibrated at export: static int8 activations, the fast QGEMM kernels
            new = _static_int8(g, name, lin, *ranges[lin["x"]], quantized)
        else:
            new = _nbits_int8(g, name, lin)
        g.replace(lin["nodes"], new)
    return len(linears)


def _perm(node: onnx.NodeProto) -> list[int]:
    return list(next(a.ints for a in node.attribute if a.name == "perm"))


def _heads_input(g: _Graph, transpose: onnx.NodeProto, perm: list[int]) -> tuple[str, int | None, int]:
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


def _float_attention(g: _Graph) -> int:
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


def _fuse_attention(g: _Graph) -> int:
    """softmax(q k^T * scale + bias) v over heads -> MultiHeadAttention(q, k, v, attention_bias=bias)."""
    fused = 0
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
        mha = helper.make_node(
            "MultiHeadAttention",
            [q, k, v, "", "", bias],  # query, key, value, bias, key_padding_mask, attention_bias (B|1, 1, T, T)
            [out_r.output[0]],
            name=softmax.name + "_mha",
            domain=MS_DOMAIN,
            num_heads=heads,
            scale=scale,
        )
        g.replace([out_r], [mha])
        fused += 1
    return fused


def _width(g: _Graph, name: str) -> int:
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


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def cpu_graph(model: onnx.ModelProto, runtime: str) -> tuple[onnx.ModelProto, dict]:
    """Rewrite `model` (loaded with its weights) in place for `runtime`; returns it and what changed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "qdq":
        return model, {"runtime": runtime}
    linears = _rewrite_linears(_Graph(model), runtime)
    float_attention = _float_attention(_Graph(model)) if runtime == "int8" else 0
    _prune(model)  # the Q/DQ pairs float attention left unread
    attention = _fuse_attention(_Graph(model))
    experts = sparse_experts(_Graph(model))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _prune(model)
    changes = {"int8_linears": linears, "float_attention_matmuls": float_attention, "attention_fused": attention}
    return model, {"runtime": runtime, **changes, "sparse_moe": experts}
