"""Low-rank factorisation and depthwise-separable layers: the ``%lowrank`` technique.

Architecture design compresses by changing the form of a layer. A Linear of ``M`` inputs and ``N``
outputs (``N*M`` weights) becomes two Linears through ``r`` units (``r*(M+N)`` weights) by a
truncated SVD ``W ~ U_r S_r V_r^T``. A ``k x k`` Conv2d becomes

- ``svd``: a ``k x k`` conv into ``r`` channels, then a ``1 x 1`` conv (the SVD of the kernel seen
  as an ``out x (in*k*k)`` matrix);
- ``tucker``: Tucker-2, a ``1 x 1`` conv into ``r_in`` channels, a ``k x k`` core conv into
  ``r_out`` channels, a ``1 x 1`` conv out (HOSVD, refined by alternating least squares);
- ``separable``: a depthwise ``k x k`` conv (``m`` filters per input channel, ``m`` the depth
  multiplier) then a pointwise ``1 x 1`` conv, fitted to the original kernel by the per-channel SVD,
  which is its least-squares optimum.

Every replacement is an ``nn.Sequential`` of standard ``nn.Linear`` / ``nn.Conv2d`` (so the safe
storage format rebuilds it with nothing custom); groups, stride, padding, dilation, padding mode
and bias are kept, and at full rank each one reproduces the original layer's outputs to float
tolerance. The first factor never has a bias and the last keeps the original bias.

Ranks come from one of ``rank`` (absolute), ``ratio`` (a fraction of each layer's full rank),
``energy`` (the share of squared singular values kept) or ``target_params`` (a parameter budget for
the whole model, allocated across layers by their singular values: the largest singular values of
all layers are kept, each measured by its share of its own layer's energy, down to the lowest share
whose model fits the budget; flat spectra keep many components, steep ones few). A layer whose
factorised form would not be smaller is kept as it is and named in the notes. The classifier (the
layer whose output is the model's output, found as structured pruning finds it) is kept whole
unless ``layers`` selects it, and the notes say so.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import BadInput, CompressionResult, StepConfig, StepContext, compress, register_technique
from ...train import output_layers

__all__ = [
    "LowRankConfig", "lowrank", "demo_config", "CONV_MODES",
    "svd_factorize_linear", "svd_factorize_conv", "tucker_factorize_conv",
    "separable_factorize_conv", "tucker_ranks_limit", "effective_weight", "relative_error",
    "recalibrate_batchnorm", "output_layers",
]

CONV_MODES = ("svd", "tucker", "separable", "none")
DEFAULT_ENERGY = 0.9
_EPS = 1e-9


# =========================================================================== small helpers

def _f64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float64)


def _new_linear(i: int, o: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(i, o, bias=bias, device=like.device, dtype=like.dtype)


def _new_conv(i: int, o: int, k, *, like: torch.Tensor, stride=1, padding=0, dilation=1,
              groups: int = 1, bias: bool = False, padding_mode: str = "zeros") -> nn.Conv2d:
    return nn.Conv2d(i, o, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=padding_mode, device=like.device, dtype=like.dtype)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _copy_bias(dst: nn.Module, src: nn.Module) -> None:
    if src.bias is not None:
        _set(dst.bias, src.bias)


def _ksize(conv: nn.Conv2d) -> int:
    return int(conv.kernel_size[0] * conv.kernel_size[1])


def _cum_energy(sq: torch.Tensor, length: int) -> torch.Tensor:
    """Cumulative share of energy for ranks 1..length from squared singular values ``sq`` (sorted
    in decreasing order, summed over blocks), padded with 1.0 up to ``length``."""
    sq = sq.to(torch.float64).cpu()
    total = float(sq.sum())
    if total <= 0:                        # an all-zero weight: rank 1 already keeps "everything"
        return torch.ones(length, dtype=torch.float64)
    cum = torch.cumsum(sq, 0) / total
    cum[-1] = 1.0
    if cum.numel() < length:
        cum = torch.cat([cum, torch.ones(length - cum.numel(), dtype=torch.float64)])
    return cum[:length].clamp(max=1.0)


def _rank_for_energy(cum: torch.Tensor, energy: float) -> int:
    idx = int(torch.searchsorted(cum, torch.tensor([energy - _EPS], dtype=torch.float64)).item())
    return min(idx + 1, cum.numel())


# =========================================================================== factorisers

def _svd_blocks(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of each group's ``out/g x (in/g * kh * kw)`` matrix, in float64: (U, S, Vh) batched by
    group."""
    o = w.shape[0]
    mats = _f64(w).reshape(groups, o // groups, -1)
    return torch.linalg.svd(mats, full_matrices=False)


def svd_factorize_linear(layer: nn.Linear, rank: int, *, _svd=None) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Sequential(Linear(in, rank, bias=False), Linear(rank, out))`` by
    the truncated SVD (the best rank-``rank`` approximation in Frobenius norm)."""
    w = layer.weight
    u, s, vh = _svd if _svd is not None else _svd_blocks(w, 1)
    r = int(rank)
    if not 1 <= r <= s.shape[-1]:
        raise BadInput(f"rank {r} is outside 1..{s.shape[-1]} for a {tuple(w.shape)} weight")
    root = s[0, :r].sqrt()
    first = _new_linear(layer.in_features, r, False, w)
    second = _new_linear(r, layer.out_features, layer.bias is not None, w)
    _set(first.weight, root[:, None] * vh[0, :r])
    _set(second.weight, u[0, :, :r] * root[None, :])
    _copy_bias(second, layer)
    return nn.Sequential(first, second)


def svd_factorize_conv(conv: nn.Conv2d, rank: int, *, _svd=None) -> nn.Sequential:
    """``k x k`` Conv2d -> ``Sequential(k x k conv into rank*groups channels, 1 x 1 conv)``.

    Each group's kernel, seen as an ``out/g x (in/g*kh*kw)`` matrix, is cut to rank ``rank`` by
    its SVD; the first conv keeps stride, padding, dilation, padding mode and groups, the second
    (1 x 1, same groups) keeps the bias."""
    w = conv.weight
    g = conv.groups
    u, s, vh = _svd if _svd is not None else _svd_blocks(w, g)
    r = int(rank)
    if not 1 <= r <= s.shape[-1]:
        raise BadInput(f"rank {r} is outside 1..{s.shape[-1]} for a {tuple(w.shape)} kernel")
    o, ci, kh, kw = w.shape                     # ci = in_channels / groups
    root = s[:, :r].sqrt()                      # (g, r)
    first = _new_conv(conv.in_channels, g * r, conv.kernel_size, like=w, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=g,
                      padding_mode=conv.padding_mode)
    second = _new_conv(g * r, o, 1, like=w, groups=g, bias=conv.bias is not None)
    _set(first.weight, (root[:, :, None] * vh[:, :r]).reshape(g * r, ci, kh, kw))
    _set(second.weight, (u[:, :, :r] * root[:, None, :]).reshape(o, r, 1, 1))
    _copy_bias(second, conv)
    return nn.Sequential(first, second)


def _tucker_spectra(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values of the output-mode and input-mode unfoldings (HOSVD), summed over
    groups: (out_energy, in_energy)."""
    o, ci, kh, kw = w.shape
    wg = _f64(w).reshape(groups, o // groups, ci, kh * kw)
    s_out = torch.linalg.svdvals(wg.reshape(groups, o // groups, ci * kh * kw))
    s_in = torch.linalg.svdvals(wg.transpose(1, 2).reshape(groups, ci, (o // groups) * kh * kw))
    return (s_out ** 2).sum(0), (s_in ** 2).sum(0)


def _top_left(m: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of each matrix in the batch ``m`` (b, p, q)."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :, :r]


def tucker_ranks_limit(conv: nn.Conv2d) -> tuple[int, int]:
    """The largest useful (r_out, r_in) for a Tucker-2 of ``conv``: the ranks of its unfoldings."""
    o, ci, kh, kw = conv.weight.shape
    og = o // conv.groups
    return min(og, ci * kh * kw), min(ci, og * kh * kw)


def tucker_factorize_conv(conv: nn.Conv2d, ranks: tuple[int, int], *, iters: int = 10) -> nn.Sequential:
    """Tucker-2 of a Conv2d: ``Sequential(1x1 conv in -> r_in*g, kxk core conv r_in*g -> r_out*g,
    1x1 conv r_out*g -> out)``, ``ranks = (r_out, r_in)`` per group.

    Factors from the HOSVD, refined by ``iters`` rounds of higher-order orthogonal iteration (ALS);
    the core conv keeps stride, padding, dilation, padding mode; every conv keeps the groups; the
    last keeps the bias. At full ranks the factors are orthogonal and the layer is exact."""
    w = conv.weight
    g = conv.groups
    o, ci, kh, kw = w.shape
    og = o // g
    lim_out, lim_in = tucker_ranks_limit(conv)
    r_out, r_in = int(ranks[0]), int(ranks[1])
    if not (1 <= r_out <= lim_out and 1 <= r_in <= lim_in):
        raise BadInput(f"Tucker ranks ({r_out}, {r_in}) are outside 1..({lim_out}, {lim_in}) for a "
                       f"{tuple(w.shape)} kernel with groups={g}")
    r_out = min(r_out, r_in * kh * kw)          # what a core with r_in inputs can span
    r_in = min(r_in, r_out * kh * kw)
    wg = _f64(w).reshape(g, og, ci, kh, kw)
    u_in = _top_left(wg.transpose(1, 2).reshape(g, ci, og * kh * kw), r_in)         # (g, ci, r_in)
    u_out = _top_left(wg.reshape(g, og, ci * kh * kw), r_out)                         # (g, og, r_out)
    for _ in range(max(0, int(iters))):
        y = torch.einsum("gocxy,gcr->gorxy", wg, u_in).reshape(g, og, r_in * kh * kw)
        u_out = _top_left(y, r_out)
        z = torch.einsum("gocxy,gos->gcsxy", wg, u_out).reshape(g, ci, r_out * kh * kw)
        u_in = _top_left(z, r_in)
    core = torch.einsum("gocxy,gos,gcr->gsrxy", wg, u_out, u_in)                     # (g, r_out, r_in, kh, kw)
    first = _new_conv(conv.in_channels, g * r_in, 1, like=w, groups=g)
    mid = _new_conv(g * r_in, g * r_out, conv.kernel_size, like=w, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=g,
                    padding_mode=conv.padding_mode)
    last = _new_conv(g * r_out, o, 1, like=w, groups=g, bias=conv.bias is not None)
    _set(first.weight, u_in.transpose(1, 2).reshape(g * r_in, ci, 1, 1))
    _set(mid.weight, core.reshape(g * r_out, r_in, kh, kw))
    _set(last.weight, u_out.reshape(o, r_out, 1, 1))
    _copy_bias(last, conv)
    return nn.Sequential(first, mid, last)


def _separable_svd(w: torch.Tensor, groups: int):
    """Per input channel SVD of its ``out/g x (kh*kw)`` slice of the kernel: (U, S, Vh) batched
    over the ``in_channels`` channels."""
    o, ci, kh, kw = w.shape
    og = o // groups
    per = _f64(w).reshape(groups, og, ci, kh * kw).permute(0, 2, 1, 3).reshape(groups * ci, og, kh * kw)
    return torch.linalg.svd(per, full_matrices=False)


def separable_factorize_conv(conv: nn.Conv2d, multiplier: int = 1, *, _svd=None) -> nn.Sequential:
    """Depthwise-separable form of a Conv2d: ``Sequential(depthwise kxk conv (in -> in*m,
    groups=in), pointwise 1x1 conv (in*m -> out, the original groups))``.

    The ``m`` depthwise filters of input channel ``c`` and their pointwise weights are the rank-``m``
    SVD of the ``out/g x (kh*kw)`` slice of the kernel that reads channel ``c``: the least-squares
    best separable kernel of that multiplier. The depthwise conv keeps stride, padding, dilation and
    padding mode; the pointwise conv keeps the groups and the bias. Exact when ``m`` reaches
    ``min(out/groups, kh*kw)``."""
    w = conv.weight
    g = conv.groups
    o, ci, kh, kw = w.shape
    c = conv.in_channels
    u, s, vh = _svd if _svd is not None else _separable_svd(w, g)      # (c, og, q), (c, q), (c, q, k)
    m = int(multiplier)
    if not 1 <= m <= s.shape[-1]:
        raise BadInput(f"depth multiplier {m} is outside 1..{s.shape[-1]} for a {tuple(w.shape)} kernel")
    root = s[:, :m].sqrt()
    depth = _new_conv(c, c * m, conv.kernel_size, like=w, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, groups=c, padding_mode=conv.padding_mode)
    point = _new_conv(c * m, o, 1, like=w, groups=g, bias=conv.bias is not None)
    _set(depth.weight, (root[:, :, None] * vh[:, :m]).reshape(c * m, 1, kh, kw))
    og = o // g
    # pointwise weight of group gi: (og, ci*m) with input index c_local*m + j
    pw = (u[:, :, :m] * root[:, None, :])                       # (c, og, m)
    pw = pw.reshape(g, ci, og, m).permute(0, 2, 1, 3).reshape(o, ci * m, 1, 1)
    _set(point.weight, pw)
    _copy_bias(point, conv)
    return nn.Sequential(depth, point)


# =========================================================================== reconstruction

def _dense_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's kernel as a dense ``out x in x kh x kw`` tensor (zeros outside its groups)."""
    w = _f64(conv.weight)
    g = conv.groups
    if g == 1:
        return w
    o, ci = w.shape[:2]
    og = o // g
    out = w.new_zeros(o, ci * g, *w.shape[2:])
    for gi in range(g):
        out[gi * og:(gi + 1) * og, gi * ci:(gi + 1) * ci] = w[gi * og:(gi + 1) * og]
    return out


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The single dense weight (float64; convs as ``out x in x kh x kw`` with zeros outside the
    groups) that ``module`` (a Linear, a Conv2d or a factorised Sequential of them) applies."""
    if isinstance(module, nn.Linear):
        return _f64(module.weight)
    if isinstance(module, nn.Conv2d):
        return _dense_kernel(module)
    if not isinstance(module, nn.Sequential) or len(module) == 0:
        raise TypeError(f"cannot compose a {type(module).__name__}")
    layers = list(module)
    if all(isinstance(m, nn.Linear) for m in layers):
        w = _f64(layers[0].weight)
        for m in layers[1:]:
            w = _f64(m.weight) @ w
        return w
    w = _dense_kernel(layers[0])
    for m in layers[1:]:
        b = _dense_kernel(m)
        if b.shape[2:] == (1, 1):
            w = torch.einsum("oc,cixy->oixy", b[:, :, 0, 0], w)
        elif w.shape[2:] == (1, 1):
            w = torch.einsum("ocxy,ci->oixy", b, w[:, :, 0, 0])
        else:
            raise TypeError("cannot compose two spatial convolutions into one kernel")
    return w


def relative_error(original: nn.Module, factorised: nn.Module) -> float:
    """``||W - W_hat|| / ||W||`` (Frobenius) between a layer and its factorised replacement."""
    w = effective_weight(original)
    w_hat = effective_weight(factorised).to(w.device)
    norm = float(torch.linalg.vector_norm(w))
    diff = float(torch.linalg.vector_norm(w - w_hat))
    return diff / norm if norm > 0 else diff


def recalibrate_batchnorm(model: nn.Module, loader, device=None, batches: int = 20) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` from up to
    ``batches`` batches of ``loader`` (the inputs only; no gradients, no weight changes).

    A factorised layer computes slightly different activations, so the statistics the BatchNorm
    layers after it learned no longer fit; re-estimating them (a cumulative average over the
    batches, with only the BatchNorm layers in training mode) recovers most of the accuracy lost
    before any fine-tuning. Returns the number of batches used (0: no BatchNorm layer, or an
    empty loader, and nothing changed)."""
    from ...core import model_device
    from ...train import forward_batch, split_batch, to_device

    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    device = torch.device(device) if device is not None else model_device(model)
    modes = {m: m.training for m in model.modules()}
    saved = {bn: (bn.momentum, {k: v.clone() for k, v in bn.state_dict().items()}) for bn in bns}
    n = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None              # cumulative moving average over the batches
        model.eval()
        for bn in bns:
            bn.train()
        with torch.no_grad():
            for batch in loader:
                if n >= batches:
                    break
                x, _ = split_batch(batch)
                x = to_device(x, device)
                forward_batch(model, x)
                n += 1
    finally:
        for bn, (momentum, state) in saved.items():
            bn.momentum = momentum
            if n == 0:
                bn.load_state_dict(state)
        for m, training in modes.items():
            m.train(training)
    return n


# =========================================================================== per-layer plans

class _Plan:
    """One layer to factorise: its spectrum (computed on demand), rank choices, cost, builder."""

    kind: ClassVar[str] = ""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        w = module.weight
        self.weight_params = int(w.numel())
        self.bias_params = int(module.bias.numel()) if module.bias is not None else 0
        self.dense_params = self.weight_params + self.bias_params
        self._cache = None

    # shape-only facts (validate uses them before any decomposition)
    def full(self):                      # full rank: int, or (r_out, r_in) for tucker
        raise NotImplementedError

    def max_full(self) -> int:
        f = self.full()
        return max(f) if isinstance(f, tuple) else f

    def params(self, rank) -> int:
        raise NotImplementedError

    def min_params(self) -> int:
        """Parameters of the layer in the form it takes at the smallest rank (or dense when that
        would not be smaller)."""
        f = self.full()
        one = (1, 1) if isinstance(f, tuple) else 1
        return min(self.dense_params, self.params(one))

    def shape(self) -> str:
        return "x".join(str(d) for d in self.module.weight.shape)

    # rank choices
    def cums(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _per_mode(self, fn):
        f = self.full()
        if isinstance(f, tuple):
            return tuple(fn(x, i) for i, x in enumerate(f))
        return fn(f, 0)

    def rank_for(self, *, rank=None, ratio=None, energy=None, share=None):
        if share is not None:
            # every singular value (rank component) carrying at least ``share`` of the layer's
            # energy, and at least one
            shares = [torch.diff(c, prepend=c.new_zeros(1)) for c in self.cums()]
            return self._per_mode(lambda f, i: max(1, int((shares[i] >= share).sum())))
        if rank is not None:
            return self._per_mode(lambda f, i: max(1, min(int(rank), f)))
        if ratio is not None:
            return self._per_mode(lambda f, i: max(1, min(f, math.ceil(float(ratio) * f - _EPS))))
        cums = self.cums()
        return self._per_mode(lambda f, i: _rank_for_energy(cums[i], float(energy)))

    def build(self, rank) -> nn.Sequential:
        raise NotImplementedError

    def rank_text(self, rank) -> str:
        return "/".join(str(r) for r in rank) if isinstance(rank, tuple) else str(rank)


class _SVDPlan(_Plan):
    """Linear, or Conv2d with ``conv=svd`` (and any 1x1 conv): the kernel as a matrix per group."""

    def __init__(self, name, module):
        super().__init__(name, module)
        if isinstance(module, nn.Linear):
            self.kind = "linear-svd"
            self.groups, self.out_g, self.in_g = 1, module.out_features, module.in_features
        else:
            self.kind = "conv-svd"
            g = module.groups
            o, ci, kh, kw = module.weight.shape
            self.groups, self.out_g, self.in_g = g, o // g, ci * kh * kw

    def full(self) -> int:
        return min(self.out_g, self.in_g)

    def params(self, rank) -> int:
        return self.groups * int(rank) * (self.out_g + self.in_g) + self.bias_params

    def _svd(self):
        if self._cache is None:
            self._cache = _svd_blocks(self.module.weight, self.groups)
        return self._cache

    def cums(self):
        _, s, _ = self._svd()
        return [_cum_energy((s ** 2).sum(0), self.full())]

    def build(self, rank):
        if isinstance(self.module, nn.Linear):
            return svd_factorize_linear(self.module, rank, _svd=self._svd())
        return svd_factorize_conv(self.module, rank, _svd=self._svd())


class _TuckerPlan(_Plan):
    kind = "conv-tucker"

    def __init__(self, name, module):
        super().__init__(name, module)
        g = module.groups
        o, ci, kh, kw = module.weight.shape
        self.groups, self.out_g, self.in_g, self.k = g, o // g, ci, kh * kw

    def full(self):
        return tucker_ranks_limit(self.module)

    def params(self, rank) -> int:
        r_out, r_in = int(rank[0]), int(rank[1])
        return self.groups * (self.in_g * r_in + r_in * r_out * self.k + r_out * self.out_g) + self.bias_params

    def rank_for(self, **kw):
        r_out, r_in = super().rank_for(**kw)
        r_out = min(r_out, r_in * self.k)           # what a core with r_in inputs can span
        return r_out, min(r_in, r_out * self.k)

    def cums(self):
        if self._cache is None:
            e_out, e_in = _tucker_spectra(self.module.weight, self.groups)
            f_out, f_in = self.full()
            self._cache = [_cum_energy(e_out, f_out), _cum_energy(e_in, f_in)]
        return self._cache

    def build(self, rank):
        return tucker_factorize_conv(self.module, rank)


class _SeparablePlan(_Plan):
    kind = "conv-separable"

    def __init__(self, name, module):
        super().__init__(name, module)
        g = module.groups
        o, ci, kh, kw = module.weight.shape
        self.groups, self.out_g, self.c, self.k = g, o // g, module.in_channels, kh * kw

    def full(self) -> int:
        return min(self.out_g, self.k)

    def params(self, rank) -> int:
        m = int(rank)
        return self.c * m * self.k + self.out_g * self.c * m + self.bias_params

    def _svd(self):
        if self._cache is None:
            self._cache = _separable_svd(self.module.weight, self.groups)
        return self._cache

    def cums(self):
        _, s, _ = self._svd()
        return [_cum_energy((s ** 2).sum(0), self.full())]

    def build(self, rank):
        return separable_factorize_conv(self.module, rank, _svd=self._svd())


def _make_plan(name: str, module: nn.Module, conv_mode: str) -> _Plan:
    if isinstance(module, nn.Linear) or _ksize(module) == 1 or conv_mode == "svd":
        return _SVDPlan(name, module)
    if conv_mode == "tucker":
        return _TuckerPlan(name, module)
    return _SeparablePlan(name, module)


# =========================================================================== the step

_FACTORABLE = (nn.Linear, nn.Conv2d)


def _parse_target(value, total: int) -> int:
    """``target_params``: an absolute count (> 1), a fraction of the current count (0 < f < 1), or
    ``"Nx"`` for N times fewer."""
    text = str(value).strip().lower()
    try:
        if text.endswith("x"):
            times = float(text[:-1])
            if not times > 1:
                raise ValueError
            return int(total / times)
        v = float(text)
    except ValueError:
        raise BadInput(f"--target-params must be a parameter count (80000), a fraction of the "
                       f"current count (0.33) or N times fewer (3x); got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise BadInput(f"--target-params must be positive, got {value!r}")
    if v < 1:
        return int(v * total)
    if v != int(v):
        raise BadInput(f"--target-params as a count must be a whole number, got {value!r}")
    return int(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@register_technique
@dataclass
class LowRankConfig(StepConfig):
    """Factorise Linear and Conv2d layers into low-rank or depthwise-separable forms.

    Rank (at most one of): ``rank`` (an absolute rank for every layer, capped at each layer's full
    rank; for ``conv="separable"`` the depth multiplier; for ``tucker`` both ranks), ``ratio`` (a
    fraction of each layer's full rank, in (0, 1]), ``energy`` (the share of squared singular
    values kept, in (0, 1]) or ``target_params`` (the model's parameter count after: a count, a
    fraction like 0.33, or "3x" fewer; ranks allocated across layers by singular values: every
    component carrying at least a threshold share of its own layer's energy is kept, the lowest
    threshold that fits). Without any: ``energy=0.9``, and depth multiplier 1 for ``conv="separable"``.

    ``layers``: a regular expression searched in layer names (default: every Linear and Conv2d
    except the classifier, the layer(s) whose output is the model's output, which is kept whole
    and named in the notes; a ``layers`` pattern that matches the classifier factorises it too).
    ``conv``: ``svd`` | ``tucker`` | ``separable`` | ``none`` (leave convs alone); 1x1 convs are
    always factorised by SVD.

    ``data``: a DataLoader whose first ``calib_batches`` batches re-estimate the BatchNorm
    statistics after factorising (default: the ``finetune`` loader; no BatchNorm, nothing to do).
    ``finetune``: a DataLoader to fine-tune on afterwards with the shared
    :func:`nbcompress.train.fit` for ``epochs`` (Adam at ``lr``, decayed to 0 along a cosine with
    the default ``scheduler="cosine"``; ``None`` keeps it constant), seeded by ``seed``. The
    default lr, 3e-4, suits mild factorisations; heavy ones (``conv="separable"``) recover
    better at 1e-3.

    The result has one row per factorised layer: ``layer``, ``kind`` (linear-svd, conv-svd,
    conv-tucker, conv-separable), ``shape`` of the original weight, ``rank`` (tucker: out/in;
    separable: the depth multiplier) and ``full_rank``, ``params_before``/``params_after``,
    ``flops_before``/``flops_after`` (one forward of the example input, by
    ``torch.utils.flop_counter``), ``rel_error`` ``||W - W_hat|| / ||W||`` measured on the layers
    built, and ``energy_kept`` ``1 - rel_error**2`` (the share of ``||W||^2`` kept).
    """

    technique: ClassVar[str] = "lowrank"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    target_params: Any = None
    layers: str | None = None
    conv: str = "svd"
    finetune: Any = None
    epochs: int = 1
    lr: float = 3e-4
    scheduler: str | None = "cosine"
    data: Any = None
    calib_batches: int = 20
    seed: int | None = 0

    # ------------------------------------------------------------------ checks
    def _mode(self) -> str:
        given = [n for n in ("rank", "ratio", "energy", "target_params") if getattr(self, n) is not None]
        if len(given) > 1:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise BadInput(f"give at most one of --rank, --ratio, --energy, --target-params (got {flags})")
        return given[0] if given else "default"

    def _candidates(self, model: nn.Module, example: Any = None
                    ) -> tuple[list[tuple[str, nn.Module, list[str]]], list[str]]:
        """(layers to consider as (name, module, all paths), notes on layers passed over).
        ``example``: an input the model runs on, to find the classifier (:func:`output_layers`)."""
        paths: dict[int, list[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            if type(m) in _FACTORABLE:
                paths.setdefault(id(m), []).append(name)
        found = [(ps[0], m, ps) for m in model.modules() if (ps := paths.get(id(m)))]
        every = [(n, m) for n, m, _ in found]
        if not found:
            kinds = Counter(type(m).__name__ for m in model.modules()
                            if m is not model and not any(True for _ in m.children()))
            what = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(kinds.items())) or \
                f"only the {type(model).__name__} itself, no sub-modules"
            raise BadInput(f"no nn.Linear or nn.Conv2d layer to factorise in this "
                           f"{type(model).__name__} (found: {what})")
        notes: list[str] = []
        if self.conv == "none":
            convs = [n for n, m, _ in found if isinstance(m, nn.Conv2d)]
            found = [f for f in found if isinstance(f[1], nn.Linear)]
            if not found:
                raise BadInput(f"--conv none leaves nothing to factorise: the model's layers are "
                               f"all Conv2d ({', '.join(convs[:6])}{', ...' if len(convs) > 6 else ''})")
        if self.layers is not None:
            try:
                pat = re.compile(self.layers)
            except re.error as e:
                raise BadInput(f"--layers {self.layers!r} is not a valid regular expression: {e}") from None
            names = [n for n, _, _ in found]
            found = [f for f in found if any(pat.search(p) for p in f[2])]
            if not found:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise BadInput(f"--layers {self.layers!r} matches no Linear/Conv2d layer "
                               f"(the layers are: {shown})")
        if self.layers is None:
            # the layer(s) producing the model's output stay whole unless --layers selects them:
            # a low rank there cuts straight into the class scores for a small saving
            outs = output_layers(model, every, example)
            heads = [f for f in found if f[0] in outs]
            if heads:
                found = [f for f in found if f[0] not in outs]
                names = ", ".join(n for n, _, _ in heads)
                many = len(heads) > 1
                if not found:
                    raise BadInput(f"the only layer{'s' if many else ''} to factorise "
                                   f"{'are the classifiers' if many else 'is the classifier'} "
                                   f"{names} (producing the model's output), kept whole by "
                                   f"default: give --layers to factorise "
                                   f"{'them' if many else 'it'} anyway (--layers . selects every "
                                   f"layer)")
                n_head = sum(_own_params(m) for _, m, _ in heads)
                total = sum(p.numel() for p in model.parameters())
                share = f"{100 * n_head / total:.2g}%" if total else "?"
                notes.append(f"kept the classifier{'s' if many else ''} {names} whole "
                             f"({'they produce' if many else 'it produces'} the model's output; "
                             f"{n_head:,} parameters, {share} of the model): use --layers to "
                             f"include {'them' if many else 'it'} (--layers . selects every layer)")
        # parameters shared with another module (weight tying) cannot be replaced in one place
        owners: dict[int, set[str]] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            for pname, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), set()).add(f"{mname}.{pname}" if mname else pname)
        kept = []
        for name, m, ps in found:
            shared = {o for o in owners.get(id(m.weight), ()) if not any(o == f"{p}.weight" for p in ps)}
            if shared:
                notes.append(f"kept {name}: its weight is shared with {sorted(shared)[0]}")
                continue
            kept.append((name, m, ps))
        if not kept:
            raise BadInput("no layer left to factorise: " + "; ".join(notes))
        return kept, notes

    def validate(self, model: nn.Module) -> None:
        mode = self._mode()
        if self.conv not in CONV_MODES:
            raise BadInput(f"--conv must be one of {', '.join(CONV_MODES)}; got {self.conv!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0):
            raise BadInput(f"--rank must be a positive whole number, got {self.rank!r}")
        for name in ("ratio", "energy"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or not 0 < v <= 1):
                raise BadInput(f"--{name} must be in (0, 1], got {v!r}")
        from ...metrics import is_loader

        for name in ("finetune", "data"):
            v = getattr(self, name)
            if v is not None and not is_loader(v):
                raise BadInput(f"--{name} must be a DataLoader, got {type(v).__name__}")
        if self.scheduler not in (None, "cosine"):
            raise BadInput(f"scheduler must be 'cosine' or None, got {self.scheduler!r}")
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) \
                or self.calib_batches <= 0:
            raise BadInput(f"calib_batches must be a positive whole number, got {self.calib_batches!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs <= 0:
            raise BadInput(f"--epochs must be a positive whole number, got {self.epochs!r}")
        if not _is_number(self.lr) or not self.lr > 0 or not math.isfinite(self.lr):
            raise BadInput(f"--lr must be a positive number, got {self.lr!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise BadInput(f"seed must be a whole number, got {self.seed!r}")
        if self.layers is not None and not isinstance(self.layers, str):
            raise BadInput(f"--layers must be a regular expression (a string), got "
                           f"{type(self.layers).__name__}")
        if self.finetune is None:
            unused = [f for f, on in (("--epochs", self.epochs != 1), ("--lr", self.lr != 3e-4))
                      if on]
            if unused:
                flags = " and ".join(unused)
                raise BadInput(f"{flags} only appl{'y' if len(unused) > 1 else 'ies'} to "
                               f"fine-tuning: give --finetune LOADER too (or leave out {flags})")
        cands, _ = self._candidates(model, self._loader_example(model))
        plans = [_make_plan(n, m, self.conv) for n, m, _ in cands]
        if mode == "rank":
            best = max(plans, key=lambda p: p.max_full())
            if self.rank > best.max_full():
                raise BadInput(f"--rank {self.rank} is above the full rank of every selected layer "
                               f"(the largest is {best.max_full()}, {best.name})")
        if mode == "target_params":
            from ...metrics import count_params

            total = count_params(model)[0]
            target = _parse_target(self.target_params, total)
            if target >= total:
                raise BadInput(f"--target-params {self.target_params} asks for {target:,} parameters; "
                               f"the model already has {total:,}")
            floor = total - sum(p.dense_params - p.min_params() for p in plans)
            if target < floor:
                raise BadInput(f"--target-params {self.target_params} ({target:,}) cannot be reached: "
                               f"rank 1 in every selected layer still leaves {floor:,} parameters")

    def _loader_example(self, model: nn.Module, device=None) -> Any:
        """Two inputs from the first batch of ``data`` or ``finetune`` (None without a loader), on
        ``device`` (default: the model's)."""
        from ...core import model_device
        from ...train import peek_batch, split_batch, to_device

        loader = self.data if self.data is not None else self.finetune
        if loader is None:
            return None
        try:
            x, _ = split_batch(peek_batch(loader))
        except BadInput:
            return None
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 2:
            x = x[:2]
        return to_device(x, device if device is not None else model_device(model))

    # ------------------------------------------------------------------ the work
    def _allocate(self, plans: list[_Plan], model: nn.Module) -> dict[str, Any]:
        mode = self._mode()
        if mode == "rank":
            return {p.name: p.rank_for(rank=self.rank) for p in plans}
        if mode == "ratio":
            return {p.name: p.rank_for(ratio=self.ratio) for p in plans}
        if mode == "energy":
            return {p.name: p.rank_for(energy=self.energy) for p in plans}
        if mode == "default":
            return {p.name: (1 if isinstance(p, _SeparablePlan) else p.rank_for(energy=DEFAULT_ENERGY))
                    for p in plans}
        from ...metrics import count_params

        total = count_params(model)[0]
        target = _parse_target(self.target_params, total)
        fixed = total - sum(p.dense_params for p in plans)

        def cost(t: float) -> int:
            return fixed + sum(min(p.dense_params, p.params(p.rank_for(share=t))) for p in plans)

        # Keep the largest singular values across all layers, each measured as its share of its
        # own layer's energy, down to the lowest share whose model fits the budget. The cost only
        # grows as the threshold falls; at the largest share every layer is at rank 1 (feasible:
        # validated), so bisect over the shares that occur.
        levels = sorted({float(v) for p in plans for c in p.cums()
                         for v in torch.diff(c, prepend=c.new_zeros(1)).tolist() if v > 0})
        lo, hi = 0, len(levels) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(levels[mid]) <= target:
                hi = mid
            else:
                lo = mid + 1
        self._threshold = levels[lo]
        return {p.name: p.rank_for(share=levels[lo]) for p in plans}

    def run(self, model: nn.Module, ctx: StepContext) -> CompressionResult:
        from ...metrics import count_flops
        from ...train import fit, to_device

        from ...train import check_loader_runs

        check_loader_runs(model, self.finetune, "--finetune", ctx.device)
        check_loader_runs(model, self.data, "--data", ctx.device, labels=False)  # BN statistics
        example = (to_device(ctx.example_input, ctx.device) if ctx.example_input is not None
                   else self._loader_example(model, ctx.device))
        cands, notes = self._candidates(model, example)
        if self._mode() == "default" and self.conv == "separable":
            # multiplier 1 on a conv that reads one channel per group is a rank-1 conv (every
            # output a scaled copy of one filter response): keep it, as MobileNet keeps its stem
            single = [n for n, m, _ in cands
                      if isinstance(m, nn.Conv2d) and m.in_channels == m.groups and _ksize(m) > 1]
            if single:
                notes.append("kept " + ", ".join(single) + ": one input channel per group, so depth "
                             "multiplier 1 would leave a rank-1 conv (give --rank or --energy to "
                             "factorise it anyway)")
                cands = [c for c in cands if c[0] not in single]
        paths = {n: ps for n, _, ps in cands}
        x = to_device(ctx.example_input, ctx.device) if ctx.example_input is not None else None
        flops_before = count_flops(model, x)[2] if x is not None else {}
        plans = [_make_plan(n, m, self.conv) for n, m, _ in cands]
        self._threshold = None
        ranks = self._allocate(plans, model)

        rows, skipped, replaced = [], [], {}
        extra: dict = {}
        for p in plans:
            r = ranks[p.name]
            after = p.params(r)
            if after >= p.dense_params:
                skipped.append(f"{p.name} (rank {p.rank_text(r)}: {after:,} >= {p.dense_params:,} params)")
                continue
            new = p.build(r)
            for path in paths[p.name]:
                _replace(model, path, new)
            replaced[p.name] = new
            err = relative_error(p.module, new)
            rows.append({"layer": p.name, "kind": p.kind, "shape": p.shape(), "rank": p.rank_text(r),
                         "full_rank": p.rank_text(p.full()),
                         "params_before": p.dense_params, "params_after": after,
                         "flops_before": flops_before.get(p.name), "flops_after": None,
                         "energy_kept": round(max(0.0, 1.0 - err * err), 6),
                         "rel_error": round(err, 6)})
        if skipped:
            notes.append("kept dense (factorising would not save parameters): " + ", ".join(skipped))
        if not rows:
            notes.append("no layer was factorised: every selected layer would grow at these ranks")
        if x is not None and rows:
            per_leaf = count_flops(model, x)[2]
            for row in rows:
                pre = paths[row["layer"]][0] + "."
                row["flops_after"] = sum(v for k, v in per_leaf.items() if k.startswith(pre))
        if self._threshold is not None:
            notes.append(f"ranks allocated across layers by singular values: each kept component "
                         f"carries at least {100 * self._threshold:.3g}% of its layer's energy")
            extra["share_threshold"] = self._threshold
        n_1x1 = [p.name for p in plans if p.kind == "conv-svd" and self.conv in ("tucker", "separable")
                 and p.name in replaced]
        if n_1x1:
            notes.append(f"1x1 convs factorised by SVD (--conv {self.conv} needs a spatial kernel): "
                         + ", ".join(n_1x1))
        if rows:
            extra["layers_factorised"] = len(rows)
            extra["params_saved"] = sum(r["params_before"] - r["params_after"] for r in rows)
        calib = self.data if self.data is not None else self.finetune
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if rows and has_bn:
            if calib is not None:
                n = recalibrate_batchnorm(model, calib, ctx.device, self.calib_batches)
                if n:
                    notes.append(f"re-estimated BatchNorm statistics on {n} batch{'es' if n != 1 else ''}")
            else:
                notes.append("BatchNorm statistics not re-estimated: pass --data LOADER (or "
                             "--finetune) to fit them to the factorised layers")
        if self.finetune is not None and rows:
            if ctx.evaluator is not None:
                extra["accuracy_before_finetune"] = ctx.evaluate(model)
            hist = fit(model, self.finetune, epochs=self.epochs, lr=self.lr, device=ctx.device,
                       scheduler=self.scheduler, progress=ctx.progress, desc="lowrank fine-tune",
                       seed=self.seed)
            extra["finetune_loss"] = round(hist[-1]["loss"], 6)
            notes.append(f"fine-tuned {self.epochs} epoch{'s' if self.epochs != 1 else ''} at lr "
                         f"{self.lr:g}" + (f" ({self.scheduler} decay)" if self.scheduler else ""))
        model.eval()
        return CompressionResult(model, layers=rows, notes=notes, extra=extra)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


# =========================================================================== API

def lowrank(model: nn.Module, *, evaluator: Any = None, example_input: Any = None,
            device: Any = None, **options) -> nn.Module:
    """Return a factorised copy of ``model`` (the model passed in is not changed).

    ``options`` are :class:`LowRankConfig` fields: ``rank``, ``ratio``, ``energy``,
    ``target_params``, ``layers``, ``conv``, ``finetune``, ``epochs``, ``lr``, ``seed``,
    ``progress``. For the per-layer report call ``compress(model, LowRankConfig(...))``.
    """
    LowRankConfig.check_options(options, "lowrank", exclude={"device"})
    config = LowRankConfig(device=device, **options)
    return compress(model, config, evaluator=evaluator, example_input=example_input,
                    device=device).model


def demo_config(train_loader, test_loader) -> tuple[str, LowRankConfig]:
    """The terminal demo's step: LeNet-300-100 to 3x fewer parameters by SVD, ranks allocated
    across layers by singular values, then one epoch of fine-tuning."""
    return ("%lowrank model --target-params 3x --finetune train_loader --epochs 1",
            LowRankConfig(target_params="3x", finetune=train_loader, epochs=1, lr=3e-4,
                          progress=False))
