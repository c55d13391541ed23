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
from .codebooks import (MAX_CODEBOOK, _hashed_distinct, _no_byte_codebook,  # noqa: F401
                        _no_codebook)
from .gaps import (_HIST, _byte_gap_histogram, _gap_histogram, _gaps,  # noqa: F401
                   _streamed_gap_histogram, fixed_gaps_lose)

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
    if not signed.flags.writeable:      # (a view of the file's bytes; decoded arrays are new)
        signed = np.array(signed, copy=True)
    t = torch.from_numpy(signed).view(part)
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
    return _plan_gap_histogram(*_gap_histogram(d), int(d.size), huffman, budget)


def _plan_gap_histogram(v: np.ndarray, c: np.ndarray, count: int, huffman: bool,
                        budget: float) -> dict | None:
    """:func:`_plan_gaps` from the gaps' histogram: ``count`` gaps, distinct values ``v`` (sorted)
    occurring ``c`` times."""
    best: dict | None = None
    best_size = budget
    max_d = int(v[-1]) if v.size else 0
    bmax = max(1, (max_d + 1).bit_length())
    for b in range(1, bmax + 1):
        C = (1 << b) - 1
        q = v // C
        nfill = int((q * c).sum())
        nsym = count + nfill
        size = (nsym * b + 7) // 8
        if size < best_size:
            best, best_size = {"code": "fixed", "b": b, "nsym": nsym, "size": size}, size
        if huffman and b <= _MAX_GAP_HUFF_BITS:
            table = ((C + 1) * _LEN_BITS + 7) // 8
            if table >= best_size:
                continue
            counts = np.zeros(C + 1, np.int64)
            np.add.at(counts, v - q * C, c)
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
        if isz == 1:            # (torch counts bytes without widening them: 4x numpy's speed)
            counts = torch.bincount(torch.from_numpy(u), minlength=256).numpy()
        else:
            counts = np.bincount(u, minlength=1 << 16)
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
                   budget: float = math.inf, lens_of: dict | None = None, key=None) -> list:
    """[(kind, bytes, extra)] for ``m`` values with ``k`` distinct values of ``counts``. Huffman is
    only built when its entropy bound could beat both the fixed-width options and ``budget``
    (``lens_of[key]``: code lengths already built for these counts)."""
    opts: list = [("raw", m * isz, None)]
    if m and k <= MAX_CODEBOOK:
        b = _ceil_log2(k)
        opts.append(("codebook", k * isz + (m * b + 7) // 8, b))
        fixed_best = min(min(o[1] for o in opts), budget)
        overhead = k * isz + (k * _LEN_BITS + 7) // 8
        if huffman and k >= 2 and overhead + _entropy_bytes(counts) < fixed_best:
            lens = lens_of.get(key) if lens_of is not None else None
            if lens is None:
                lens = _huffman_lengths(counts)
                if lens_of is not None:
                    lens_of[key] = lens
            opts.append(("huffman", k * isz + (k * _LEN_BITS + 7) // 8
                         + _huffman_bytes(m, int((counts * lens).sum())), lens))
    return opts


def _plan(u: np.ndarray, isz: int, huffman: bool, fast: bool = True,
          keep: bool = True) -> tuple[dict, dict]:
    """The smallest encoding of one flat unsigned array, found without producing its bytes:
    (plan, scratch). ``plan`` (record, size, layouts, code lengths, codebook) is all :func:`_emit`
    needs to write the bytes again; ``scratch`` holds arrays computed here that it can reuse.

    Every combination's size is computed exactly; ``fast`` only skips options that provably cannot
    win: no codebook when a sample already has too many distinct values (no sort of the whole
    tensor), and no search of the sparse positions when the sparse values alone, plus one bit
    per nonzero, are not smaller than the best dense encoding.

    ``keep=False`` (measuring: no bytes will be written): the positions of the nonzeros are
    streamed over (:func:`_streamed_gap_histogram`), not kept as scratch for :func:`_emit`."""
    n = u.size
    if n == 0:
        return {"rec": {"pos": "dense", "val": "raw", "nnz": 0}, "size": 0, "pos": "dense",
                "gap": None, "val": "raw", "extra": None, "book": None}, {}
    nnz = int(np.count_nonzero(u))
    has_zero = nnz < n
    scratch: dict = {}
    if keep and fast and isz > 2 and 32 * (n - nnz) > n:   # zeros enough to search positions
        scratch["nz_mask"] = u != 0
        scratch["idx"] = np.flatnonzero(scratch["nz_mask"])
    if fast and isz > 2 and _no_codebook(u, nnz, scratch.get("idx")):
        uniq = cnt = None
    elif fast and not huffman and isz == 1 and _no_byte_codebook(u):
        uniq = cnt = None
    else:
        uniq, cnt = _distinct(u, isz)
    k_all = uniq.size if uniq is not None else MAX_CODEBOOK + 2
    best: tuple | None = None
    best_total = math.inf
    lens_of: dict = {}                  # Huffman code lengths, computed once per counts
    nz_vals = vbest = None
    if has_zero:
        nz_vals = _value_options(nnz, k_all - 1, None if cnt is None else cnt[1:], isz, huffman,
                                 lens_of=lens_of, key="nz")
        vbest = min(nz_vals, key=lambda v: v[1])
    if has_zero and fast:
        # Any sparse layout costs at least its values plus one bit per nonzero (a bitmask has
        # n >= nnz bits; a gap stream has nsym >= nnz symbols of >= 1 bit each): when the best
        # dense encoding is no larger, the positions need not be searched (ties go to dense).
        dense_vals = _value_options(n, k_all, cnt, isz, huffman, lens_of=lens_of, key="all")
        vdense = min(dense_vals, key=lambda v: v[1])
        if vdense[1] <= vbest[1] + (nnz + 7) // 8:
            has_zero = False
    if has_zero:                    # sparse layouts first: they bound the dense search
        bm = (n + 7) // 8
        best, best_total = (bm, "bitmask", None, vbest), bm + vbest[1]
        if fast and not huffman and fixed_gaps_lose(u, nnz, bm):
            gap = None              # (int8 codes of a pruned layer: no gap histogram needed)
        elif keep:
            if "idx" not in scratch:
                scratch["nz_mask"] = u != 0
                scratch["idx"] = np.flatnonzero(scratch["nz_mask"])
            d = scratch["d"] = _gaps(scratch["idx"])
            gap = _plan_gaps(d, huffman, best_total - vbest[1])
        else:
            gap = _plan_gap_histogram(*_streamed_gap_histogram(u, nnz), nnz, huffman,
                                      best_total - vbest[1])
        if gap is not None and gap["size"] + vbest[1] < best_total:
            best, best_total = (gap["size"], "gaps", gap, vbest), gap["size"] + vbest[1]
    dense_vals = _value_options(n, k_all, cnt, isz, huffman, budget=best_total, lens_of=lens_of,
                                key="all")
    vdense = min(dense_vals, key=lambda v: v[1])
    if vdense[1] <= best_total:     # ties go to the simpler dense layout
        best, best_total = (0, "dense", None, vdense), vdense[1]

    _, pos_kind, gap, (val_kind, _, extra) = best
    rec: dict = {"pos": pos_kind, "val": val_kind, "nnz": nnz}
    if pos_kind == "gaps":
        rec.update(gap_code=gap["code"], gap_bits=gap["b"], gap_symbols=gap["nsym"])
    book = None
    if val_kind != "raw":
        book = uniq[1:] if pos_kind != "dense" else uniq
        rec["k"] = int(book.size)
        if val_kind == "codebook":
            rec["idx_bits"] = extra
    if isinstance(extra, np.ndarray):
        extra = extra.astype(np.uint8)
    if gap is not None and "lens" in gap:
        gap = dict(gap, lens=gap["lens"].astype(np.uint8))
    return {"rec": rec, "size": best_total, "pos": pos_kind, "gap": gap, "val": val_kind,
            "extra": extra, "book": book}, scratch


def _le_bytes(a: np.ndarray, isz: int):
    """``a``'s elements as little-endian bytes: a view (no copy) on a little-endian machine."""
    a = np.ascontiguousarray(a.astype(np.dtype(f"<u{isz}"), copy=False))
    return memoryview(a.reshape(-1).view(np.uint8))


def _emit(u: np.ndarray, isz: int, plan: dict, scratch: dict | None = None) -> list:
    """The five segments (bytes, or memoryviews of ``u`` for raw values) that ``plan`` describes."""
    scratch = scratch or {}
    empty = b""
    pos_kind, val_kind, extra = plan["pos"], plan["val"], plan["extra"]
    pos_table = pos = codebook = val_table = vals = empty
    sparse = pos_kind != "dense"
    if u.size == 0:
        return [empty] * 5
    if sparse:
        nz_mask = scratch.get("nz_mask")
        if nz_mask is None:
            nz_mask = u != 0
        idx = scratch.get("idx")
        if idx is None:             # (indexing by positions is 4x faster than by a mask)
            idx = np.flatnonzero(nz_mask)
    if pos_kind == "bitmask":
        pos = np.packbits(nz_mask).tobytes()
    elif pos_kind == "gaps":
        gap = plan["gap"]
        d = scratch.get("d")
        if d is None:
            d = _gaps(idx)
        C = (1 << gap["b"]) - 1
        sym, _ = _gap_symbols(d, C)
        if gap["code"] == "fixed":
            pos = _pack_fixed(sym, gap["b"])
        else:
            lens = gap["lens"].astype(np.int64)
            pos_table = _pack_fixed(lens, _LEN_BITS)
            pos = _huffman_encode(sym, lens)
    src = u[idx] if sparse else u
    if val_kind == "raw":
        vals = _le_bytes(src, isz)
    else:
        book = plan["book"]
        index = _index_of(src, book, isz)
        codebook = _le_bytes(book, isz).tobytes()
        if val_kind == "codebook":
            vals = _pack_fixed(index, extra)
        else:
            lens = extra.astype(np.int64)
            val_table = _pack_fixed(lens, _LEN_BITS)
            vals = _huffman_encode(index, lens)
    return [pos_table, pos, codebook, val_table, vals]


def _encode(u: np.ndarray, isz: int, huffman: bool, fast: bool = True) -> tuple[list, dict]:
    """Pack one flat unsigned array; returns the five segments and the encoding record."""
    plan, scratch = _plan(u, isz, huffman, fast)
    segs = _emit(u, isz, plan, scratch)
    _check_size(segs, plan)
    return segs, dict(plan["rec"])


def _seg_lengths(plan: dict, n: int, isz: int) -> list[int]:
    """The five segment lengths :func:`_emit` will write for ``plan`` (of ``n`` elements of
    ``isz`` bytes), from the plan alone: measuring a model's packed size needs no bytes."""
    rec = plan["rec"]
    pos_table = pos = 0
    if plan["pos"] == "bitmask":
        pos = (n + 7) // 8
    elif plan["pos"] == "gaps":
        gap = plan["gap"]
        if gap["code"] == "huffman":
            pos_table = (((1 << gap["b"]) - 1 + 1) * _LEN_BITS + 7) // 8
        pos = gap["size"] - pos_table
    m = n if plan["pos"] == "dense" else int(rec["nnz"])
    codebook = val_table = 0
    if plan["val"] == "raw":
        vals = m * isz
    else:
        k = int(rec["k"])
        codebook = k * isz
        if plan["val"] == "codebook":
            vals = (m * int(rec["idx_bits"]) + 7) // 8
        else:
            val_table = (k * _LEN_BITS + 7) // 8
            vals = plan["size"] - pos_table - pos - codebook - val_table
    out = [pos_table, pos, codebook, val_table, vals]
    if sum(out) != plan["size"] or min(out) < 0:
        raise AssertionError(f"nbcompress segment lengths {out} do not add up to the planned "
                             f"{plan['size']} ({rec})")
    return out


def _check_size(segs: list, plan: dict) -> None:
    if sum(map(len, segs)) != plan["size"]:        # the planned size is what gets written
        raise AssertionError(f"nbcompress packing size mismatch: {sum(map(len, segs))} != "
                             f"{plan['size']} ({plan['rec']})")


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
        where = np.flatnonzero(np.unpackbits(np.frombuffer(pos, np.uint8), count=n).view(bool))
        if where.size != nnz:
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
