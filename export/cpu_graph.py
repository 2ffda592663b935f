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
from onnx import helper

from .cpu_attention import float_attention, fuse_attention
from .cpu_moe import sparse_experts
from .cpu_taps import batched_taps
from .onnx_graph import MS_DOMAIN, GraphIndex, prune

RUNTIMES = ("qdq", "exact", "int8")
INT8_ACCURACY_LEVEL = 4  # MatMulNBits: quantize A to int8 per row and block of K, run int8 GEMMs
RANGES_KEY = "mp_ismoe.int8_activation_ranges"  # model metadata: {linear input: [min, max]} (export.int8_ranges)


def _int8_linears(g: GraphIndex) -> list[dict]:
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
    return list(dict.fromkeys(lin["x"] for lin in _int8_linears(GraphIndex(model))))


def _exact_linear(g: GraphIndex, name: str, lin: dict) -> list[onnx.NodeProto]:
    """MatMul on the float weights s * (q - z), computed once, then the bias."""
    w = lin["q"].astype(np.float32) * lin["s"] + lin["corr"]  # (in, out)
    return [
        helper.make_node("MatMul", [lin["x"], g.add_const(name + "_w", w)], [name + "_y"], name=name),
        helper.make_node("Add", [name + "_y", g.add_const(name + "_b", lin["bias"])], [lin["out"]], name=name + "_b"),
    ]


def _static_int8(
    g: GraphIndex, name: str, lin: dict, lo: float, hi: float, quantized: dict[str, list[str]]
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


def _nbits_int8(g: GraphIndex, name: str, lin: dict) -> list[onnx.NodeProto]:
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


def _bias_add(g: GraphIndex, out: str, width: int) -> onnx.NodeProto | None:
    """The Add of a constant (width,) bias when it is `out`'s only reader."""
    users = g.users.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    other = next((i for i in users[0].input if i != out), None)
    bias = g.const(other) if other else None
    return users[0] if bias is not None and bias.shape == (width,) else None


def _column_groups(g: GraphIndex, mm: onnx.NodeProto, width: int) -> tuple[list[tuple], list[onnx.NodeProto]]:
    """([(weight columns, output, bias name or "")] per GEMM to build, the nodes they replace).

    A Split on the last axis (w8a8 merges q, k and v into one GEMM for TensorRT) gives one GEMM per
    part, so each takes its own bias and no Split copy remains."""
    users = g.users.get(mm.output[0], [])
    split = users[0] if len(users) == 1 and users[0].op_type == "Split" else None
    sizes = g.const(split.input[1]) if split is not None and len(split.input) > 1 else None
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0) if split is not None else None
    if sizes is None or axis != -1 or int(sizes.sum()) != width:
        parts, replaced = [(slice(0, width), mm.output[0])], [mm]
    else:
        ends = np.cumsum(sizes).tolist()
        parts = [(slice(end - size, end), out) for size, end, out in zip(sizes.tolist(), ends, split.output)]
        replaced = [mm, split]
    groups = []
    for cols, out in parts:
        add = _bias_add(g, out, cols.stop - cols.start)
        if add is None:
            groups.append((cols, out, ""))
        else:
            groups.append((cols, add.output[0], next(i for i in add.input if i != out)))
            replaced.append(add)
    return groups, replaced


def _columns(v: np.ndarray, cols: slice) -> np.ndarray:
    """A per-column scale or zero point sliced to `cols`; a per-tensor one as it is."""
    return v if v.size == 1 else v.reshape(-1)[cols]


def _qdq_gemms(g: GraphIndex) -> int:
    """w8a8's `MatMul(DQ(Q(x)), DQ(W)) [+ bias]` -> MatMulIntegerToFloat(Q(x), W, ..., bias).

    ONNX Runtime fuses the Q/DQ pair itself, but leaves the bias as an Add (or a BiasGelu: 44 ms
    against 26 ms of Gelu at batch 32) and the merged q/k/v GEMM's Split; folded, they cost nothing.
    """
    folded = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        try:
            a_dq, w_dq = g.made_by(mm.input[0], "DequantizeLinear"), g.made_by(mm.input[1], "DequantizeLinear")
            quantize = g.made_by(a_dq.input[0], "QuantizeLinear")
        except LookupError:
            continue
        w, w_scale = g.const(w_dq.input[0]), g.const(w_dq.input[1])
        w_zero = g.const(w_dq.input[2]) if len(w_dq.input) > 2 else np.zeros((), np.int8)
        a_zero = g.const(a_dq.input[2]) if len(a_dq.input) > 2 else np.zeros((), np.int8)
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        if w is None or w.ndim != 2 or w_scale is None or w_zero is None or a_zero is None or axis not in (1, -1):
            continue
        nodes, x_q = [], quantize.output[0]
        a_zp = a_dq.input[2] if len(a_dq.input) > 2 else ""
        if a_zero.dtype == np.int8:  # int8 x int8 has no fast CPU kernel (5.5 s against 0.8 s): shift to uint8
            x_q, shifted = mm.name + "_xq", (a_zero.astype(np.int16) + 128).astype(np.uint8)  # same codes + 128
            a_zp = g.add_const(x_q + "_zp", shifted)
            nodes.append(helper.make_node("QuantizeLinear", [quantize.input[0], a_dq.input[1], a_zp], [x_q]))
        groups, replaced = _column_groups(g, mm, w.shape[1])
        for part, (cols, out, bias) in enumerate(groups):
            name = f"{mm.name}_int8_{part}"
            w_part = g.add_const(name + "_w", np.ascontiguousarray(w[:, cols]))
            scale = g.add_const(name + "_ws", _columns(w_scale, cols))
            zero = g.add_const(name + "_wzp", _columns(w_zero, cols))
            inputs = [x_q, w_part, a_dq.input[1], scale, a_zp, zero, bias]
            nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [out], name=name, domain=MS_DOMAIN))
        g.replace(replaced, nodes)
        folded += 1
    return folded


def _rewrite_linears(g: GraphIndex, runtime: str) -> int:
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


def cpu_graph(model: onnx.ModelProto, runtime: str) -> tuple[onnx.ModelProto, dict]:
    """Rewrite `model` (loaded with its weights) in place for `runtime`; returns it and what changed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "qdq":
        return model, {"runtime": runtime}
    linears = _rewrite_linears(GraphIndex(model), runtime)
    floated = float_attention(GraphIndex(model)) if runtime == "int8" else 0
    qdq_gemms = _qdq_gemms(GraphIndex(model))
    prune(model)  # the Q/DQ pairs these left unread
    attention = fuse_attention(GraphIndex(model))
    experts = sparse_experts(GraphIndex(model))
    taps = batched_taps(GraphIndex(model))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    prune(model)
    changes = {
        "int8_linears": linears,
        "float_attention_matmuls": floated,
        "qdq_gemms": qdq_gemms,
        "attention_fused": attention,
    }
    return model, {"runtime": runtime, **changes, "sparse_moe": experts, "batched_taps": taps}
