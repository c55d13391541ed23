"""The factorisations of ``%lowrank``: each turns one ``nn.Linear`` / ``nn.Conv2d`` into an
``nn.Sequential`` of standard layers, and :func:`relative_error` measures what was lost.

A Linear of ``M`` inputs and ``N`` outputs (``N*M`` weights) becomes two Linears through ``r``
units (``r*(M+N)`` weights) by a truncated SVD ``W ~ U_r S_r V_r^T``. A ``k x k`` Conv2d becomes

- ``svd``: a ``k x k`` conv into ``r`` channels, then a ``1 x 1`` conv (the SVD of the kernel seen
  as an ``out x (in*k*k)`` matrix);
- ``tucker``: Tucker-2, a ``1 x 1`` conv into ``r_in`` channels, a ``k x k`` core conv into
  ``r_out`` channels, a ``1 x 1`` conv out (HOSVD, refined by alternating least squares);
- ``separable``: a depthwise ``k x k`` conv (``m`` filters per input channel, ``m`` the depth
  multiplier) then a pointwise ``1 x 1`` conv, fitted to the original kernel by the per-channel SVD,
  which is its least-squares optimum.

Every replacement is an ``nn.Sequential`` of standard ``nn.Linear`` / ``nn.Conv2d`` (``config.py``
wraps it in :class:`.layer.LowRank`, which reads like the original layer); groups, stride, padding, dilation, padding mode
and bias are kept, and at full rank each one reproduces the original layer's outputs to float
tolerance. The first factor never has a bias and the last keeps the original bias.
"""
from __future__ import annotations

import torch
from torch import nn

from ...core import BadInput

__all__ = ["svd_factorize_linear", "svd_factorize_conv", "tucker_factorize_conv",
           "separable_factorize_conv", "tucker_ranks_limit", "effective_weight", "relative_error",
           "LargeBlocks"]

_EPS = 1e-9


# =========================================================================== small helpers

def _f64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float64)


def _make(cls, *args, init: bool = True, **kw) -> nn.Module:
    """A new layer; ``init=False``: its parameters left uninitialised (every one is overwritten
    with the factors: no random draws, which take seconds on a large layer)."""
    return cls(*args, **kw) if init else nn.utils.skip_init(cls, *args, **kw)


def _new_linear(i: int, o: int, bias: bool, like: torch.Tensor, init: bool = True) -> nn.Linear:
    return _make(nn.Linear, i, o, bias=bias, device=like.device, dtype=like.dtype, init=init)


def _new_conv(i: int, o: int, k, *, like: torch.Tensor, stride=1, padding=0, dilation=1,
              groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
              init: bool = True) -> nn.Conv2d:
    return _make(nn.Conv2d, i, o, k, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, bias=bias, padding_mode=padding_mode, device=like.device,
                 dtype=like.dtype, init=init)


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


# A block is "large" past this many multiply-adds of its full SVD (m * n * min(m, n)); below
# it the full float64 SVD runs as it always did (cheap, and results stay exactly as before).
# Setting it to infinity brings back the full SVD everywhere (benchmarks/bench_lowrank_speed.py
# times that path as the baseline).
_FULL_SVD_LIMIT = 1 << 28
# The cost model that picks how a large block's leading singular vectors are found, in
# GEMM-equivalent operations on one CPU thread (calibrated here: a GEMM ~93 GFLOP/s, eigh(4096)
# ~12.6 s, a k x q QR ~6x its 2kq^2 flops, svd_lowrank(4096x4096, q=1280) ~14 s).
_EIGH_FLOPS = 17.0                  # eigh of a k x k matrix with eigenvectors, per k^3
_QR_FLOPS = 12.0                    # QR of a p x q matrix, per p q^2
# Up to this size the eigenvectors of a Gram matrix come with its eigenvalues (eigh(1024) costs
# ~1.6x eigvalsh: cheaper than a second decomposition when the layer is then factorised); above
# it they cost ~4x, so the eigenvalues come alone and the vectors only for a layer factorised,
# unless the block is so wide or tall that it saves parameters up to ``_WIDE`` of its full rank
# (VGG's 4096 x 25088: 86%), where it is factorised at nearly any energy.
_VECTORS_WITH_SPECTRUM = 2048
_WIDE = 0.75
_POWER_ITERS = 4                    # torch.svd_lowrank on the weight
_GRAM_ITERS = 3                     # subspace iteration on the Gram matrix (G^4: ~ as accurate)


def _large(og: int, inner: int) -> bool:
    return og * inner * min(og, inner) > _FULL_SVD_LIMIT


def _gram(a: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``a @ a^T`` for a batch ``a`` (g, k, n), by blocks of rows, only those on and above the
    diagonal multiplied (the rest mirrored): ~(b+1)/2b of a full GEMM for b blocks."""
    k = a.shape[1]
    if k < 2 * block:
        return a @ a.transpose(1, 2)
    out = a.new_empty(a.shape[0], k, k)
    starts = range(0, k, block)
    for i in starts:
        ai = a[:, i:i + block]
        rest = a[:, i:].transpose(1, 2)
        prod = ai @ rest                               # (g, bi, k - i): row block i, from i on
        out[:, i:i + block, i:] = prod
        out[:, i + block:, i:i + block] = prod[:, :, ai.shape[1]:].transpose(1, 2)
    return out


class LargeBlocks:
    """Truncated SVDs of a large kernel matrix (each group's ``out/g x (in/g*kh*kw)`` block),
    in float32, without its full SVD.

    The spectrum (:meth:`spectrum_sq`) comes from the eigenvalues of each block's Gram matrix on
    its smaller side (``G = M M^T`` or ``M^T M``, computed once and kept: one GEMM and a symmetric
    eigensolver, several times cheaper than an SVD; each value within ~1e-6 of the largest, so
    every energy share is exact to that). The factors at rank ``r`` (:meth:`top`) come from the
    leading eigenvectors of ``G``, found by whichever route costs fewest operations (``_route``):

    - ``eigh``: all eigenvectors of ``G`` (exact);
    - ``subspace``: ``_GRAM_ITERS`` rounds of subspace iteration on ``G`` from a seeded Gaussian
      start of ``r`` + oversampling columns, then Rayleigh-Ritz (cheap when ``r`` is well below
      ``k``; within ~0.5% of the optimal error on a random Gaussian matrix, the flattest
      spectrum there is, far closer on trained weights);
    - ``randomized``: ``torch.svd_lowrank`` on ``M`` itself (``_POWER_ITERS`` power iterations,
      seeded), when even the Gram matrix costs more (a small rank of a wide layer).

    Either way the factors are ``U_r (U_r^T M)`` (or ``(M V_r) V_r^T``) with orthonormal
    ``U_r``: an orthogonal projection of ``M``, so ``||M - M_r||^2 = ||M||^2 - ||M_r||^2`` and
    :meth:`relative_error` reads the error of the factors built from what building them computed
    (no dense product of the factors; tests compare it with :func:`relative_error`)."""

    def __init__(self, w: torch.Tensor, groups: int):
        self.w, self.groups = w, int(groups)
        self.og, self.inner = w.shape[0] // self.groups, w[0].numel()
        self.k = min(self.og, self.inner)
        self.rows = self.og <= self.inner          # the Gram of the rows' side (M M^T)
        self._gram = self._eig = None
        self.kept_sq = None                        # ||M_r||^2 of the last factors built
        self.route = None                          # how they were found (``_route``)

    def _mats(self) -> torch.Tensor:
        return self.w.detach().float().reshape(self.groups, self.og, self.inner)

    def gram(self) -> torch.Tensor:
        """Each block's Gram matrix on its smaller side, (g, k, k) float32, computed once."""
        if self._gram is None:
            m = self._mats()
            self._gram = _gram(m if self.rows else m.transpose(1, 2))
        return self._gram

    def spectrum_sq(self) -> torch.Tensor:
        """Squared singular values of each block, decreasing, (g, k), float64. Up to
        ``_VECTORS_WITH_SPECTRUM`` (or for a wide block) the eigenvectors come too and are kept
        for :meth:`top`."""
        breakeven = self.og * self.inner / (self.og + self.inner)
        if self.k <= _VECTORS_WITH_SPECTRUM or breakeven >= _WIDE * self.k:
            self._eig = torch.linalg.eigh(self.gram())
            vals = self._eig[0]
        else:
            vals = torch.linalg.eigvalsh(self.gram())
        return vals.flip(-1).clamp(min=0).double()

    def _eigh(self, gi: int):
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.gram())
        return self._eig[0][gi], self._eig[1][gi]

    def _oversampled(self, r: int) -> int:
        return min(self.k, r + max(10, r // 4))

    def _route(self, r: int) -> str:
        """``eigh``, ``subspace`` or ``randomized``: the cheapest way to rank ``r`` factors (see the
        class), by the operation counts of ``_EIGH_FLOPS`` / ``_QR_FLOPS``."""
        mn, q, k, big = self.og * self.inner, self._oversampled(r), self.k, max(self.og, self.inner)
        gram = 0 if self._gram is not None else 1.2 * mn * k     # _gram: ~0.6 of a GEMM
        eigh = 0 if self._eig is not None else _EIGH_FLOPS * k ** 3
        sub = (_GRAM_ITERS + 2) * 2 * k * k * q + (_GRAM_ITERS + 1) * _QR_FLOPS * k * q * q + \
            _EIGH_FLOPS * q ** 3
        rand = (2 * _POWER_ITERS + 2) * 2 * mn * q + \
            (2 * _POWER_ITERS + 1) * _QR_FLOPS * (self.og + self.inner) / 2 * q * q + \
            2 * _QR_FLOPS * q * q * big
        costs = {"eigh": gram + eigh, "subspace": gram + sub, "randomized": rand - 2 * mn * r}
        return min(costs, key=costs.get)

    def _leading(self, gi: int, r: int) -> torch.Tensor:
        """The ``r`` leading eigenvectors of block ``gi``'s Gram matrix, (k, r), by subspace
        iteration (seeded; orthonormal columns)."""
        g = self.gram()[gi]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            start = torch.randn(self.k, self._oversampled(r), dtype=g.dtype, device=g.device)
        q, _ = torch.linalg.qr(g @ start)
        for _ in range(_GRAM_ITERS):
            q, _ = torch.linalg.qr(g @ q)
        t = q.t() @ g @ q
        _, z = torch.linalg.eigh((t + t.t()) / 2)
        return q @ z.flip(1)[:, :r]

    def top(self, rank: int):
        """(U, S, Vh) of each block truncated to ``rank``, float32, batched by group; also
        sets ``kept_sq`` (float64) for :meth:`relative_error`."""
        r = max(1, min(int(rank), self.k))
        self.route = route = self._route(r)
        us, ss, vhs, kept = [], [], [], 0.0
        for gi, m in enumerate(self._mats()):
            if route == "randomized":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    u, s, v = torch.svd_lowrank(m, q=self._oversampled(r), niter=_POWER_ITERS)
                u, s, vh = u[:, :r], s[:r], v[:, :r].t()
                kept += float(s.double().pow(2).sum())
            else:
                if route == "eigh":
                    vecs = self._eigh(gi)[1].flip(1)[:, :r].contiguous()
                else:
                    vecs = self._leading(gi, r)
                # the projection of M on the leading eigenvectors; its rows' (or columns') norms
                # are the singular values
                proj = vecs.t() @ m if self.rows else m @ vecs
                norms_sq = torch.linalg.vector_norm(proj, dim=1 if self.rows else 0).double() ** 2
                kept += float(norms_sq.sum())
                s = norms_sq.sqrt().float()
                inv = torch.where(s > s.max() * 1e-6, 1.0 / s.clamp(min=1e-30), torch.zeros_like(s))
                if self.rows:
                    u, vh = vecs, proj * inv[:, None]
                else:
                    vh, u = vecs.t(), proj * inv[None, :]
            us.append(u)
            ss.append(s)
            vhs.append(vh)
        self.kept_sq = kept
        return torch.stack(us), torch.stack(ss), torch.stack(vhs)

    def relative_error(self) -> float:
        """``||W - W_hat|| / ||W||`` of the factors :meth:`top` built last (see the class)."""
        flat = self.w.detach().reshape(-1)
        total = sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2
                    for c in flat.split(1 << 22))
        if total <= 0:
            return 0.0
        return max(0.0, 1.0 - self.kept_sq / total) ** 0.5


def svd_factorize_linear(layer: nn.Linear, rank: int, *, _svd=None, init: bool = True
                         ) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Sequential(Linear(in, rank, bias=False), Linear(rank, out))`` by
    the truncated SVD (the best rank-``rank`` approximation in Frobenius norm). ``init=False``:
    the new layers skip their random initialisation (the factors overwrite it)."""
    w = layer.weight
    u, s, vh = _svd if _svd is not None else _svd_blocks(w, 1)
    r = int(rank)
    if not 1 <= r <= s.shape[-1]:
        raise BadInput(f"rank {r} is outside 1..{s.shape[-1]} for a {tuple(w.shape)} weight")
    root = s[0, :r].sqrt()
    first = _new_linear(layer.in_features, r, False, w, init)
    second = _new_linear(r, layer.out_features, layer.bias is not None, w, init)
    _set(first.weight, root[:, None] * vh[0, :r])
    _set(second.weight, u[0, :, :r] * root[None, :])
    _copy_bias(second, layer)
    return nn.Sequential(first, second)


def svd_factorize_conv(conv: nn.Conv2d, rank: int, *, _svd=None, init: bool = True
                       ) -> nn.Sequential:
    """``k x k`` Conv2d -> ``Sequential(k x k conv into rank*groups channels, 1 x 1 conv)``.

    Each group's kernel, seen as an ``out/g x (in/g*kh*kw)`` matrix, is cut to rank ``rank`` by
    its SVD; the first conv keeps stride, padding, dilation, padding mode and groups, the second
    (1 x 1, same groups) keeps the bias. ``init`` as in :func:`svd_factorize_linear`."""
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
                      padding_mode=conv.padding_mode, init=init)
    second = _new_conv(g * r, o, 1, like=w, groups=g, bias=conv.bias is not None, init=init)
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
