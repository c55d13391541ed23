"""Nonzero counts of stored tensors: float and integer tensors counted by numpy on the CPU
(:func:`nonzero_count`, torch's own semantics), quantized tensors and int8 codes against their
zero points (:func:`code_counts`), the latter kept in MEMO with the codes."""
from __future__ import annotations

import numpy as np
import torch

from .fingerprint import MEMO


def _count(t: torch.Tensor) -> tuple[int, int]:
    t = t.detach()
    if t.is_quantized:
        r = t.int_repr()
        if t.qscheme() == torch.per_channel_affine_float_qparams:   # zero points are floats
            return r.numel(), int(torch.count_nonzero(t.dequantize()).item())
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return code_counts(r, t.q_per_channel_zero_points(), t.q_per_channel_axis())
        return code_counts(r, zero_point=int(t.q_zero_point()))
    return t.numel(), nonzero_count(t)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_SIGNED_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def nonzero_count(t: torch.Tensor) -> int:
    """``torch.count_nonzero(t)`` (``-0.0`` is zero, NaN is not), counted by numpy for a plain
    CPU tensor: 10-30x faster than torch's float kernel on one thread. Floats numpy lacks
    (bfloat16, float8) are counted on their bits with the sign shifted out (``+0.0`` and ``-0.0``
    are the only patterns that become 0)."""
    t = t.detach()
    if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided
            or t.is_quantized or t.is_complex() or t.is_conj() or t.is_neg() or t.numel() == 0
            or t.element_size() not in _SIGNED_VIEW):
        return int(torch.count_nonzero(t).item())
    try:
        if t.dtype in _NUMPY_FLOATS or not t.is_floating_point():
            return int(np.count_nonzero(t.numpy()))
        bits = t.contiguous().view(_SIGNED_VIEW[t.element_size()]).numpy()
        return int(np.count_nonzero(bits << 1))
    except (TypeError, RuntimeError):           # a dtype numpy does not have (uint16 ...)
        return int(torch.count_nonzero(t).item())


def code_counts(codes: torch.Tensor, zero_points: torch.Tensor | None = None, axis: int = 0,
                zero_point: int = 0) -> tuple[int, int]:
    """(entries, nonzero entries) of integer codes, an entry being zero when it equals its zero
    point: one per slice along ``axis`` (``zero_points``), else ``zero_point``. Compared in the
    codes' own integer type when the zero points fit it (no widened copy)."""
    if zero_points is not None:
        if not bool(zero_points.any()):
            return codes.numel(), nonzero_count(codes)
        shape = [1] * codes.dim()
        shape[axis] = -1
        zp = zero_points.reshape(shape)
        lo, hi = int(zp.min()), int(zp.max())
    elif zero_point == 0:
        return codes.numel(), nonzero_count(codes)
    else:
        zp = lo = hi = int(zero_point)
    info = torch.iinfo(codes.dtype)
    if info.min <= lo and hi <= info.max:
        zp = zp.to(codes.dtype) if isinstance(zp, torch.Tensor) else zp
    else:
        codes = codes.to(torch.int64)
    return codes.numel(), nonzero_count(codes != zp)


def plain_code_counts(tensors: dict, attrs: dict) -> tuple[int, int]:
    """:func:`code_counts` of the plain form of an int8 weight (``quantize.int8_plain``:
    ``weight_int8`` codes, per-channel ``weight_zero_points`` along ``weight_axis`` or one
    ``weight_zero_point``), kept in MEMO with the codes while they, the zero points and the axis
    stay as they are."""
    codes, zps = tensors["weight_int8"], tensors.get("weight_zero_points")
    axis, zp = int(attrs.get("weight_axis", 0)), int(attrs.get("weight_zero_point", 0))
    memo = MEMO.results(codes)
    key = ("code_counts", axis, zp, None if zps is None else MEMO.results_key(zps))
    got = memo.get(key)
    if got is None:
        got = memo[key] = code_counts(codes, zps, axis, zp)
    return got
