"""Static TensorRT-compatibility check for exported ONNX graphs (docs/DESIGN.md section 5, "Checks").

Needs no TensorRT. It reports what TensorRT's ONNX parser would reject or silently mis-read:
ops outside the parser's support matrix or outside the default ONNX domain, a default-domain
opset outside the parsed range, and Q/DQ nodes that are not symmetric signed quantization
(TensorRT: "x_zero_point must be zero"; UINT8 only as network I/O), per-channel Q/DQ that rely on
ONNX's implicit axis=1, and Q/DQ scales that are not build-time constants (warning level).

Op list source: onnx-tensorrt `docs/operators.md` for TensorRT 10.15 ("supports operators in the
inclusive range of opset 9 to opset 24"); docs/DESIGN.md records opsets 9-25 for TensorRT 11, hence the
default range. An op that parses may still hit a listed restriction (e.g. TopK K < 3840); the
parser itself is the final word on a GPU host.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
UNSIGNED_QUANT_TYPES = {TensorProto.UINT8: "uint8", TensorProto.UINT4: "uint4"}

# Every op marked "Y" in onnx-tensorrt docs/operators.md (TensorRT 10.15), default domain only.
TENSORRT_ONNX_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    problem: str
    level: str = "error"  # "error": TensorRT rejects or mis-reads it; "warning": likely trouble

    def __str__(self) -> str:
        return f"[{self.level}] {self.node} ({self.op}): {self.problem}"


class TensorRTCompatibilityError(ValueError):
    """Raised by assert_tensorrt_compatible; `.findings` holds every Finding."""

    def __init__(self, findings: list[Finding]):
        self.findings = list(findings)
        lines = "\n".join(f"  - {f}" for f in self.findings)
        super().__init__(f"{len(self.findings)} TensorRT compatibility finding(s):\n{lines}")


# ---------------------------------------------------------------- constant / type tables


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a Constant node as a TensorProto (None for sparse/string values)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats"):
            data = attr.f if attr.name == "value_float" else list(attr.floats)
            return numpy_helper.from_array(np.asarray(data, dtype=np.float32))
        if attr.name in ("value_int", "value_ints"):
            data = attr.i if attr.name == "value_int" else list(attr.ints)
            return numpy_helper.from_array(np.asarray(data, dtype=np.int64))
    return None


def _graph_tables(graph: onnx.GraphProto) -> tuple[dict, dict, dict]:
    """(constants, elem types, shapes) declared in this graph: initializers, Constant nodes, value_info."""
    consts = {t.name: t for t in graph.initializer}
    types = {t.name: t.data_type for t in graph.initializer}
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            types.setdefault(vi.name, tt.elem_type)
            if tt.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                shapes.setdefault(vi.name, dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            t = _constant_tensor(node)
            if t is not None:
                consts[node.output[0]] = t
                types[node.output[0]] = t.data_type
                shapes[node.output[0]] = tuple(t.dims)
    return consts, types, shapes


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


# ---------------------------------------------------------------- per-node checks


def _check_op(node: onnx.NodeProto, name: str) -> list[Finding]:
    if node.domain not in DEFAULT_DOMAINS:
        return [
            Finding(
                name,
                f"{node.domain}.{node.op_type}",
                f"custom domain '{node.domain}': TensorRT's ONNX parser imports default-domain "
                "ONNX ops only (a custom op needs a TensorRT plugin)",
            )
        ]
    if node.op_type not in TENSORRT_ONNX_OPS:
        return [Finding(name, node.op_type, "not supported by TensorRT's ONNX parser (onnx-tensorrt operators.md)")]
    return []


def _attr(node: onnx.NodeProto, key: str):
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return None


def _quantized_type(node, consts, types) -> tuple[int | None, str]:
    """The integer type a Q/DQ node works in, and where that came from."""
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is not None and zp in types:
        return types[zp], "zero point"
    if node.op_type == "DequantizeLinear":
        return types.get(node.input[0]), "input"
    output_dtype = _attr(node, "output_dtype")
    if output_dtype:
        return output_dtype, "output_dtype"
    return TensorProto.UINT8, "default"  # ONNX: no zero point and no output_dtype -> uint8


def _check_qdq(node, name, consts, types, shapes) -> list[Finding]:
    op, found = node.op_type, []
    scale = node.input[1]
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    axis_given = _attr(node, "axis") is not None

    if scale not in consts:
        found.append(
            Finding(
                name,
                op,
                f"scale '{scale}' is not a constant initializer: TensorRT needs build-time Q/DQ scales",
                level="warning",
            )
        )
    scale_shape = shapes.get(scale)
    if scale_shape is not None and len(scale_shape) == 1 and (scale_shape[0] or 0) > 1 and not axis_given:
        found.append(
            Finding(
                name,
                op,
                f"per-channel scale (shape {list(scale_shape)}) without an explicit "
                "`axis` attribute: ONNX silently uses axis=1; set axis",
            )
        )
    if _attr(node, "block_size") and not axis_given:
        found.append(Finding(name, op, "block-quantized without an explicit `axis` attribute; set axis"))

    qtype, source = _quantized_type(node, consts, types)
    if qtype in UNSIGNED_QUANT_TYPES:
        why = (
            "QuantizeLinear without a zero point outputs uint8 (ONNX default): give it an int8 zero "
            "point of 0 or output_dtype=INT8"
            if source == "default"
            else f"{source} is {UNSIGNED_QUANT_TYPES[qtype]}: TensorRT quantizes to signed types only "
            "(int8/int4, symmetric); store q-128 as int8 with zero point 0"
        )
        found.append(Finding(name, op, why))
    if zp is not None:
        if zp not in consts:
            found.append(
                Finding(name, op, f"zero point '{zp}' is not a constant: TensorRT needs a constant zero point of 0")
            )
        else:
            values = numpy_helper.to_array(consts[zp]).astype(np.float64)
            nonzero = np.flatnonzero(values)
            if nonzero.size:
                sample = values.ravel()[nonzero[:4]].astype(np.int64).tolist()
                found.append(
                    Finding(
                        name,
                        op,
                        f"zero point is non-zero ({nonzero.size} of {values.size} "
                        f"entries, e.g. {sample}): TensorRT requires zero point 0 "
                        "(symmetric quantization)",
                    )
                )
    return found


# ---------------------------------------------------------------- graph walk


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}->{node.output[0] if node.output else ''}"


def _check_graph(graph, scope, prefix, functions, findings, visited_functions) -> None:
    consts, types, shapes = (m.new_child(local) for m, local in zip(scope, _graph_tables(graph)))
    for i, node in enumerate(graph.node):
        name = prefix + _node_name(node, i)
        key = (node.domain, node.op_type)
        if key in functions:  # model-local function: TensorRT inlines it, so check its body
            if key not in visited_functions:
                visited_functions.add(key)
                fn = functions[key]
                body = onnx.helper.make_graph(list(fn.node), fn.name, [], [])
                _check_graph(
                    body, (consts, types, shapes), f"{name}/{fn.name}/", functions, findings, visited_functions
                )
            continue
        findings.extend(_check_op(node, name))
        if node.op_type in QDQ_OPS and node.domain in DEFAULT_DOMAINS:
            findings.extend(_check_qdq(node, name, consts, types, shapes))
        for attr in node.attribute:  # If / Loop / Scan bodies see the outer scope
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                _check_graph(
                    sub, (consts, types, shapes), f"{name}/{attr.name}/", functions, findings, visited_functions
                )


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    return onnx.load(str(path))


def _with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference fills value_info (for DQ input dtypes); a model it cannot handle is checked as is."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # broken or >2 GB models: fall back to the declared types
        return model


def check_tensorrt_compatible(
    model: onnx.ModelProto | str | Path, min_opset: int = 9, max_opset: int = 25
) -> list[Finding]:
    """Every reason TensorRT's ONNX parser would reject (or mis-read) `model`; empty when none."""
    model = _with_inferred_types(_load(model))
    findings: list[Finding] = []
    opsets = {o.domain: o.version for o in model.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        findings.append(Finding("<model>", "opset_import", "no default-domain opset import"))
    elif not min_opset <= default <= max_opset:
        findings.append(
            Finding(
                "<model>",
                "opset_import",
                f"default-domain opset {default} is outside the range TensorRT parses ({min_opset}-{max_opset})",
            )
        )
    functions = {(f.domain, f.name): f for f in model.functions}
    scope = (ChainMap(), ChainMap(), ChainMap())
    _check_graph(model.graph, scope, "", functions, findings, set())
    return findings


def assert_tensorrt_compatible(model: onnx.ModelProto | str | Path, allow_warnings: bool = False, **kwargs) -> None:
    """Raise TensorRTCompatibilityError listing every finding (warnings too, unless allow_warnings)."""
    findings = check_tensorrt_compatible(model, **kwargs)
    blocking = [f for f in findings if f.level == "error" or not allow_warnings]
    if blocking:
        raise TensorRTCompatibilityError(findings)
