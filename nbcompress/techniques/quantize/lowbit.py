"""Fewer bits per weight, stored packed: B-bit uniform codes (symmetric or asymmetric, per tensor
or per output channel), k-means weight sharing (Deep Compression) and binary weights, with
quantization-aware training through a straight-through estimator (uniform, binary) or on the
shared centroids (cluster)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core import BadInput, CompressionResult, FieldError
from ...layers import layer_bar
from .common import DEFAULT_BITS, DEFAULT_LR, mark, replace, row
from .qmodules import Int8MatmulLinear, QuantizedWeightLayer, compact_float, int_mm_fits, round_scale

__all__ = ["uniform_quantize", "binarize", "kmeans_cluster", "code_weights", "cluster", "fit_qat",
           "storage_table"]

_CONV_OP = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}

# ----------------------------------------------------------------------------- weight maths

_RATIOS = torch.linspace(1.0, 0.5, 16).tolist()


def uniform_quantize(w: torch.Tensor, bits: int, *, per_channel: bool = True,
                     symmetric: bool = True, search: bool = True):
    """B-bit codes of ``w``: ``(codes, scale, zero_point)`` with ``w ~ (codes - zero_point) *
    scale`` (``zero_point`` None when symmetric), scales per output channel (dim 0) or one.

    Symmetric: codes in [-(2^(B-1) - 1), 2^(B-1) - 1] (int8); 1 bit symmetric is the binary
    grid {-scale, +scale} (see :func:`binarize`). Asymmetric: codes in [0, 2^B - 1] (uint8), the
    range widened to hold 0 so that zero weights stay exactly zero. ``search``: the clipping range
    is shrunk from the full min/max (ratios 1.0 down to 0.5) to the one with the smallest squared
    error per channel: at 4 bits this is worth a lot of accuracy, at 8 bits little.
    """
    if symmetric and bits == 1:
        rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
        codes, scale = _binarize_rows(rows)
        return codes.reshape(w.shape), scale, None
    if symmetric and not search and w.numel():
        return _absmax_codes(w.detach().reshape(w.shape[0] if per_channel else 1, -1), bits,
                             w.shape)
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1)
    ratios = _RATIOS if search else [1.0]
    best_scale = best_zp = best_err = None
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = rows.abs().amax(1)
        for r in ratios:
            scale = round_scale(torch.where(amax > 0, amax * r / qmax, torch.ones_like(amax)))
            if len(ratios) == 1:          # no search: the absmax scale, no error to compare
                best_scale = scale
                break
            q = torch.clamp(torch.round(rows / scale[:, None]), -qmax, qmax)
            err = ((q * scale[:, None] - rows) ** 2).sum(1)
            if best_err is None:
                best_scale, best_err = scale, err
            else:
                better = err < best_err
                best_scale = torch.where(better, scale, best_scale)
                best_err = torch.where(better, err, best_err)
        codes = (rows / best_scale[:, None]).round_().clamp_(-qmax, qmax).to(torch.int8)
    else:
        qmax = 2 ** bits - 1
        lo = rows.amin(1).clamp(max=0)
        hi = rows.amax(1).clamp(min=0)
        for r in ratios:
            span = (hi - lo) * r
            scale = round_scale(torch.where(span > 0, span / qmax, torch.ones_like(span)))
            zp = torch.clamp(torch.round(-lo * r / scale), 0, qmax)
            q = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], 0, qmax)
            err = (((q - zp[:, None]) * scale[:, None] - rows) ** 2).sum(1)
            if best_err is None:
                best_scale, best_zp, best_err = scale, zp, err
            else:
                better = err < best_err
                best_scale = torch.where(better, scale, best_scale)
                best_zp = torch.where(better, zp, best_zp)
                best_err = torch.where(better, err, best_err)
        codes = torch.clamp(torch.round(rows / best_scale[:, None]) + best_zp[:, None], 0, qmax)
        codes = codes.to(torch.uint8)
        best_zp = best_zp.to(torch.uint8)
    return codes.reshape(w.shape), best_scale, best_zp


# elements per block of the absmax path's temporaries (1 MB of float32)
_BLOCK = 1 << 18


def _blocks(rows: torch.Tensor):
    """``(row slice, column slice)`` blocks of at most about ``_BLOCK`` elements covering the
    2-D ``rows``: whole rows when a row fits, else pieces of one row."""
    n_rows, n_cols = rows.shape
    if n_cols <= _BLOCK:
        step = _BLOCK // n_cols
        for r in range(0, n_rows, step):
            yield slice(r, r + step), slice(None)
    else:
        for r in range(n_rows):
            for c in range(0, n_cols, _BLOCK):
                yield slice(r, r + 1), slice(c, c + _BLOCK)


def _absmax_codes(rows: torch.Tensor, bits: int, shape) -> tuple:
    """The symmetric, no-search case of :func:`uniform_quantize` (int8 kernels, int8 weight-only)
    block by block: the codes and scales are bit for bit those of the whole-tensor maths
    (``rows.abs().amax(1)`` is ``max(-min, max)`` per row; the division, rounding and clamping are
    elementwise), but no temporary holds more than a block, nor a float32 copy of a bf16 / fp16
    weight, so quantizing a layer costs its int8 codes and about 1 MB more."""
    qmax = 2 ** (bits - 1) - 1
    amax = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    whole_rows = rows.shape[1] <= _BLOCK
    for rs, cs in _blocks(rows):
        lo, hi = torch.aminmax(rows[rs, cs].float(), dim=1)
        m = torch.maximum(lo.neg_(), hi)
        amax[rs] = m if whole_rows or cs.start == 0 else torch.maximum(amax[rs], m)
    scale = round_scale(torch.where(amax > 0, amax / qmax, torch.ones_like(amax)))
    codes = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
    for rs, cs in _blocks(rows):
        codes[rs, cs] = (rows[rs, cs].float() / scale[rs, None]).round_().clamp_(-qmax, qmax)
    return codes.reshape(shape), scale, None


def binarize(w: torch.Tensor):
    """``(codes, scale)``: codes = sign(w) in {-1, +1} (0 counts as +1) as int8, scale = mean |w|
    per output channel (the scale that minimises ``||w - codes * scale||``)."""
    codes, scale = _binarize_rows(w.detach().float().reshape(w.shape[0], -1))
    return codes.reshape(w.shape), scale


def _binarize_rows(rows: torch.Tensor):
    codes = torch.where(rows >= 0, 1, -1).to(torch.int8)
    scale = rows.abs().mean(1)
    scale = round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
    return codes, scale


def _dequant(codes, scale, zp, per_channel: bool) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.dim() - 1) if per_channel else (1,) * codes.dim()
    c = codes.float()
    if zp is not None:
        c = c - zp.float().reshape(shape)
    return c * scale.float().reshape(shape)


def kmeans_cluster(w: torch.Tensor, bits: int, *, iters: int = 3000):
    """Deep Compression weight sharing for one tensor: ``(centroids, index)``.

    k-means (Lloyd) in one dimension over the *nonzero* entries of ``w`` with ``k = 2^bits``
    centroids, initialised linearly between their min and max (the paper's best initialisation:
    it keeps centroids for the rare large weights). ``index`` has ``w``'s shape: the centroid of
    each entry, or -1 for a zero entry (which stays zero). Fewer distinct nonzero values than k
    give one centroid per value. Runs to convergence (assignments unchanged) or ``iters``.

    In one dimension each cluster is a contiguous run of the sorted values, so an iteration is k
    binary searches and k differences of a prefix sum, not a pass over all weights.
    """
    flat = w.detach().reshape(-1).float()
    nz = flat != 0
    vals = flat[nz]
    index = torch.full(flat.shape, -1, dtype=torch.long, device=flat.device)
    if vals.numel() == 0:
        return vals.new_zeros(0), index.reshape(w.shape)
    k = 2 ** bits
    srt, _ = torch.sort(vals)
    uniq = torch.unique_consecutive(srt)
    if uniq.numel() <= k:
        centroids = uniq
        index[nz] = torch.searchsorted(uniq, vals)
        return centroids, index.reshape(w.shape)
    # the small per-iteration arrays (k entries) are cheaper in numpy than as torch ops
    s_np = srt.double().cpu().numpy()
    csum = np.concatenate([[0.0], np.cumsum(s_np)])
    cent = np.linspace(s_np[0], s_np[-1], k)
    bounds = None
    for _ in range(iters):
        mid = ((cent[1:] + cent[:-1]) / 2).astype(np.float32)
        # values <= mid[j] go to cluster j (the same tie rule as the final searchsorted below)
        inner = np.searchsorted(s_np, mid, side="right")
        new_bounds = np.concatenate([[0], inner, [s_np.size]])
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        counts = np.diff(bounds)
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        cent = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), cent))
    centroids = torch.from_numpy(cent).float().to(srt.device)
    mid = (centroids[1:] + centroids[:-1]) / 2
    index[nz] = torch.searchsorted(mid, vals)
    return centroids, index.reshape(w.shape)


def _shared_weight(centroids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    table = torch.cat([centroids, centroids.new_zeros(1)])
    return table[torch.where(index >= 0, index, centroids.numel())]


# ------------------------------------------------------------------------ QAT parametrizations

class _FakeQuantize(nn.Module):
    """weight -> its quantized value in the forward pass, identity in the backward pass
    (straight-through estimator): ``w + (q(w) - w).detach()``. The parametrized module's
    ``original`` is the real-valued shadow the optimizer updates."""

    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, w):
        return w + (self.quantizer(w) - w).detach()


class _SharedWeights(nn.Module):
    """weight -> centroids[index] (zeros stay zero): training updates the centroids, each by the
    sum of the gradients of the weights that share it (Deep Compression's fine-tuning)."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone())
        self.register_buffer("index", index)

    def forward(self, w):
        return _shared_weight(self.centroids, self.index).to(w.dtype)


# ----------------------------------------------------------------------- the steps

def code_weights(cfg, model, ctx, targets, notes, mode, *, bits: int | None = None,
                 per_channel: bool | None = None, search: bool = True,
                 kind: str | None = None, int8_matmul: bool = False,
                 bits_of: dict[str, int] | None = None) -> CompressionResult:
    """Uniform or binary codes: each selected layer becomes a :class:`QuantizedWeightLayer`
    (after QAT through a straight-through estimator when ``cfg.qat`` is given). ``bits``,
    ``per_channel``: instead of the config's (int8 weight-only sets them); ``search``: the
    clipping search of :func:`uniform_quantize` (off: the plain absmax scale); ``kind``: the
    layer table's name for it; ``bits_of``: bits per layer name (a byte budget's choice),
    instead of one width for all; ``int8_matmul``: 8-bit Linear layers whose sizes allow it become
    :class:`.qmodules.Int8MatmulLinear` (int8 GEMM). The layers are replaced one at a time and ``targets`` is emptied
    as it goes, so a replaced layer's float weight is freed at once (a 1B model is never held
    twice over)."""
    if bits is None:
        bits = 1 if mode == "binary" else (cfg.bits or DEFAULT_BITS["uniform"])
    if per_channel is None:
        per_channel = True if mode == "binary" else cfg.per_channel
    symmetric = True if mode == "binary" else cfg.symmetric

    bits_of = bits_of or {}

    def quantizer_at(b):
        def quantizer(w):
            if mode == "binary":
                codes, scale = binarize(w)
                return _dequant(codes, scale, None, True).to(w.dtype)
            codes, scale, zp = uniform_quantize(w, b, per_channel=per_channel,
                                                symmetric=symmetric, search=search)
            return _dequant(codes, scale, zp, per_channel).to(w.dtype)
        return quantizer

    extra: dict = {}
    originals: dict = {}
    if cfg.qat is not None:
        originals = {n: m.weight.detach().clone() for n, m in targets}
        for n, m in targets:
            parametrize.register_parametrization(
                m, "weight", _FakeQuantize(quantizer_at(bits_of.get(n, bits))))
        try:
            extra["qat"] = fit_qat(cfg, model, ctx, mode)
        finally:
            for _, m in targets:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    layers = []
    gemm = 0
    weights = sum(m.weight.numel() for _, m in targets)
    with layer_bar(len(targets), f"quantize ({kind or mode})", cfg.progress, weights) as bar:
        for i, (name, m) in enumerate(targets):
            targets[i] = None
            w = m.weight.detach()
            b = bits_of.get(name, bits)
            if mode == "binary":
                codes, scale = binarize(w)
                zp = None
            else:
                codes, scale, zp = uniform_quantize(w, b, per_channel=per_channel,
                                                    symmetric=symmetric, search=search)
            new = _weight_layer(m, codes, scale, zp, b, per_channel, symmetric,
                                int8_matmul=int8_matmul)
            gemm += isinstance(new, Int8MatmulLinear)
            mark(new, cfg)
            model = replace(model, name, new)
            layers.append(row(name, m, new, b, kind or mode, originals.pop(name, w),
                              new.dequantized_weight(torch.float32)))
            del m, w, new, codes
            bar.update()
    if mode == "binary":
        notes.append("binary weights: sign(w) * per-output-channel scale (mean |w|), "
                     "stored as 1-bit codes")
    else:
        width, at = (f"{bits}-bit", f"{bits} bits") if not bits_of else \
            ("per-layer-width", "each layer's bits")
        notes.append(f"{width} {'symmetric' if symmetric else 'asymmetric'} codes, "
                     f"{'per-channel' if per_channel else 'per-tensor'} scales, stored packed "
                     f"at {at}")
    if gemm:
        notes.append(f"{gemm} of {len(layers)} layers compute in int8 (torch._int_mm); "
                     f"the others dequantize their codes in each forward")
    else:
        notes.append("simulated: codes are dequantized in each forward (no low-bit kernels), "
                     "so latency does not improve")
    return CompressionResult(model, layers=layers, notes=notes, extra=extra)


def cluster(cfg, model, ctx, targets, notes, bits_of: dict[str, int] | None = None
            ) -> CompressionResult:
    """k-means weight sharing (Deep Compression): each selected layer's weights become their
    centroids (after QAT of the centroids when ``cfg.qat`` is given)."""
    bits = cfg.bits or DEFAULT_BITS["cluster"]
    originals = {n: m.weight.detach().clone() for n, m in targets}
    shared = {}
    weights = sum(m.weight.numel() for _, m in targets)
    with layer_bar(len(targets), "quantize (k-means)", cfg.progress, weights) as bar:
        for name, m in targets:
            centroids, index = kmeans_cluster(m.weight, (bits_of or {}).get(name, bits))
            shared[name] = (centroids, index)
            bar.update()
    extra: dict = {}
    if cfg.qat is not None:
        params = {n: _SharedWeights(c, i) for n, (c, i) in shared.items()}
        for name, m in targets:
            parametrize.register_parametrization(m, "weight", params[name])
        try:
            extra["qat"] = fit_qat(cfg, model, ctx, "cluster", exclude_shadows=True)
        finally:
            for _, m in targets:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                m.weight.requires_grad_(True)
        shared = {n: (p.centroids.detach(), p.index) for n, p in params.items()}
    layers = []
    for name, m in targets:
        centroids, index = shared[name]
        with torch.no_grad():
            m.weight.copy_(_shared_weight(centroids, index).to(m.weight.dtype))
        b = (bits_of or {}).get(name, bits)
        m.nbc_bits = int(b)
        mark(m, cfg)
        r = row(name, m, m, b, "cluster", originals[name].float(), m.weight.float())
        r["clusters"] = int(centroids.numel())
        layers.append(r)
    most = f"up to {2 ** bits}" if not bits_of else "2^(the layer's bits)"
    notes.append(f"k-means weight sharing: {most} centroids per layer (linear "
                 f"init), nonzero weights only, zeros kept")
    notes.append("stored as a codebook + " + ("Huffman-coded" if cfg.huffman else
                                              "fixed-width") + " indices")
    result = CompressionResult(model, layers=layers, notes=notes, extra=extra)
    table = storage_table(model, huffman=True)
    if table is not None:
        result.tables["storage"] = table
    return result


def fit_qat(cfg, model, ctx, mode, exclude_shadows: bool = False) -> list[dict]:
    """Quantization-aware training on ``cfg.qat`` with the shared loop
    (``nbcompress.train.fit``)."""
    from ...train import fit

    params = None
    if exclude_shadows:
        params = [p for n, p in model.named_parameters()
                  if not n.endswith("parametrizations.weight.original")]
        for n, p in model.named_parameters():
            if n.endswith("parametrizations.weight.original"):
                p.requires_grad_(False)
    epochs = cfg.epochs or 1
    lr = cfg.lr or DEFAULT_LR[mode]
    return fit(model, cfg.qat, epochs=epochs, lr=lr, params=params, device=ctx.device,
               progress=ctx.progress, desc=f"QAT {mode}", seed=cfg.seed)


def _weight_layer(m: nn.Module, codes, scale, zp, bits, per_channel, symmetric,
                  int8_matmul: bool = False):
    kw = dict(per_channel=per_channel, symmetric=symmetric, bias=m.bias is not None)
    if isinstance(m, nn.Linear):
        gemm = (int8_matmul and bits == 8 and symmetric and per_channel
                and int_mm_fits(m.in_features, m.out_features))
        cls = Int8MatmulLinear if gemm else QuantizedWeightLayer
        new = cls("linear", tuple(m.weight.shape), bits, **kw)
    else:
        if m.padding_mode != "zeros":
            raise FieldError(f"{type(m).__name__} with padding_mode={m.padding_mode!r} is not "
                             f"supported by {{mode='uniform'}}/binary (only zero padding)")
        new = QuantizedWeightLayer(_CONV_OP[type(m)], tuple(m.weight.shape), bits, stride=m.stride,
                                   padding=m.padding, dilation=m.dilation, groups=m.groups, **kw)
    dev = m.weight.device
    new.codes = codes.to(dev)
    new.scale = compact_float(scale).to(dev)     # fp16 when exact: 2 bytes a scale in the file
    if zp is not None:
        new.zero_point = zp.to(dev)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().clone())
    return new.to(dev)


def storage_table(model: nn.Module, huffman: bool = True):
    """Per-tensor byte split of what ``nbcompress.save`` writes (positions, indices, codebook,
    raw), as a DataFrame; None if storage cannot describe the model."""
    try:
        import pandas as pd

        from ...storage import breakdown
    except ImportError:
        return None
    try:
        rows = breakdown(model, huffman=huffman)
    except BadInput:
        return None
    cols = ["name", "shape", "numel", "nnz", "encoding", "positions", "indices", "codebook",
            "raw", "bytes", "bits_per_element"]
    return pd.DataFrame([{k: r.get(k) for k in cols} for r in rows], columns=cols)
