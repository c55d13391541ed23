"""FitNets-style feature hints: a learned adapter maps a student layer's output onto a teacher
layer's (1x1 conv for feature maps, linear otherwise); trained with the student, dropped after."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from ...core import FieldError

__all__ = ["adapter_spec", "make_adapter", "describe_adapter"]

_MAX_FLAT = 50_000_000      # weights of a flattened adapter we agree to train


def adapter_spec(s_name: str, t_name: str, s_shape, t_shape) -> tuple:
    """(kind, in, out, size) of the adapter from a student output shape to a teacher's; raises
    when no reasonable adapter exists."""
    s_shape, t_shape = tuple(s_shape), tuple(t_shape)
    if len(s_shape) == 4 and len(t_shape) == 4:
        return ("conv", s_shape[1], t_shape[1], t_shape[2:])
    if len(s_shape) == len(t_shape) and len(s_shape) >= 2 and s_shape[1:-1] == t_shape[1:-1]:
        return ("linear", s_shape[-1], t_shape[-1], None)
    s_n, t_n = math.prod(s_shape[1:]), math.prod(t_shape[1:])
    if s_n * t_n > _MAX_FLAT:
        raise FieldError(f"{{features='{s_name}:{t_name}'}}: the outputs "
                         f"(N, {', '.join(map(str, s_shape[1:]))}) and "
                         f"(N, {', '.join(map(str, t_shape[1:]))}) would need a "
                         f"{s_n:,}x{t_n:,} adapter; pick layers whose outputs match better")
    return ("flat", s_n, t_n, t_shape[1:])


class _ConvAdapter(nn.Module):
    def __init__(self, c_in: int, c_out: int, size: tuple):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1)
        self.size = tuple(size)

    def forward(self, x):
        y = self.proj(x)
        if tuple(y.shape[2:]) != self.size:
            if y.shape[2] >= self.size[0] and y.shape[3] >= self.size[1]:
                y = F.adaptive_avg_pool2d(y, self.size)
            else:
                y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False)
        return y


class _FlatAdapter(nn.Module):
    def __init__(self, n_in: int, n_out: int, out_shape: tuple):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)
        self.out_shape = tuple(out_shape)

    def forward(self, x):
        return self.proj(x.flatten(1)).reshape((x.shape[0],) + self.out_shape)


def make_adapter(spec: tuple) -> nn.Module:
    kind, a, b, size = spec
    if kind == "conv":
        return _ConvAdapter(a, b, size)
    if kind == "linear":
        return nn.Linear(a, b)
    return _FlatAdapter(a, b, size)


def describe_adapter(ad: nn.Module) -> str:
    if isinstance(ad, _ConvAdapter):
        return f"1x1 conv {ad.proj.in_channels}->{ad.proj.out_channels}"
    if isinstance(ad, _FlatAdapter):
        return f"linear (flattened) {ad.proj.in_features}->{ad.proj.out_features}"
    return f"linear {ad.in_features}->{ad.out_features}"
