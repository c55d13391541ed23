"""Tensor packing of :mod:`nbcompress.storage`: a tensor's elements as unsigned bit patterns and
the lossless encodings of one flat array into its five segments (positions table, positions,
codebook, values table, values), the smallest combination chosen by exact size. The layouts
(``dense``/``bitmask``/``gaps`` positions, ``raw``/``codebook``/``huffman`` values) are described
in :mod:`nbcompress.storage.format`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .bits import (_Corrupt, _ceil_log2, _huffman_bytes, _huffman_decode, _huffman_encode,
                   _huffman_lengths, _pack_fixed, _unpack_fixed)

MAX_CODEBOOK = 1 << 16
_LEN_BITS = 5                               # bits per stored code length
_MAX_GAP_HUFF_BITS = 16                     # largest gap alphabet tried with Huffman: 2**16

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_COMPLEX_PART = {torch.complex64: torch.float32, torch.complex128: torch.float64}


# ============================================================================ tensor packing

def _bits_of(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of the same width (flat, C order)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    t = t.resolve_neg().to("cpu").contiguous()
    isz = t.element_size()
    a = t.view(_INT_VIEW[isz]).numpy().reshape(-1)
    return a.view(np.dtype(f"u{isz}"))


def _tensor_from_bits(a: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    part = _COMPLEX_PART.get(dtype, dtype)
    isz = part.itemsize
    signed = a.astype(np.dtype(f"<u{isz}"), copy=False).view(
        np.uint8 if isz == 1 else np.dtype(f"i{isz}"))
    t = torch.from_numpy(np.array(signed, copy=True)).view(part)
    if dtype in _COMPLEX_PART:
        return torch.view_as_complex(t.reshape(list(shape) + [2]))
    return t.reshape(shape)


def _gap_symbols(d: np.ndarray, C: int) -> tuple[np.ndarray, int]:
    """The symbol stream for gaps-minus-one ``d`` with filler symbol ``C`` (skips ``C`` zeros)."""
    q = d // C
    r = d - q * C
    nsym = int(d.size + q.sum())
    sym = np.full(nsym, C, np.int64)
    ends = np.cumsum(q + 1) - 1
    sym[ends] = r
    return sym, nsym


def _plan_gaps(d: np.ndarray, huffman: bool, budget: float) -> dict | None:
    """Cheapest gap coding of ``d`` (gaps minus one between nonzeros); None if none beats budget."""
    best: dict | None = None
    best_size = budget
    max_d = int(d.max()) if d.size else 0
    bmax = max(1, (max_d + 1).bit_length())
    for b in range(1, bmax + 1):
        C = (1 << b) - 1
        q = d // C
        nfill = int(q.sum())
        nsym = d.size + nfill
        size = (nsym * b + 7) // 8
        if size < best_size:
            best, best_size = {"code": "fixed", "b": b, "nsym": nsym, "size": size}, size
        if huffman and b <= _MAX_GAP_HUFF_BITS:
            table = ((C + 1) * _LEN_BITS + 7) // 8
            if table >= best_size:
                continue
            counts = np.bincount(d - q * C, minlength=C + 1)
            counts[C] += nfill
            if table + _entropy_bytes(counts) >= best_size:
                continue
            lens = _huffman_lengths(counts)
            size = table + _huffman_bytes(nsym, int((counts * lens).sum()))
            if size < best_size:
                best, best_size = {"code": "huffman", "b": b, "nsym": nsym, "size": size,
                                   "lens": lens}, size
    return best


def _entropy_bytes(counts: np.ndarray) -> float:
    """A lower bound on any prefix code's length for symbols with these counts, in bytes."""
    c = counts[counts > 0].astype(np.float64)
    if c.size < 2:
        return 0.0
    return float((c * np.log2(c.sum() / c)).sum()) / 8 * (1 - 1e-9)


def _distinct(u: np.ndarray, isz: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, their counts) of an unsigned array; (None, None) when there are
    more than a codebook can hold even without the zero."""
    if isz <= 2:
        counts = np.bincount(u, minlength=1 << (8 * isz))
        uniq = np.flatnonzero(counts)
        return uniq.astype(u.dtype), counts[uniq]
    srt = np.sort(u)
    first = np.empty(srt.size, bool)
    first[0] = True
    np.not_equal(srt[1:], srt[:-1], out=first[1:])
    if np.count_nonzero(first) > MAX_CODEBOOK + 1:
        return None, None                           # too many for a codebook either way
    at = np.flatnonzero(first)
    return srt[at], np.diff(np.append(at, srt.size))


def _index_of(vals: np.ndarray, book: np.ndarray, isz: int) -> np.ndarray:
    """Position of each value in the sorted codebook ``book``."""
    if isz <= 2:
        lut = np.zeros(1 << (8 * isz), np.int64)
        lut[book] = np.arange(book.size)
        return lut[vals]
    return np.searchsorted(book, vals)


def _value_options(m: int, k: int, counts: np.ndarray | None, isz: int, huffman: bool,
                   budget: float = math.inf) -> list:
    """[(kind, bytes, extra)] for ``m`` values with ``k`` distinct values of ``counts``. Huffman is
    only built when its entropy bound could beat both the fixed-width options and ``budget``."""
    opts: list = [("raw", m * isz, None)]
    if m and k <= MAX_CODEBOOK:
        b = _ceil_log2(k)
        opts.append(("codebook", k * isz + (m * b + 7) // 8, b))
        fixed_best = min(min(o[1] for o in opts), budget)
        overhead = k * isz + (k * _LEN_BITS + 7) // 8
        if huffman and k >= 2 and overhead + _entropy_bytes(counts) < fixed_best:
            lens = _huffman_lengths(counts)
            opts.append(("huffman", k * isz + (k * _LEN_BITS + 7) // 8
                         + _huffman_bytes(m, int((counts * lens).sum())), lens))
    return opts


def _encode(u: np.ndarray, isz: int, huffman: bool) -> tuple[list[bytes], dict]:
    """Pack one flat unsigned array; returns the five segments and the encoding record."""
    n = u.size
    empty = b""
    if n == 0:
        return [empty] * 5, {"pos": "dense", "val": "raw", "nnz": 0}
    uniq, cnt = _distinct(u, isz)
    nnz = int(np.count_nonzero(u))
    has_zero = nnz < n
    k_all = uniq.size if uniq is not None else MAX_CODEBOOK + 2

    best: tuple | None = None
    best_total = math.inf
    nz_mask = d = None
    if has_zero:                    # sparse layouts first: their size bounds the dense search
        nz_vals = _value_options(nnz, k_all - 1, None if cnt is None else cnt[1:], isz, huffman)
        vbest = min(nz_vals, key=lambda v: v[1])
        bm = (n + 7) // 8
        best, best_total = (bm, "bitmask", None, vbest), bm + vbest[1]
        nz_mask = u != 0
        idx = np.flatnonzero(nz_mask)
        d = np.diff(idx, prepend=-1) - 1
        gap = _plan_gaps(d, huffman, best_total - vbest[1])
        if gap is not None and gap["size"] + vbest[1] < best_total:
            best, best_total = (gap["size"], "gaps", gap, vbest), gap["size"] + vbest[1]
    dense_vals = _value_options(n, k_all, cnt, isz, huffman, budget=best_total)
    vdense = min(dense_vals, key=lambda v: v[1])
    if vdense[1] <= best_total:     # ties go to the simpler dense layout
        best, best_total = (0, "dense", None, vdense), vdense[1]

    _, pos_kind, gap, (val_kind, _, extra) = best
    rec: dict = {"pos": pos_kind, "val": val_kind, "nnz": nnz}
    pos_table = pos = codebook = val_table = vals = empty
    if pos_kind == "bitmask":
        pos = np.packbits(nz_mask).tobytes()
    elif pos_kind == "gaps":
        C = (1 << gap["b"]) - 1
        sym, nsym = _gap_symbols(d, C)
        rec.update(gap_code=gap["code"], gap_bits=gap["b"], gap_symbols=nsym)
        if gap["code"] == "fixed":
            pos = _pack_fixed(sym, gap["b"])
        else:
            pos_table = _pack_fixed(gap["lens"], _LEN_BITS)
            pos = _huffman_encode(sym, gap["lens"])
    sparse = pos_kind != "dense"
    le = np.dtype(f"<u{isz}")
    if val_kind == "raw":
        vals = (u[nz_mask] if sparse else u).astype(le, copy=False).tobytes()
    else:
        book = uniq[1:] if sparse else uniq
        index = _index_of(u[nz_mask] if sparse else u, book, isz)
        codebook = book.astype(le, copy=False).tobytes()
        rec["k"] = int(book.size)
        if val_kind == "codebook":
            rec["idx_bits"] = extra
            vals = _pack_fixed(index, extra)
        else:
            val_table = _pack_fixed(extra, _LEN_BITS)
            vals = _huffman_encode(index, extra)
    segs = [pos_table, pos, codebook, val_table, vals]
    if sum(map(len, segs)) != best_total:        # the planned size is what gets written
        raise AssertionError(f"nbcompress packing size mismatch: {sum(map(len, segs))} != "
                             f"{best_total} ({rec})")
    return segs, rec


def _decode(segs: list[bytes], rec: dict, n: int, isz: int) -> np.ndarray:
    udt = np.dtype(f"<u{isz}")
    pos_table, pos, codebook, val_table, vals = segs
    pos_kind, val_kind = rec.get("pos"), rec.get("val")
    nnz = int(rec.get("nnz", 0))
    if not 0 <= nnz <= n:
        raise _Corrupt("bad nonzero count")
    where = None
    if pos_kind == "dense":
        m = n
    elif pos_kind == "bitmask":
        if len(pos) != (n + 7) // 8:
            raise _Corrupt("bitmask has the wrong length")
        where = np.unpackbits(np.frombuffer(pos, np.uint8), count=n).astype(bool)
        if int(where.sum()) != nnz:
            raise _Corrupt("bitmask does not match the nonzero count")
        m = nnz
    elif pos_kind == "gaps":
        b, nsym = int(rec["gap_bits"]), int(rec["gap_symbols"])
        if not (1 <= b <= 62 and nnz <= nsym <= n) or (
                rec.get("gap_code") == "huffman" and b > _MAX_GAP_HUFF_BITS):
            raise _Corrupt("bad gap parameters")
        C = (1 << b) - 1
        if rec.get("gap_code") == "fixed":
            sym = _unpack_fixed(pos, nsym, b).astype(np.int64)
        elif rec.get("gap_code") == "huffman":
            lens = _unpack_fixed(pos_table, C + 1, _LEN_BITS).astype(np.int64)
            sym = _huffman_decode(pos, lens, nsym)
        else:
            raise _Corrupt("unknown gap coding")
        fill = sym == C
        step = np.where(fill, C, sym + 1)
        at = np.cumsum(step) - 1
        where = at[~fill]
        if where.size != nnz or (nnz and where[-1] >= n):
            raise _Corrupt("gap stream does not match the tensor")
        m = nnz
    else:
        raise _Corrupt(f"unknown position encoding {pos_kind!r}")

    if val_kind == "raw":
        if len(vals) != m * isz:
            raise _Corrupt("raw values have the wrong length")
        values = np.frombuffer(vals, udt, count=m)
    elif val_kind in ("codebook", "huffman"):
        k = int(rec.get("k", 0))
        if not 1 <= k <= MAX_CODEBOOK or len(codebook) != k * isz:
            raise _Corrupt("bad codebook")
        book = np.frombuffer(codebook, udt, count=k)
        if val_kind == "codebook":
            b = int(rec.get("idx_bits", -1))
            if b != _ceil_log2(k):
                raise _Corrupt("bad index width")
            index = _unpack_fixed(vals, m, b).astype(np.int64)
        else:
            lens = _unpack_fixed(val_table, k, _LEN_BITS).astype(np.int64)
            index = _huffman_decode(vals, lens, m)
        if m and int(index.max()) >= k:
            raise _Corrupt("codebook index out of range")
        values = book[index]
    else:
        raise _Corrupt(f"unknown value encoding {val_kind!r}")

    if where is None:
        return values
    out = np.zeros(n, udt)
    out[where] = values
    return out


def _encoding_name(rec: dict) -> str:
    parts = [rec["pos"]]
    if rec["pos"] == "gaps":
        parts[0] = f"gaps{rec['gap_bits']}" + ("+huffman" if rec["gap_code"] == "huffman" else "")
    parts.append({"raw": "raw", "codebook": "codebook", "huffman": "codebook+huffman"}[rec["val"]])
    return "/".join(parts)
