"""The quantized layer classes ``%quantize`` produces that hold plain tensors, each storable by
:mod:`nbcompress.storage` (the int8-kernel layers are in :mod:`.qmodules_int8`).

* **Stored codes, simulated arithmetic** (any device): :class:`QuantizedWeightLayer` keeps B-bit
  integer codes, a scale (per tensor or per output channel) and an optional zero point as buffers
  and dequantizes in ``forward``; ``nbcompress.save`` bit-packs the codes (a tensor holding 2^B
  distinct integers is written at B bits), so the file is about params*B/8 bytes plus scales.
  Binary weights are the same layer with codes in {-1, +1} and a per-channel scale.

* **int8 on a GPU**: :class:`Int8MatmulLinear` is that layer with 8-bit symmetric per-channel
  codes whose forward really computes in int8: each row of the input is quantized on the fly and
  multiplied with the codes by ``torch._int_mm`` (cuBLAS's int8 GEMM on CUDA, exact int32 sums on
  any device), as torchao's int8 dynamic-activation config does.

* :class:`ReducedPrecision` wraps a module cast to fp16/bf16 and casts float inputs to that dtype
  (and outputs back to float32), so loaders, evaluators and losses keep working unchanged.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["QuantizedWeightLayer", "Int8MatmulLinear", "ReducedPrecision", "compact_float", "round_scale", "quiet"]


class quiet(warnings.catch_warnings):
    """Hide torch.ao.quantization's deprecation warnings around our own calls (int8.py says
    why we still use it): they say nothing the user can act on."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated.*")
        return out


def compact_float(t: torch.Tensor) -> torch.Tensor:
    """The same values in the narrowest float dtype that holds them exactly (fp16, fp32 or fp64):
    scales chosen on an fp16 grid cost 2 bytes each in the file, and the load is bit-exact."""
    t = t.detach()
    for dt in (torch.float16, torch.float32):
        if t.dtype == dt:
            return t
        c = t.to(dt)
        if torch.isfinite(c).all() and torch.equal(c.to(t.dtype), t):
            return c
    return t


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """A positive float32 scale moved to the nearest value fp16 represents exactly (when every
    scale is in fp16's normal range): 2 bytes per scale in storage, a relative change < 5e-4."""
    scale = scale.float()
    if scale.numel() and bool(((scale >= 6.2e-5) & (scale <= 6.0e4)).all()):
        return scale.half().float()
    return scale


# ------------------------------------------------------------------- stored codes (simulated)

_OPS = {"linear": None, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


class QuantizedWeightLayer(nn.Module):
    """A Linear or Conv layer whose weight is stored as integer codes: ``w = (codes - zero_point)
    * scale``, dequantized in every forward.

    ``scale`` has one entry per output channel or one in all (per tensor); ``zero_point`` (uint8
    codes) exists only for the asymmetric scheme; symmetric codes are int8 around 0, and 1-bit
    symmetric codes are -1/+1 (binary weights: sign * scale). Only what cannot be derived from the
    tensors is an attribute (``op``, ``bits`` and, for convs, the geometry): the safe storage
    rebuilds the layer without pickle, and a small model's file is not mostly header.
    """

    _nbc_weight_buffers = ("codes",)

    def __init__(self, op: str, weight_shape: tuple, bits: int, *, per_channel: bool = True,
                 symmetric: bool = True, bias: bool = True, stride=1, padding=0, dilation=1,
                 groups: int = 1):
        super().__init__()
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}")
        self.op = op
        self.bits = int(bits)
        if op != "linear":
            self.stride = _tuple(stride)
            self.padding = padding if isinstance(padding, str) else _tuple(padding)
            self.dilation = _tuple(dilation)
            self.groups = int(groups)
        shape = tuple(int(s) for s in weight_shape)
        n_scale = shape[0] if per_channel else 1
        code_dtype = torch.int8 if symmetric else torch.uint8
        self.register_buffer("codes", torch.zeros(shape, dtype=code_dtype))
        self.register_buffer("scale", torch.ones(n_scale))
        if symmetric:
            self.register_buffer("zero_point", None)
        else:
            self.register_buffer("zero_point", torch.zeros(n_scale, dtype=torch.uint8))
        if bias:
            self.bias = nn.Parameter(torch.zeros(shape[0]))
        else:
            self.register_parameter("bias", None)

    # ---------------------------------------------------------------- derived
    @property
    def weight_shape(self) -> tuple:
        return tuple(self.codes.shape)

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() == self.codes.shape[0] and self.codes.shape[0] > 1

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def scheme(self) -> str:
        return "binary" if self.bits == 1 and self.zero_point is None else "uniform"

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32, or the bias's dtype): what code around the layer
        reads (``F.linear(x, self.qkv.weight)``, ``self.wo.weight.dtype``) stays a tensor."""
        return self.dequantized_weight()

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    # ---------------------------------------------------------------- what metrics shows
    @property
    def nbc_bits(self) -> int:
        return self.bits

    def nbc_count(self) -> tuple[int, int]:
        from ...counting import _tensor_counts, code_counts

        if self.zero_point is None:      # symmetric: a zero code; counted once per codes tensor
            p, nz = _tensor_counts(self.codes)
        else:
            p, nz = code_counts(self.codes, self.zero_point.reshape(-1), axis=0)
        if self.bias is not None:
            b, bnz = _tensor_counts(self.bias)
            p, nz = p + b, nz + bnz
        return p, nz

    def _channel_shape(self) -> tuple:
        if self.scale.numel() == 1:
            return (1,) * self.codes.dim()
        return (-1,) + (1,) * (self.codes.dim() - 1)

    # ---------------------------------------------------------------- compute
    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        shape = self._channel_shape()
        codes = self.codes.to(dtype)
        if self.zero_point is not None:
            codes = codes - self.zero_point.to(dtype).reshape(shape)
        return codes * self.scale.to(dtype).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype if x.is_floating_point() else None)
        if self.op == "linear":
            return F.linear(x, w, self.bias)
        return _OPS[self.op](x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        grain = "per-channel" if self.scale.numel() > 1 else "per-tensor"
        kind = ("binary" if self.scheme == "binary" else
                f"{self.bits}-bit {'symmetric' if self.symmetric else 'asymmetric'}")
        return f"{self.op}, weight {self.weight_shape}, {kind}, {grain} scale"


_CODES_T = WeakIdKeyDictionary()      # codes tensor -> (its version, codes.t().contiguous())


def int_mm_fits(in_features: int, out_features: int) -> bool:
    """cuBLAS's int8 GEMM needs both sizes a multiple of 8 (the rows are padded when too few)."""
    return in_features % 8 == 0 and out_features % 8 == 0 and in_features > 0 and out_features > 0


def _int_mm(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``xq @ codes.t()`` in int32 through ``torch._int_mm`` with cuBLAS's conditions met: the
    transposed codes contiguous (cached per codes version) and more than 16 rows (zero rows
    appended, then dropped)."""
    hit = _CODES_T.get(codes)
    if hit is None or hit[0] != codes._version:
        hit = (codes._version, codes.t().contiguous())
        _CODES_T[codes] = hit
    m = xq.shape[0]
    if xq.is_cuda and m <= 16:
        xq = torch.cat([xq, xq.new_zeros(17 - m, xq.shape[1])])
    return torch._int_mm(xq.contiguous(), hit[1])[:m]


class Int8MatmulLinear(QuantizedWeightLayer):
    """A Linear with int8 weights (symmetric, one scale per output channel) that computes in int8:
    ``y = (q(x) @ codes.T) * s_x * s_w + bias``, ``q(x)`` one symmetric scale per input row
    (dynamic, absmax / 127). On CUDA this is cuBLAS's int8 GEMM; elsewhere the same exact int32
    sums (so the CPU tests check the numbers the GPU computes). Stored, counted and exported as a
    :class:`QuantizedWeightLayer` (its float view is the dequantized weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or self.codes.dtype != torch.int8:
            return super().forward(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        s_x = x2.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
        xq = torch.round(x2 / s_x).clamp_(-127, 127).to(torch.int8)
        acc = _int_mm(xq, self.codes)
        y = acc.float() * s_x * self.scale.float().reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 activations per row (torch._int_mm)"


def _tuple(v):
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return int(v)



# -------------------------------------------------------------------------- fp16 / bf16

class ReducedPrecision(nn.Module):
    """``module`` with its floating-point parameters and buffers in ``dtype`` (fp16 or bf16).
    Float inputs are cast to ``dtype`` on the way in and float outputs back to float32 on the way
    out, so the rest of the program (loaders, losses, evaluators) is unchanged."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype

    @property
    def nbc_bits(self) -> int:
        return torch.finfo(self.dtype).bits

    def forward(self, *args, **kwargs):
        args = _cast_tree(args, self.dtype, only_float32=True)
        kwargs = _cast_tree(kwargs, self.dtype, only_float32=True)
        return _cast_tree(self.module(*args, **kwargs), torch.float32, only_from=self.dtype)

    def extra_repr(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _cast_tree(obj: Any, dtype: torch.dtype, only_float32: bool = False, only_from=None):
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return obj
        if only_float32 and obj.dtype not in (torch.float32, torch.float64):
            return obj
        if only_from is not None and obj.dtype != only_from:
            return obj
        return obj.to(dtype)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_cast_tree(v, dtype, only_float32, only_from) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_tree(v, dtype, only_float32, only_from) for v in obj)
    if isinstance(obj, dict):
        return {k: _cast_tree(v, dtype, only_float32, only_from) for k, v in obj.items()}
    return obj


