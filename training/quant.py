"""GNP-IQ backbone weights: n-bit asymmetric per-row codes held as buffers of plain modules (docs/DESIGN.md section 4).

Per row: `s = (max - min) / (2^n - 1)`, `z = clamp(round(-min / s), 0, 2^n - 1)`,
`q = clamp(round(w / s) + z, 0, 2^n - 1)`, dequantized `s * (q - z)`. Two guards keep the literal
formula from destroying degenerate rows:
- the range is taken over `min(row_min, 0)` and `max(row_max, 0)`. On a row that spans zero (every
  real weight row) this IS the row min and max; on a row that does not, the literal z would be
  clamped and the whole row clipped to one code (PyTorch's observers widen the same way);
- an all-zero row (s == 0) gets s = 1e-8, so it round-trips exactly and re-quantization noise
  (which is in units of s) stays negligible on it.
4-bit codes are packed two per byte along the row, low nibble first. Modules hold buffers only
(frozen by construction); an optional fp16 CPU copy of the original weight is a plain attribute
`reference` (never moved by `.to()`, never in the state_dict).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import QuantConfig

_MIN_SCALE = 1e-8
_ERROR_CHUNK_ROWS = 4096  # bounds the transient memory of quant_error


def quantize_rows(w: Tensor, bits: int, rounding: str = "nearest") -> tuple[Tensor, Tensor, Tensor]:
    """(R, C) float -> codes uint8 (R, C), scale float32 (R,), zero point uint8 (R,)."""
    qmax = 2**bits - 1
    w = w.float()
    lo = w.amin(dim=1).clamp(max=0.0)  # (R,)
    hi = w.amax(dim=1).clamp(min=0.0)
    s = (hi - lo) / torch.full_like(hi, qmax)  # a tensor divisor: CPU divides by a scalar via its reciprocal
    s = torch.where(s > 0, s, torch.full_like(s, _MIN_SCALE))
    z = torch.round(-lo / s).clamp(0, qmax)
    r = torch.floor if rounding == "floor" else torch.round
    q = (r(w / s[:, None]) + z[:, None]).clamp(0, qmax)
    return q.to(torch.uint8), s, z.to(torch.uint8)


def dequantize_rows(q: Tensor, scale: Tensor, zero_point: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """s * (q - z), computed in float32 and cast to dtype; q (..., C), scale and zero_point (...)."""
    w = (q.float() - zero_point.float()[..., None]) * scale.float()[..., None]
    return w.to(dtype)


def pack_int4(q: Tensor) -> Tensor:
    """(..., C) codes < 16 -> (..., ceil(C/2)) bytes, low nibble first."""
    if q.shape[-1] % 2:
        q = F.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: Tensor, cols: int) -> Tensor:
    """(..., ceil(C/2)) bytes -> (..., C) codes."""
    q = torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)
    return q[..., :cols]


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.is_floating_point() else torch.float32


class _RowQuantized(nn.Module):
    """Shared storage of a per-row quantized (rows, cols) matrix: buffers qweight, scale, zero_point."""

    def __init__(self, rows: int, cols: int, bits: int, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.bits, self.num_rows, self.num_cols = bits, rows, cols
        packed = cols if bits == 8 else (cols + 1) // 2
        self.register_buffer("qweight", torch.zeros(rows, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(rows, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(rows, dtype=torch.uint8, device=device))
        self.reference: Tensor | None = None  # fp16 CPU copy of the original weight (plain attribute)

    def _pack(self, q: Tensor) -> Tensor:
        return q if self.bits == 8 else pack_int4(q)

    def _unpack(self, p: Tensor) -> Tensor:
        return p if self.bits == 8 else unpack_int4(p, self.num_cols)

    @torch.no_grad()
    def _load_float(self, w: Tensor, rounding: str) -> None:
        q, s, z = quantize_rows(w.detach(), self.bits, rounding)
        self.qweight.copy_(self._pack(q))
        self.scale.copy_(s)
        self.zero_point.copy_(z)

    def codes(self) -> Tensor:
        """Unpacked uint8 codes (rows, cols)."""
        return self._unpack(self.qweight)

    @torch.no_grad()
    def set_rows(self, rows: Tensor, q_rows: Tensor, scale_rows: Tensor, zero_rows: Tensor) -> None:
        """Overwrite the given rows with unpacked codes (k, cols) and their scale and zero point (k,)."""
        rows = rows.to(self.qweight.device)
        self.qweight[rows] = self._pack(q_rows.to(self.qweight.device, torch.uint8))
        self.scale[rows] = scale_rows.to(self.scale.device, torch.float32)
        self.zero_point[rows] = zero_rows.to(self.zero_point.device, torch.uint8)

    def gather_rows(self, idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dequantize only the rows idx (any shape) -> (*idx.shape, cols)."""
        return dequantize_rows(self._unpack(self.qweight[idx]), self.scale[idx], self.zero_point[idx], dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole (rows, cols) matrix in dtype (float32 by default)."""
        return dequantize_rows(self.codes(), self.scale, self.zero_point, dtype or torch.float32)

    def _share_storage(self, other: _RowQuantized) -> None:
        """Point at the buffers of `other` (a tied weight): one copy of the codes."""
        self.qweight, self.scale, self.zero_point = other.qweight, other.scale, other.zero_point
        self.reference = other.reference


class QuantizedLinear(_RowQuantized):
    """nn.Linear with per-output-channel n-bit weight; the bias stays fp32."""

    weight = None  # no float weight: encoder code that inspects `.weight` (T5's FFN dtype check) skips it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, device=None):
        super().__init__(out_features, in_features, bits, device)
        self.in_features, self.out_features = in_features, out_features
        b = torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        self.register_buffer("bias", b)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8, rounding: str = "nearest") -> QuantizedLinear:
        """Quantize a Linear on the device its weight is on."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, w.device)
        m._load_float(w, rounding)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        w = self.dequantize(dtype)  # (out, in)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedEmbedding(_RowQuantized):
    """nn.Embedding with a per-row n-bit table; a lookup dequantizes only the gathered rows."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, bits: int = 8, device=None
    ):
        super().__init__(num_embeddings, embedding_dim, bits, device)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_float(cls, embedding: nn.Embedding, bits: int = 8, rounding: str = "nearest") -> QuantizedEmbedding:
        """Quantize an Embedding table on the device it is on."""
        w = embedding.weight
        m = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, bits, w.device)
        m._load_float(w, rounding)
        return m

    def forward(self, ids: Tensor) -> Tensor:
        dtype = (
            torch.get_autocast_dtype(ids.device.type) if torch.is_autocast_enabled(ids.device.type) else torch.float32
        )
        return self.gather_rows(ids, dtype)  # (*ids.shape, dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, bits={self.bits}"


QUANTIZED_TYPES = (QuantizedLinear, QuantizedEmbedding)


def _quantize_module(m: nn.Module, cfg: QuantConfig, tied: dict[int, tuple[Tensor, _RowQuantized]]) -> nn.Module:
    """The quantized replacement of one Linear/Embedding; a weight already quantized is shared, not copied."""
    w = m.weight
    if isinstance(m, nn.Linear):
        if id(w) in tied:
            new = QuantizedLinear(m.in_features, m.out_features, m.bias is not None, cfg.bits, w.device)
            new._share_storage(tied[id(w)][1])
            if m.bias is not None:
                new.bias.copy_(m.bias.detach())
            return new
        new = QuantizedLinear.from_float(m, cfg.bits, cfg.rounding)
    else:
        if id(w) in tied:
            new = QuantizedEmbedding(m.num_embeddings, m.embedding_dim, m.padding_idx, cfg.bits, w.device)
            new._share_storage(tied[id(w)][1])
            return new
        new = QuantizedEmbedding.from_float(m, cfg.bits, cfg.rounding)
    if cfg.keep_fp_reference:
        new.reference = w.detach().to("cpu", torch.float16, copy=True)
    tied[id(w)] = (w, new)  # keep w alive so its id cannot be reused
    return new


def quantize_(
    model: nn.Module, cfg: QuantConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> list[str]:
    """Replace, in place, every nn.Linear (and nn.Embedding if cfg.quantize_embeddings) passing filter_fn(module, name)
    (torchao's argument order).

    Exact types only: subclasses such as nn.MultiheadAttention's out_proj (whose weight MHA reads
    directly) are left alone. A module reachable under several names is judged under the first name met
    (walking parents in named_modules order) and replaced once, in every parent. Linear and Embedding modules that share
    one weight tensor (tied LM heads) share one set of codes. Returns the first names replaced.
    Quantize on CPU and move to the GPU afterwards to keep the fp weights off the GPU.
    """
    kinds = (nn.Linear, nn.Embedding) if cfg.quantize_embeddings else (nn.Linear,)
    decided: dict[int, nn.Module | None] = {}  # id(old module) -> replacement, or None if kept
    tied: dict[int, tuple[Tensor, _RowQuantized]] = {}
    replaced: list[str] = []
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent.named_children()):
            if type(child) not in kinds:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in decided:
                keep = filter_fn is not None and not filter_fn(child, name)
                decided[id(child)] = None if keep else _quantize_module(child, cfg, tied)
                if not keep:
                    replaced.append(name)
            new = decided[id(child)]
            if new is not None:
                setattr(parent, child_name, new)
    return replaced


@torch.no_grad()
def quant_error(module: _RowQuantized, reference: Tensor | None = None) -> tuple[float, float]:
    """Paper Eq. 4: (||W_ref - W_hat||_F^2, that / ||W_ref||_F^2), W_ref = module.reference by default."""
    ref = module.reference if reference is None else reference
    if ref is None:
        raise ValueError("no reference weight: quantize with keep_fp_reference or pass one")
    dev = module.qweight.device
    err = norm = 0.0
    for start in range(0, ref.shape[0], _ERROR_CHUNK_ROWS):
        idx = torch.arange(start, min(start + _ERROR_CHUNK_ROWS, ref.shape[0]), device=dev)
        r = ref[start : start + len(idx)].to(dev, torch.float32)
        err += (r - module.gather_rows(idx)).pow(2).sum().item()
        norm += r.pow(2).sum().item()
    return err, err / max(norm, 1e-30)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (the CPU `reference` is not counted)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total
