"""The plain form of a torch.ao packed int8 weight: int8 codes, scales, zero points and float bias
as plain tensors (what :mod:`nbcompress.storage` writes and counting reads), made once when the
weight is packed and kept beside it (:class:`Plain`), so looking at a layer never unpacks it."""
from __future__ import annotations

import math

import torch

from ...counting import _count, plain_code_counts
from .qmodules import compact_float, quiet

with quiet():
    import torch.ao.nn.quantized as _nnq  # noqa: E402  (deprecated upstream: see int8.py)

__all__ = ["qweight_export", "qweight_import", "bias_import", "count_qweight", "Plain",
           "PlainPacked"]


def qweight_export(qw: torch.Tensor) -> tuple[dict, dict]:
    """(tensors, attributes) that describe an int8 quantized weight exactly."""
    tensors = {"weight_int8": qw.int_repr()}
    if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        tensors["weight_scales"] = compact_float(qw.q_per_channel_scales())
        zp = qw.q_per_channel_zero_points()
        if bool((zp != 0).any()):
            tensors["weight_zero_points"] = zp.to(torch.int32)
        attrs = {"weight_axis": int(qw.q_per_channel_axis())}
    else:
        attrs = {"weight_scale": float(qw.q_scale()), "weight_zero_point": int(qw.q_zero_point())}
    return tensors, attrs


def qweight_import(tensors: dict, attrs: dict, shape: tuple) -> torch.Tensor:
    w = tensors.get("weight_int8")
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or tuple(w.shape) != tuple(shape):
        raise ValueError(f"int8 weight missing or of the wrong shape/dtype (expected "
                         f"{tuple(shape)})")
    if "weight_scales" in tensors:
        s = tensors["weight_scales"].double()
        axis = int(attrs.get("weight_axis", 0))
        if s.dim() != 1 or s.numel() != w.shape[axis] or not bool((s > 0).all()):
            raise ValueError("per-channel weight scales do not match the weight")
        zp = tensors.get("weight_zero_points")
        zp = torch.zeros(s.numel(), dtype=torch.long) if zp is None else zp.long()
        if zp.numel() != s.numel():
            raise ValueError("per-channel zero points do not match the weight")
        return torch._make_per_channel_quantized_tensor(w, s, zp, axis)
    scale = float(attrs["weight_scale"])
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError("weight scale must be positive")
    return torch._make_per_tensor_quantized_tensor(w, scale, int(attrs["weight_zero_point"]))


def bias_import(tensors: dict, n: int):
    b = tensors.get("bias")
    if b is not None and (b.dim() != 1 or b.numel() != n):
        raise ValueError(f"bias of shape {tuple(b.shape)} does not match {n} outputs")
    return None if b is None else b.float()


def count_qweight(qw: torch.Tensor, bias) -> tuple[int, int]:
    """(params, nonzero): a weight entry is zero when its int8 code equals its zero point."""
    return _with_bias(_count(qw), bias)


def count_plain(tensors: dict, attrs: dict) -> tuple[int, int]:
    """``count_qweight`` from the plain form (int8 codes, zero points, bias)."""
    return _with_bias(plain_code_counts(tensors, attrs), tensors.get("bias"))


def _with_bias(counts: tuple[int, int], bias) -> tuple[int, int]:
    p, nz = counts
    if bias is not None:
        p += bias.numel()
        nz += int(torch.count_nonzero(bias).item())
    return p, nz


class Plain:
    """Keeps the plain form of the weight it packs (see the module's docstring): a mixin for the
    object whose ``set_weight_bias`` packs (the conv layer itself; a Linear's
    ``LinearPackedParams``). ``_weight_bias()`` rebuilds the quantized weight from it (a copy,
    not an unpack)."""

    def set_weight_bias(self, w, b) -> None:
        super().set_weight_bias(w, b)
        self._nbc_keep(w, b)

    def _nbc_keep(self, w, b) -> None:
        tensors, attrs = qweight_export(w)
        if b is not None:
            tensors["bias"] = b.detach().clone()
        self.__dict__["_nbc_plain"] = (tensors, attrs)

    def _nbc_plain_form(self) -> tuple[dict, dict]:
        plain = self.__dict__.get("_nbc_plain")
        if plain is None:             # packed by someone else (torch.ao's own loading paths)
            w, b = super()._weight_bias()
            self._nbc_keep(w, b)
            plain = self.__dict__["_nbc_plain"]
        return plain

    def _nbc_count(self) -> tuple[int, int]:
        # the codes' count is kept in MEMO while they (and the zero points) keep their values
        # (counting.plain_code_counts); a count kept on this object would miss an edit of the
        # codes in place or through .data
        return count_plain(*self._nbc_plain_form())

    def _weight_bias(self):
        tensors, attrs = self._nbc_plain_form()
        return qweight_import(tensors, attrs, tuple(tensors["weight_int8"].shape)), \
            tensors.get("bias")


class PlainPacked(Plain, _nnq.modules.linear.LinearPackedParams):
    """torch.ao's packed Linear weight, keeping its plain form."""

    def nbc_state(self) -> tuple[dict, dict]:
        """What the history's fingerprint looks at instead of this module's state dict (whose
        entry is a quantized weight rebuilt on every call): the kept plain tensors, and the
        packed dtype with the plain form's attributes."""
        tensors, attrs = self._nbc_plain_form()
        return tensors, dict(attrs, dtype=str(self.dtype))
