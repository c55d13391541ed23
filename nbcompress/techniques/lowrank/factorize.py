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
           "separable_factorize_conv", "tucker_ranks_limit", "effective_weight", "relative_error"]

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


# A block is "large" past this many multiply-adds of its full SVD (m * n * min(m, n)); below
# it the full SVD runs as it always did (cheap, and results stay exactly as before).
_FULL_SVD_LIMIT = 1 << 28


def _large(og: int, inner: int) -> bool:
    return og * inner * min(og, inner) > _FULL_SVD_LIMIT


def _gram(mats: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The Gram matrices of the smaller side of each block (float64) and whether it is the
    rows' (``M M^T``) one."""
    rows = mats.shape[1] <= mats.shape[2]
    return (mats @ mats.transpose(1, 2) if rows else mats.transpose(1, 2) @ mats), rows


def _spectrum_sq(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Squared singular values of each group's kernel matrix, in decreasing order, (g, k), float64:
    for a small block from its SVD; for a large one, the eigenvalues of its Gram matrix on the
    smaller side, in float32 (one GEMM and a symmetric eigensolver, several times cheaper than
    an SVD: each value within ~1e-6 of the largest, so every energy share is exact to that)."""
    o = w.shape[0]
    if not _large(o // groups, w[0].numel()):
        return torch.linalg.svdvals(_f64(w).reshape(groups, o // groups, -1)) ** 2
    g, _ = _gram(w.detach().float().reshape(groups, o // groups, -1))
    return torch.linalg.eigvalsh(g).flip(-1).clamp(min=0).double()


def _svd_top(w: torch.Tensor, groups: int, rank: int):
    """(U, S, Vh) of each group's kernel matrix truncated to ``rank`` (batched by group, float64).
    A small block: the full SVD, cut. A large one, in float32: a randomized SVD (``torch.svd_lowrank``, 4
    power iterations, oversampled, seeded) when the rank is under a quarter of the block's, else
    the eigenvectors of its Gram matrix (exact); either is far cheaper than the full SVD. The
    reconstruction error the report gives is measured on the factors built, either way."""
    o = w.shape[0]
    og, inner = o // groups, w[0].numel()
    k = min(og, inner)
    r = max(1, min(int(rank), k))
    if not _large(og, inner):
        u, s, vh = torch.linalg.svd(_f64(w).reshape(groups, og, inner), full_matrices=False)
        return u[:, :, :r], s[:, :r], vh[:, :r]
    mats = w.detach().float().reshape(groups, og, inner)      # float32, as the weights are
    us, ss, vhs = [], [], []
    for m in mats:
        if r <= k // 4:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(m, q=min(k, r + max(10, r // 4)), niter=4)
            u, s, vh = u[:, :r], s[:r], v[:, :r].t()
        else:
            gm, rows = _gram(m[None])
            vals, vecs = torch.linalg.eigh(gm[0])
            vals, vecs = vals.flip(0)[:r].clamp(min=0), vecs.flip(1)[:, :r]
            s = vals.sqrt()
            inv = torch.where(s > s[0] * 1e-6, 1.0 / s.clamp(min=1e-30), torch.zeros_like(s))
            if rows:
                u, vh = vecs, (vecs.t() @ m) * inv[:, None]
            else:
                vh, u = vecs.t(), (m @ vecs) * inv[None, :]
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    return torch.stack(us).double(), torch.stack(ss).double(), torch.stack(vhs).double()


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
