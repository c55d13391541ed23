"""Per-layer plans and the choice of ranks: each selected layer's spectrum (computed on demand),
its cost at a rank, and its builder; :func:`allocate` picks every layer's rank from ``rank``,
``ratio``, ``energy`` or a ``target_params`` budget for the whole model."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import FieldError
from .factorize import (_EPS, LargeBlocks, _cum_energy, _ksize, _large, _rank_for_energy,
                        _separable_svd, _svd_blocks, _tucker_spectra, relative_error,
                        separable_factorize_conv, svd_factorize_conv, svd_factorize_linear,
                        tucker_factorize_conv, tucker_ranks_limit)

DEFAULT_ENERGY = 0.9


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
        self._spectrum = None

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

    def error(self, new: nn.Module) -> float:
        """``||W - W_hat|| / ||W||`` of the replacement ``new`` :meth:`build` made."""
        return relative_error(self.module, new)

    def release(self) -> None:
        """Drop the decompositions kept (a large layer's Gram matrix and factors)."""
        self._cache = None

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

    def _svd(self, rank):
        """The SVD the factors come from: full (cached) for a small block, truncated to ``rank``
        for a large one (:class:`factorize.LargeBlocks`, its Gram matrix kept for both the
        spectrum and the factors)."""
        if _large(self.out_g, self.in_g):
            if self._cache is None:
                self._cache = LargeBlocks(self.module.weight, self.groups)
            return self._cache.top(rank)
        if self._cache is None:
            self._cache = _svd_blocks(self.module.weight, self.groups)
        return self._cache

    def cums(self):
        if self._spectrum is None:
            if _large(self.out_g, self.in_g):
                if self._cache is None:
                    self._cache = LargeBlocks(self.module.weight, self.groups)
                sq = self._cache.spectrum_sq()
            else:
                _, s, _ = self._svd(None)
                sq = s ** 2
            self._spectrum = [_cum_energy(sq.sum(0), self.full())]
        return self._spectrum

    def error(self, new: nn.Module) -> float:
        """A large block's error from the projection its factors are (``LargeBlocks``), else
        measured on the product of the factors."""
        if isinstance(self._cache, LargeBlocks) and self._cache.kept_sq is not None:
            return self._cache.relative_error()
        return super().error(new)

    def build(self, rank):
        # a large layer's factors skip the random initialisation they overwrite; a small one's
        # draw it as they always did (the random stream a notebook goes on with is unchanged)
        large = _large(self.out_g, self.in_g)
        if isinstance(self.module, nn.Linear):
            return svd_factorize_linear(self.module, rank, _svd=self._svd(rank), init=not large)
        return svd_factorize_conv(self.module, rank, _svd=self._svd(rank), init=not large)


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


def make_plan(name: str, module: nn.Module, conv_mode: str) -> _Plan:
    if isinstance(module, nn.Linear) or _ksize(module) == 1 or conv_mode == "svd":
        return _SVDPlan(name, module)
    if conv_mode == "tucker":
        return _TuckerPlan(name, module)
    return _SeparablePlan(name, module)


# =========================================================================== rank allocation

def parse_target(value, total: int) -> int:
    """``target_params``: an absolute count (> 1), a fraction of the current count (0 < f < 1), or
    ``"Nx"`` for N times fewer; the parameter count it asks for when the model has ``total``."""
    text = str(value).strip().lower()
    try:
        if text.endswith("x"):
            times = float(text[:-1])
            if not times > 1:
                raise ValueError
            return int(total / times)
        v = float(text)
    except ValueError:
        raise FieldError(f"{{target_params}} must be a parameter count (80000), a fraction of the "
                         f"current count (0.33) or N times fewer (3x); got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise FieldError(f"{{target_params}} must be positive, got {value!r}")
    if v < 1:
        return int(v * total)
    if v != int(v):
        raise FieldError(f"{{target_params}} as a count must be a whole number, got {value!r}")
    return int(v)


def check_target(value) -> str | None:
    """The declared check of ``target_params`` (its form; the budget is checked against the model
    in ``validate``): a message template, or None."""
    try:
        parse_target(value, 1)
    except FieldError as e:
        return e.template
    return None


def allocate(plans: list[_Plan], mode: str, value: Any, total: int
             ) -> tuple[dict[str, Any], float | None]:
    """Every plan's rank for ``mode`` (rank, ratio, energy, target_params or default) and its
    ``value``; ``total`` is the model's parameter count. Returns (ranks by layer name, the share
    threshold of a ``target_params`` allocation or None)."""
    if mode == "rank":
        return {p.name: p.rank_for(rank=value) for p in plans}, None
    if mode == "ratio":
        return {p.name: p.rank_for(ratio=value) for p in plans}, None
    if mode == "energy":
        return {p.name: p.rank_for(energy=value) for p in plans}, None
    if mode == "default":
        return {p.name: (1 if isinstance(p, _SeparablePlan) else p.rank_for(energy=DEFAULT_ENERGY))
                for p in plans}, None
    target = parse_target(value, total)
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
    return {p.name: p.rank_for(share=levels[lo]) for p in plans}, levels[lo]
