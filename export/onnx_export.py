"""PyTorch checkpoint -> backbone.onnx + adapter.onnx, with names and shapes from the I/O spec.

Each function takes a model (or a path) and writes one artifact, so each step runs and is tested
alone. The torch.onnx dynamo exporter is used; quantized weights become DequantizeLinear nodes
through `export.qdq` (torch.onnx.ops.symbolic), never a float copy of the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from training.model import SideTuned

from .io_spec import ModelIO
from .qdq import convert_for_export_

DEFAULT_OPSET = 20  # the first with a Gelu op: one node instead of Div/Erf/Add/Mul/Mul (TensorRT parses it)
INT4_OPSET = 21  # INT4 and blocked DequantizeLinear


class BackboneGraph(nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> (hidden_states, cls_states)."""

    def __init__(self, tap: nn.Module):
        super().__init__()
        self.tap = tap

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden_states, cls_states = self.tap(input_ids, attention_mask, token_type_ids)
        return hidden_states.float(), cls_states.float()


class AdapterGraph(nn.Module):
    """(hidden_states, cls_states, attention_mask) -> logits; the MoE aux losses are training-only."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, hidden_states, cls_states, attention_mask):
        return self.adapter(hidden_states, cls_states, attention_mask)[0]


def dynamic_shapes(io: ModelIO) -> dict:
    """One torch.export Dim per named axis of the I/O spec, shared by every input that has it."""
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "sequence": torch.export.Dim("sequence", min=2, max=8192),
    }
    return {t.name: {i: dims[a] for i, a in enumerate(t.axes) if a is not None} for t in io.inputs}


def example_inputs(io: ModelIO, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs matching the spec; ids stay inside a small vocabulary and masks end with padding."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in io.inputs:
        shape = [batch if i == 0 else (seq if d == -1 else d) for i, d in enumerate(t.shape)]
        if t.name == "attention_mask":
            m = torch.ones(shape, dtype=torch.int64)
            m[-1, seq // 2 :] = 0
            out[t.name] = m
        elif t.dtype == "int64":
            hi = 2 if t.name == "token_type_ids" else 1000
            out[t.name] = torch.randint(0, hi, shape, generator=g)
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


def _export(module: nn.Module, io: ModelIO, path: Path, opset: int) -> Path:
    module.eval()
    inputs = example_inputs(io)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (),
            kwargs=inputs,
            input_names=[t.name for t in io.inputs],
            output_names=[t.name for t in io.outputs],
            opset_version=opset,
            dynamic_shapes=dynamic_shapes(io),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    return path


def export_backbone(
    model: SideTuned, io: ModelIO, path: Path, precision: str = "int8-weight", opset: int = DEFAULT_OPSET
) -> Path:
    """Write the backbone graph in `precision` (the model itself is not modified)."""
    tap = copy.deepcopy(model.tap).eval()
    for hook in tap._hooks:
        hook.remove()
    use_eager_attention(tap.encoder)
    convert_for_export_(tap.encoder, precision)
    if precision == "int4-weight":
        opset = max(opset, INT4_OPSET)
    if precision == "fp16":
        tap.half()  # fp16 compute; BackboneGraph keeps the I/O in fp32
    path = _export(BackboneGraph(tap), io, Path(path), opset)
    if precision == "int4-weight":
        retype_int4_initializers(path)
    return path


def use_eager_attention(encoder: nn.Module) -> None:
    """Export attention as MatMul-Softmax-MatMul, the same math as SDPA.

    The SDPA decomposition adds IsNaN/Where guards for fully masked rows (about 10% of CPU time
    at batch 32) and hides the attention matmuls from ONNX Runtime's int8 fusions.
    """
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")


def export_adapter(model: SideTuned, io: ModelIO, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    return _export(AdapterGraph(copy.deepcopy(model.adapter)), io, Path(path), opset)


def retype_int4_initializers(path: Path) -> None:
    """Blocked DequantizeLinear inputs are exported as int8 holding [-8, 7]; store them as INT4."""
    model = onnx.load(str(path))
    targets = {
        n.input[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
    }
    for i, init in enumerate(model.graph.initializer):
        if init.name in targets:
            values = onnx.numpy_helper.to_array(init, base_dir=str(path.parent)).astype(np.int8)
            new = onnx.helper.make_tensor(init.name, onnx.TensorProto.INT4, values.shape, values.flatten().tolist())
            model.graph.initializer[i].CopyFrom(new)
    save_with_external_data(model, path)


def external_data_file(path: Path) -> Path:
    """Every graph here keeps its weights beside it as `<name>.onnx.data`."""
    return path.with_name(path.name + ".data")


def save_with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """Write `path` + its `.data` file, replacing a stale one (onnx refuses to write over it)."""
    path = Path(path)
    data = external_data_file(path)
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    return path


def onnx_size_bytes(path: Path) -> int:
    """The graph file plus its external data."""
    path = Path(path)
    data = external_data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
