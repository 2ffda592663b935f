"""Export-time replacements for the quantized backbone modules, one per weight format.

TensorRT accepts only symmetric int8 Q/DQ (zero point 0). The trained asymmetric codes are
re-expressed exactly (docs/DESIGN.md section 5): with q' = q - 128 (int8),

    s * (q - z) = s * q' + s * (128 - z)   =>   x @ W^T = x @ DQ(q', s)^T + sum(x) * s * (128 - z)

so `SymmetricInt8Linear` stores q'^T (in, out) behind DequantizeLinear(axis=1) -> MatMul (the
pattern ONNX Runtime and TensorRT fuse) plus a rank-1 correction. Embedding lookups gather int8
rows and their per-row scale/correction, dequantizing only those rows.
"""

from __future__ import annotations

import torch
from torch import nn

from training.quant import QuantizedEmbedding, QuantizedLinear

PRECISIONS = ("int8-weight", "w8a8", "fp16", "int4-weight", "fp32")


def symmetric_reexpression(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """(uint8 codes (R, C), s (R,), z (R,)) -> (int8 q' = q - 128, per-row correction s * (128 - z))."""
    q8 = (q.to(torch.int16) - 128).to(torch.int8)
    corr = scale.float() * (128.0 - zero_point.float())
    return q8, corr


def dequantize_linear(
    q: torch.Tensor, scale: torch.Tensor, axis: int, block_size: int | None = None, opset: int = 19
) -> torch.Tensor:
    """ONNX DequantizeLinear (zero point 0) during export; the same arithmetic in eager mode."""
    if torch.onnx.is_in_onnx_export():
        attrs = {"axis": axis} if block_size is None else {"axis": axis, "block_size": block_size}
        return torch.onnx.ops.symbolic(
            "DequantizeLinear", (q, scale), attrs, dtype=scale.dtype, shape=q.shape, version=opset
        )
    if block_size is not None:
        full = scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, q.shape[axis])  # trim padding on `axis`
        return q.to(scale.dtype) * full
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.to(scale.dtype) * scale.view(shape)


class SymmetricInt8Linear(nn.Module):
    """y = x @ DQ(q'^T, s, axis=1) + sum(x) * s * (128 - z) + b, equal to the trained layer."""

    weight = None  # no float weight: encoder code that inspects `.weight` (T5's FFN) skips it

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        if layer.bits != 8:
            raise ValueError("int8-weight export needs 8-bit codes; train with quant.bits=8 or export int4-weight")
        q8, corr = symmetric_reexpression(layer.codes(), layer.scale, layer.zero_point)
        self.register_buffer("weight_t", q8.t().contiguous())  # (in, out) int8
        self.register_buffer("scale", layer.scale.float().clone())  # (out,)
        self.register_buffer("correction", corr)  # (out,)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())

    def forward(self, x):
        w_t = dequantize_linear(self.weight_t, self.scale, axis=1)  # (in, out)
        y = x @ w_t + x.sum(-1, keepdim=True) * self.correction  # (..., out)
        return y if self.bias is None else y + self.bias


class Int4BlockLinear(nn.Module):
    """Symmetric int4 weights, one scale per block of `block_size` input channels (blocked DQ, opset 21).

    The codes are re-derived from the dequantized 8-bit weight (a second, coarser quantization);
    int4 initializers are written as int8 by torch and retyped to INT4 by `export.onnx_export`.
    """

    weight = None  # no float weight: encoder code that inspects `.weight` (T5's FFN) skips it

    def __init__(self, layer: QuantizedLinear, block_size: int = 32):
        super().__init__()
        w_t = layer.dequantize(torch.float32).t().contiguous()  # (in, out)
        rows = w_t.shape[0]
        pad = (-rows) % block_size
        blocks = torch.nn.functional.pad(w_t, (0, 0, 0, pad)).view(-1, block_size, w_t.shape[1])  # (nb, bs, out)
        scale = blocks.abs().amax(1).clamp_min(1e-8) / 7.0  # (nb, out)
        q = torch.clamp(torch.round(blocks / scale[:, None, :]), -8, 7).view(-1, w_t.shape[1])[:rows]
        self.register_buffer("weight_t", q.to(torch.int8).contiguous())  # (in, out), values in [-8, 7]
        self.register_buffer("scale", scale.contiguous())  # (in / bs, out)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        self.block_size = block_size

    def forward(self, x):
        w_t = dequantize_linear(self.weight_t, self.scale, axis=0, block_size=self.block_size, opset=21)
        y = x @ w_t
        return y if self.bias is None else y + self.bias


class Int8GatherEmbedding(nn.Module):
    """Gather int8 rows, then dequantize only them: (q'[ids] * s[ids] + corr[ids])."""

    def __init__(self, emb: QuantizedEmbedding):
        super().__init__()
        if emb.bits != 8:
            raise ValueError("int8 embedding export needs 8-bit codes")
        q8, corr = symmetric_reexpression(emb.codes(), emb.scale, emb.zero_point)
        self.register_buffer("weight", q8)  # (V, D) int8
        self.register_buffer("scale", emb.scale.float().clone())  # (V,)
        self.register_buffer("correction", corr)  # (V,)

    def forward(self, ids):
        rows = self.weight[ids].to(torch.float32)  # (..., D)
        return rows * self.scale[ids].unsqueeze(-1) + self.correction[ids].unsqueeze(-1)


def dequantized_linear(layer: QuantizedLinear) -> nn.Linear:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(layer.dequantize(torch.float32))
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin


def dequantized_embedding(emb: QuantizedEmbedding) -> nn.Embedding:
    out = nn.Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
    with torch.no_grad():
        out.weight.copy_(emb.dequantize(torch.float32))
    return out


def convert_for_export_(module: nn.Module, precision: str, int4_block: int = 32) -> nn.Module:
    """Replace quantized modules in place by their export form for `precision`.

    int8-weight: symmetric int8 DQ linears + int8 gather embeddings (exact). int4-weight: blocked
    int4 linears (embeddings stay int8). w8a8: dequantized float linears (quantized afterwards by
    ONNX Runtime's calibrator) and the exact int8 gather embeddings. fp32 / fp16: dequantized float.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, child in list(module.named_children()):
        if isinstance(child, QuantizedLinear):
            new = {
                "int8-weight": SymmetricInt8Linear,
                "int4-weight": lambda layer: Int4BlockLinear(layer, int4_block),
            }.get(precision, dequantized_linear)(child)
            setattr(module, name, new)
        elif isinstance(child, QuantizedEmbedding):
            setattr(
                module,
                name,
                Int8GatherEmbedding(child)
                if precision in ("int8-weight", "int4-weight", "w8a8")
                else dequantized_embedding(child),
            )
        else:
            convert_for_export_(child, precision, int4_block)
    return module
