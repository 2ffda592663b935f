"""Make the adapter graph's expert choices observable, so parity can compare routing with PyTorch.

The exported MoE picks experts with one TopK per side block. `expose_routes` writes a copy of the
graph whose TopK index outputs are also graph outputs (the computation is unchanged), in block
order. The served graph is never modified.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .onnx_export import save_with_external_data


def topk_index_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the index output of every TopK node in the main graph, in graph (execution) order."""
    return [n.output[1] for n in model.graph.node if n.op_type == "TopK" and len(n.output) > 1]


def expose_routes(adapter_path: Path, out_path: Path) -> list[str]:
    """Write `out_path`: the adapter with each TopK's indices (B, T, k) added as outputs; returns their names."""
    model = onnx.load(str(adapter_path))
    names = topk_index_outputs(model)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    save_with_external_data(model, Path(out_path))
    return names
