"""Safe, compact model files: :func:`save`, :func:`load`, :func:`describe`, :func:`breakdown`.

A file holds the whole model (architecture included) and loading it never unpickles anything:

``b"NBC1"`` | header length (little-endian u32) | header | one binary blob

The header is UTF-8 JSON, either as is (it starts with ``{``) or zlib-compressed (RFC 1950, level
9), whichever is shorter: the module tree and encoding records repeat the same keys, so deflate
shrinks them 4-5x, which for a 4-bit or binary LeNet is 2.6 kB of a 36-139 kB file.

The JSON header is::

    {"format": "nbcompress", "version": 1, "huffman": bool, "torch": "2.x",
     "root": <node>, "objects": [<object>], "tensors": [<tensor>], "blob_bytes": int}

preceded by ``"crc32": "<8 hex digits>"`` as the header's first key: zlib's CRC-32 of the JSON
header (with those digits written as zeros) followed by the blob, checked on load, so a changed
bit anywhere after the prefix is an error, never a silently different model.

A ``<node>`` describes one module::

    {"class": "<module>.<qualname>", "training": bool, "attrs": {name: value},
     "params": {name: object_id | null}, "buffers": {name: object_id | null},
     "nonpersistent": [buffer names], "children": {name: <node> | null}}

or ``{"same_as": "<path>"}`` for a module that appears twice (shared submodule), or, for a module
written by an extension codec, ``{"class", "training", "codec": "registered"|"method",
"attrs", "tensors": {name: object_id}}``. Attribute values are JSON with tags for what JSON cannot
say: ``{"$tuple": [...]}``, ``{"$dict": {...}}``, ``{"$float": "inf"}``, ``{"$dtype": "float32"}``,
``{"$size": [...]}``, ``{"$device": "cpu"}``, ``{"$fn": "relu"}`` (a ``torch.nn.functional``
function), ``{"$t": object_id}`` (a tensor that is also a registered parameter/buffer).

An ``<object>`` is one Python tensor of the model (a parameter or a buffer): ``{"tensor": i,
"param": bool, "requires_grad": bool, "view": null | [offset, shape, stride]}``. Several objects may
point at one stored ``<tensor>``: the same Parameter used twice (tied weights) is one object; two
distinct views of one storage share one stored tensor (the covered span of the storage) and come
back as views of one storage again.

A ``<tensor>`` is one packed array: name, shape, dtype, ``enc`` (the chosen encoding) and ``seg``,
the byte lengths of its five blob segments, in this order: positions table, positions, codebook,
values table, values. The blob is the concatenation of every tensor's segments, in order.

Packing (lossless; elements compared by their bit patterns, so -0.0 and NaN payloads survive; an
element is "zero" only when all its bits are zero):

* positions: ``dense`` (every element is a value) | ``bitmask`` (1 bit per element, then only the
  nonzero values) | ``gaps`` (Deep-Compression style relative indices: each nonzero stores the gap
  to the previous one as a ``b``-bit symbol; a gap longer than ``C = 2**b - 1`` first emits
  "filler" symbols ``C`` that each skip ``C`` zeros. The symbols are fixed-width or Huffman-coded).
* values: ``raw`` (dtype bytes, little endian) | ``codebook`` (the ``k <= 65536`` distinct values,
  then ``ceil(log2 k)``-bit indices) | ``huffman`` (codebook + canonical Huffman-coded indices; the
  code lengths are stored as 5-bit numbers in the values table).

Every combination's size is computed exactly and the smallest is written. Huffman variants are
used only with ``huffman=True``, and never for the tensors of a module whose attribute
``nbc_huffman`` is False (``%quantize`` without ``--huffman`` sets it on the layers it touches).
Code lengths are limited to 20 bits; a Huffman stream of more than 2048 symbols starts with the
bit offset of each further block of 2048 symbols (u32), so long streams decode block-parallel.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import os
import re
import struct
import types
import zlib
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core import BadInput

__all__ = ["save", "load", "describe", "breakdown", "register_module_codec", "MAGIC",
           "SAFE_PREFIXES"]

MAGIC = b"NBC1"
FORMAT_VERSION = 1
_LEN = struct.Struct("<I")
_PREFIX_BYTES = len(MAGIC) + _LEN.size      # 8: magic + header length
_CRC_KEY = b'{"crc32":"'                    # the header's first key: CRC-32 of header and blob,
_CRC_AT = len(_CRC_KEY)                     # 8 hex digits, computed with them set to zeros
_CRC_BLANK = "00000000"
_MAX_HEADER = 1 << 28                       # a decompressed header above 256 MiB is corrupt
MAX_CODEBOOK = 1 << 16
_HUFF_LIMIT = 20                            # longest Huffman code, bits
_LEN_BITS = 5                               # bits per stored code length
_MAX_GAP_HUFF_BITS = 16                     # largest gap alphabet tried with Huffman: 2**16

SAFE_PREFIXES = ("torch.nn", "torch.ao.nn", "nbcompress")

_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "complex64", "complex128",
                "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
                "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                "float8_e8m0fnu")
_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES
                                   if isinstance(getattr(torch, n, None), torch.dtype)}
_ALL_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in dir(torch)
                                       if isinstance(getattr(torch, n, None), torch.dtype)}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_COMPLEX_PART = {torch.complex64: torch.float32, torch.complex128: torch.float64}

# nn.Module's own bookkeeping in __dict__ (read from this torch's Module.__init__), never saved.
_BOOKKEEPING = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}

# Attributes that are derived caches of a class, skipped on save and rebuilt by a method on load.
_DERIVED: list[tuple[type, tuple[str, ...], str]] = [
    (nn.RNNBase, ("_flat_weights", "_flat_weight_refs"), "_init_flat_weights"),
]

_CODECS: dict[type, tuple[Callable, Callable]] = {}


def register_module_codec(cls: type, export_fn: Callable[[nn.Module], tuple[dict, dict]],
                          import_fn: Callable[[dict, dict], nn.Module]) -> None:
    """Save modules of exactly ``cls`` with ``export_fn(module) -> (attrs, tensors)`` and load them
    with ``import_fn(attrs, tensors) -> module``.

    The codec owns the whole subtree of such a module (its children are not walked). ``attrs``
    takes the same values as module attributes; ``tensors`` (``{str: Tensor}``) get the same
    packing as parameters. A class with a registered codec counts as trusted when loading.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BadInput(f"register_module_codec needs an nn.Module subclass, got {cls!r}")
    if not (callable(export_fn) and callable(import_fn)):
        raise BadInput("register_module_codec needs callable export_fn and import_fn")
    _CODECS[cls] = (export_fn, import_fn)


# ============================================================================ bit-level helpers

class _Corrupt(Exception):
    """Internal: the file's content is inconsistent (turned into BadInput by load)."""


def _ceil_log2(k: int) -> int:
    return 0 if k <= 1 else int(k - 1).bit_length()


_CHUNK = 1 << 18          # elements per vectorised chunk (cache-sized temporaries)


def _or_into(words: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> None:
    """``words[idx] |= vals`` for nondecreasing ``idx`` (several values may share a word)."""
    if idx.size == 0:
        return
    first = np.flatnonzero(np.concatenate([[True], idx[1:] != idx[:-1]]))
    words[idx[first]] |= np.bitwise_or.reduceat(vals, first)


def _pack_varlen(codes: np.ndarray, lens) -> bytes:
    """The low ``lens[i]`` (1..57) bits of each ``codes[i]``, MSB first, concatenated and
    zero-padded to a whole byte. ``lens`` may be one int (fixed width)."""
    n = codes.size
    if n == 0:
        return b""
    codes = codes.astype(np.uint64, copy=False)
    fixed = np.ndim(lens) == 0
    if fixed:
        if int(lens) == 0:
            return b""
        total = n * int(lens)
    else:
        lens = lens.astype(np.int64, copy=False)
        ends_all = np.cumsum(lens)
        total = int(ends_all[-1])
    words = np.zeros((total + 63) // 64 + 1, np.uint64)
    for s0 in range(0, n, _CHUNK):
        c = codes[s0:s0 + _CHUNK]
        if fixed:
            ln = np.int64(lens)
            starts = (np.arange(s0, s0 + c.size, dtype=np.int64)) * ln
        else:
            ln = lens[s0:s0 + _CHUNK]
            starts = ends_all[s0:s0 + _CHUNK] - ln
        w = starts >> 6
        r = 64 - (starts & 63) - ln                 # free bits right of the code in word w
        fits = r >= 0
        sh_l = np.where(fits, r, 0).astype(np.uint64)
        sh_r = np.where(fits, 0, -r).astype(np.uint64)
        _or_into(words, w, np.where(fits, c << sh_l, c >> sh_r))
        spill = ~fits
        if spill.any():                             # the code's low bits start the next word
            _or_into(words, w[spill] + 1, c[spill] << (64 + r[spill]).astype(np.uint64))
    return words.astype(">u8").tobytes()[:(total + 7) // 8]


def _pack_fixed(vals: np.ndarray, b: int) -> bytes:
    """``vals`` as ``b``-bit unsigned numbers (b <= 57), MSB first, padded to a byte."""
    return _pack_varlen(vals, b) if b else b""


def _u64_view(buf) -> np.ndarray:
    """``V[i]`` = bytes ``buf[i:i+8]`` as a big-endian uint64 (zero padded), without copies
    beyond one padded buffer: an overlapping strided view."""
    a = np.zeros(len(buf) + 8, np.uint8)
    a[:len(buf)] = np.frombuffer(buf, np.uint8)
    return np.ndarray(shape=(len(buf) + 1,), dtype=">u8", buffer=a, offset=0, strides=(1,))


def _read_bits(view: np.ndarray, pos: np.ndarray, b: int) -> np.ndarray:
    """The ``b`` (<= 57) bits starting at each bit position ``pos``, as uint64."""
    w = view[pos >> 3].astype(np.uint64)
    return (w >> (64 - b - (pos & 7)).astype(np.uint64)) & np.uint64((1 << b) - 1)


def _unpack_fixed(buf, n: int, b: int) -> np.ndarray:
    if b == 0 or n == 0:
        return np.zeros(n, np.uint64)
    if not 1 <= b <= 57:
        raise _Corrupt("bad bit width")
    need = (n * b + 7) // 8
    if len(buf) < need:
        raise _Corrupt("bit-packed data shorter than its element count")
    view = _u64_view(buf[:need])
    out = np.empty(n, np.uint64)
    for s0 in range(0, n, _CHUNK):
        pos = np.arange(s0, min(n, s0 + _CHUNK), dtype=np.int64) * b
        out[s0:s0 + pos.size] = _read_bits(view, pos, b)
    return out


def _tree_depths(w: np.ndarray) -> np.ndarray:
    """Huffman code lengths for weights ``w`` (all > 0, at least 2), two-queue method."""
    n = w.size
    order = np.argsort(w, kind="stable")
    ws = w[order].tolist()
    parent = [0] * (2 * n - 1)
    iw = [0] * (n - 1)
    i = j = 0
    for t in range(n - 1):
        if i < n and (j >= t or ws[i] <= iw[j]):
            a, wa = i, ws[i]
            i += 1
        else:
            a, wa = n + j, iw[j]
            j += 1
        if i < n and (j >= t or ws[i] <= iw[j]):
            b, wb = i, ws[i]
            i += 1
        else:
            b, wb = n + j, iw[j]
            j += 1
        iw[t] = wa + wb
        parent[a] = parent[b] = n + t
    depth = [0] * (2 * n - 1)
    for v in range(2 * n - 3, -1, -1):
        depth[v] = depth[parent[v]] + 1
    d = np.empty(n, np.int64)
    d[order] = depth[:n]
    return d


def _huffman_lengths(counts: np.ndarray, limit: int = _HUFF_LIMIT) -> np.ndarray:
    """Code length per symbol (0 for symbols that never occur), at most ``limit`` bits."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, np.int64)
    nz = np.flatnonzero(counts)
    if nz.size == 1:
        lengths[nz] = 1
    elif nz.size > 1:
        w = counts[nz]
        while True:
            d = _tree_depths(w)
            if d.max() <= limit:
                break
            w = (w + 1) >> 1            # flatten the distribution until the codes fit the limit
        lengths[nz] = d
    return lengths


def _canonical(lengths: np.ndarray):
    """(symbols in canonical order, their lengths, their codes) for the nonzero ``lengths``."""
    syms = np.flatnonzero(lengths)
    order = syms[np.lexsort((syms, lengths[syms]))]
    ls = lengths[order].astype(np.int64)
    if order.size == 0:
        return order, ls, np.zeros(0, np.uint64), 0
    L = int(ls.max())
    widths = np.left_shift(np.int64(1), L - ls)
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    codes = (starts >> (L - ls)).astype(np.uint64)
    return order, ls, codes, L


_BLOCK = 2048            # symbols per independently decodable Huffman block
_SCALAR_MAX = 32768      # streams up to this many symbols are decoded by a Python loop


def _offset_bytes(n: int) -> int:
    return 4 if n * _HUFF_LIMIT < (1 << 32) else 8


def _huffman_bytes(n: int, total_bits: int) -> int:
    """Exact size of a Huffman stream of ``n`` symbols and ``total_bits`` code bits: the start
    bit of every block of 2048 symbols but the first (u32, u64 for huge streams), then the codes."""
    if n == 0:
        return 0
    return (-(-n // _BLOCK) - 1) * _offset_bytes(n) + (total_bits + 7) // 8


def _huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    order, _, codes, _ = _canonical(lengths)
    code_of = np.zeros(lengths.size, np.uint64)
    code_of[order] = codes
    ln = lengths[symbols]
    body = _pack_varlen(code_of[symbols], ln)
    n = symbols.size
    if n <= _BLOCK:
        return body
    ends = np.cumsum(ln)
    offs = ends[_BLOCK - 1:n - 1:_BLOCK]            # start bit of blocks 1, 2, ...
    return offs.astype(f"<u{_offset_bytes(n)}").tobytes() + body


def _huffman_decode(buf, lengths: np.ndarray, n: int) -> np.ndarray:
    """Decode ``n`` symbols: a lookup table on the next ``max_len`` bits; the blocks are decoded
    in lockstep (one vectorised step per symbol of a block), a single block by a Python loop."""
    if n == 0:
        return np.zeros(0, np.int64)
    order, ls, _, L = _canonical(lengths)
    if order.size == 0 or L > 24:
        raise _Corrupt("bad Huffman table")
    widths = np.left_shift(np.int64(1), L - ls)
    tot = int(widths.sum())
    if tot > (1 << L):
        raise _Corrupt("invalid Huffman code lengths")
    sym_tab = np.zeros(1 << L, np.int64)
    len_tab = np.zeros(1 << L, np.int64)
    sym_tab[:tot] = np.repeat(order, widths)
    len_tab[:tot] = np.repeat(ls, widths)
    nb = -(-n // _BLOCK)
    ob = _offset_bytes(n)
    head = (nb - 1) * ob
    if len(buf) < head:
        raise _Corrupt("Huffman stream ends early")
    starts = np.concatenate([[0], np.frombuffer(buf, f"<u{ob}", count=nb - 1).astype(np.int64)])
    body = buf[head:]
    nbits = 8 * len(body)
    if n > nbits or (starts < 0).any() or (starts > nbits).any():
        raise _Corrupt("Huffman stream ends early")
    view = _u64_view(body)
    shift, mask = 64 - L, (1 << L) - 1
    if n <= _SCALAR_MAX:                            # short streams: one Python walk
        vl = view.tolist()
        lt = len_tab.tolist()
        wins = [0] * n
        p = 0
        bounds = starts.tolist()
        for blk in range(nb):
            if p != bounds[blk]:
                raise _Corrupt("Huffman block boundaries do not match")
            for i in range(blk * _BLOCK, min(n, (blk + 1) * _BLOCK)):
                w = (vl[p >> 3] >> (shift - (p & 7))) & mask
                wins[i] = w
                p += lt[w]
            if p > nbits:
                raise _Corrupt("Huffman stream ends early")
        win = np.asarray(wins, np.int64)
    else:
        P = starts.copy()
        last = view.size - 1
        table = np.empty((_BLOCK, nb), np.int64)
        mask64 = np.uint64(mask)
        for s in range(_BLOCK):
            w = ((view[np.minimum(P >> 3, last)].astype(np.uint64)
                  >> (shift - (P & 7)).astype(np.uint64)) & mask64).astype(np.int64)
            table[s] = w
            P += len_tab[w]
        if not np.array_equal(P[:-1], starts[1:]):
            raise _Corrupt("Huffman block boundaries do not match")
        win = table.T.reshape(-1)[:n]
        tail = win[(nb - 1) * _BLOCK:]
        if starts[-1] + int(len_tab[tail].sum()) > nbits:
            raise _Corrupt("Huffman stream ends early")
    if (len_tab[win] == 0).any():
        raise _Corrupt("invalid Huffman code in stream")
    return sym_tab[win]


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


# ============================================================================ saving

class _Saver:
    def __init__(self, model: nn.Module, huffman: bool):
        self.huffman = huffman
        self.objects: list[dict] = []
        self._obj_of: dict[int, int] = {}
        self._registered: set[int] = set()
        for m in model.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    self._registered.add(id(t))
        self.module_paths: dict[int, str] = {}
        self.no_huffman: set[int] = set()    # objects of modules with nbc_huffman = False

    # ------------------------------------------------------------------ tensors
    def ref(self, t: Any, name: str, where: str, provisional: bool = False) -> int:
        """The object id of tensor ``t`` (registering it on first sight). ``provisional``: the
        reference comes from an attribute; the tensor is named by its parameter/buffer slot."""
        key = id(t)
        if key in self._obj_of:
            oi = self._obj_of[key]
            o = self.objects[oi]
            if not provisional:
                if o["provisional"]:
                    o["names"], o["provisional"] = [name], False
                else:
                    o["names"].append(name)
            return oi
        if type(t) not in (torch.Tensor, nn.Parameter):
            if isinstance(t, nn.parameter.UninitializedParameter):
                raise BadInput(f"cannot save {where}: '{name}' is an uninitialized (lazy) "
                               f"parameter; run one forward pass first")
            raise BadInput(f"cannot save {where}: '{name}' is a {type(t).__qualname__} (only plain "
                           f"tensors and nn.Parameter are supported)")
        if t.layout != torch.strided:
            raise BadInput(f"cannot save {where}: '{name}' has layout {t.layout} (convert it with "
                           f".to_dense() first)")
        if t.is_quantized:
            raise BadInput(f"cannot save {where}: '{name}' is a quantized tensor ({t.dtype}); "
                           f"register a module codec that exports int_repr() and the scales")
        if t.device.type == "meta":
            raise BadInput(f"cannot save {where}: '{name}' is on the meta device (no data)")
        if t.dtype not in _DTYPES.values():
            raise BadInput(f"cannot save {where}: '{name}' has unsupported dtype {t.dtype}")
        oi = len(self.objects)
        self._obj_of[key] = oi
        self.objects.append({"t": t, "names": [name], "param": isinstance(t, nn.Parameter),
                             "rg": bool(t.requires_grad), "provisional": provisional})
        return oi

    # ------------------------------------------------------------------ attributes
    def enc(self, v: Any, what: str, depth: int = 0) -> Any:
        try:
            return self._enc(v, what, depth)
        except _Unsupported as e:
            if e.depth is None:
                e.depth = depth
            raise

    def _enc(self, v: Any, what: str, depth: int) -> Any:
        if depth > 64:
            raise _Unsupported("nested too deeply")
        t = type(v)
        if v is None or t is bool or t is str or t is int:
            return v
        if t is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if t is list:
            return [self.enc(x, what, depth + 1) for x in v]
        if t is tuple:
            return {"$tuple": [self.enc(x, what, depth + 1) for x in v]}
        if t is torch.Size:
            return {"$size": [int(x) for x in v]}
        if t is dict:
            bad = [k for k in v if type(k) is not str]
            if bad:
                raise _Unsupported(f"a dict with a non-str key {bad[0]!r}")
            return {"$dict": {k: self.enc(x, what, depth + 1) for k, x in v.items()}}
        if t is torch.dtype:
            name = str(v).replace("torch.", "")
            if _ALL_DTYPES.get(name) is v:
                return {"$dtype": name}
        if t is torch.device:
            return {"$device": str(v)}
        if isinstance(v, torch.Tensor):
            if id(v) in self._registered:
                return {"$t": self.ref(v, what, what, provisional=True)}
            raise _Unsupported("a Tensor that is not a registered parameter or buffer "
                               "(register it with register_buffer)")
        if isinstance(v, (types.FunctionType, types.BuiltinFunctionType)):
            name = getattr(v, "__name__", "")
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or "") and getattr(F, name, None) is v:
                return {"$fn": name}
            raise _Unsupported("a function")
        if isinstance(v, nn.Module):
            raise _Unsupported("a Module that is not a registered submodule")
        if isinstance(v, (types.MethodType, types.BuiltinMethodType)):
            raise _Unsupported("a method")
        if callable(v) and not isinstance(v, type):
            raise _Unsupported(f"a callable {_type_name(v)}")
        if type(v).__name__ == "ScriptObject":
            raise _Unsupported("a torch ScriptObject (packed kernels need a module codec: see "
                               "nbcompress.storage.register_module_codec)")
        raise _Unsupported(f"a {_type_name(v)}")

    # ------------------------------------------------------------------ modules
    def node(self, m: nn.Module, path: str) -> dict:
        if id(m) in self.module_paths:
            return {"same_as": self.module_paths[id(m)]}
        self.module_paths[id(m)] = path
        where = _where(m, path)
        cls = type(m)
        if torch.nn.utils.parametrize.is_parametrized(m):
            raise BadInput(f"cannot save {where}: it has parametrizations "
                           f"(torch.nn.utils.parametrize); remove them first with "
                           f"torch.nn.utils.parametrize.remove_parametrizations(module, name)")
        if any(isinstance(h, torch.nn.utils.prune.BasePruningMethod)
               for h in m._forward_pre_hooks.values()):
            raise BadInput(f"cannot save {where}: it carries torch.nn.utils.prune masks; make them "
                           f"permanent with torch.nn.utils.prune.remove(module, name) first")
        qual = _class_name(cls)
        codec = _CODECS.get(cls)
        if codec is not None or hasattr(cls, "nbc_export"):
            try:
                attrs, tensors = codec[0](m) if codec is not None else m.nbc_export()
            except BadInput:
                raise
            except Exception as e:  # noqa: BLE001 - one clear line naming the module
                raise BadInput(f"cannot save {where}: its codec failed: {type(e).__name__}: "
                               f"{e}") from None
            if not isinstance(attrs, dict) or not isinstance(tensors, dict):
                raise BadInput(f"cannot save {where}: its codec must return (attrs: dict, "
                               f"tensors: dict)")
            out = {"class": qual, "training": bool(m.training),
                   "codec": "registered" if codec is not None else "method",
                   "attrs": self._attrs(attrs, where, "codec attribute"), "tensors": {}}
            for k, t in tensors.items():
                if type(k) is not str:
                    raise BadInput(f"cannot save {where}: codec tensor names must be str")
                if not isinstance(t, torch.Tensor):
                    raise BadInput(f"cannot save {where}: codec tensor '{k}' is a "
                                   f"{_type_name(t)}, not a Tensor")
                out["tensors"][k] = self.ref(t, _join(path, k), where)
            self._huffman_flag(m, out["tensors"].values())
            return out

        skip: set[str] = set()
        for base, names, _ in _DERIVED:
            if isinstance(m, base):
                skip.update(names)
        attrs = {k: v for k, v in m.__dict__.items()
                 if k not in _BOOKKEEPING and k not in skip and not _is_hook_dict(k)}
        node = {"class": qual, "training": bool(m.training),
                "attrs": self._attrs(attrs, where, "attribute")}
        node["params"] = {k: (None if p is None else self.ref(p, _join(path, k), where))
                          for k, p in m._parameters.items()}
        node["buffers"] = {k: (None if b is None else self.ref(b, _join(path, k), where))
                           for k, b in m._buffers.items()}
        self._huffman_flag(m, [*node["params"].values(), *node["buffers"].values()])
        node["nonpersistent"] = [k for k in m._buffers if k in m._non_persistent_buffers_set]
        node["children"] = {k: (None if c is None else self.node(c, _join(path, k)))
                            for k, c in m._modules.items()}
        return node

    def _huffman_flag(self, m: nn.Module, object_ids) -> None:
        """A module with ``nbc_huffman = False`` (e.g. quantized without ``--huffman``) has its
        own tensors packed without Huffman codes even when ``save(huffman=True)``."""
        if getattr(m, "nbc_huffman", None) is False:
            self.no_huffman.update(i for i in object_ids if i is not None)

    def _attrs(self, attrs: dict, where: str, word: str) -> dict:
        out = {}
        for k, v in attrs.items():
            if type(k) is not str:
                raise BadInput(f"cannot save {where}: {word} name {k!r} is not a str")
            try:
                out[k] = self.enc(v, _join(where.split(" ")[0], k))
            except _Unsupported as e:
                verb = "is" if not e.depth else "contains"
                raise BadInput(f"cannot save {where}: {word} '{k}' {verb} {e}") from None
        return out

    # ------------------------------------------------------------------ tensor table
    def tensor_table(self) -> tuple[list[dict], list[dict], list[torch.Tensor]]:
        """Group objects by storage: returns (objects json, tensors json-without-enc, arrays)."""
        groups: dict[tuple, list[int]] = {}
        for oi, o in enumerate(self.objects):
            t = o["t"]
            if t.numel() == 0:
                key: tuple = ("solo", oi)
            else:
                st = t.untyped_storage()
                key = (t.device.type, t.device.index, st.data_ptr(), t.dtype)
            groups.setdefault(key, []).append(oi)
        objects: list[dict] = [{} for _ in self.objects]
        tensors: list[dict] = []
        arrays: list[torch.Tensor] = []
        for members in groups.values():
            ts = [self.objects[i]["t"].detach() for i in members]
            views = {(t.storage_offset(), tuple(t.shape), tuple(t.stride())) for t in ts}
            names = [n for i in members for n in self.objects[i]["names"]]
            ti = len(tensors)
            if len(views) == 1 and ts[0].is_contiguous():
                arr = ts[0]
                for i in members:
                    objects[i] = {"tensor": ti, "view": None}
            else:
                lo = min(t.storage_offset() for t in ts)
                hi = max(t.storage_offset() + sum((s - 1) * st for s, st in
                                                  zip(t.shape, t.stride())) + 1 for t in ts)
                arr = ts[0].as_strided((hi - lo,), (1,), lo)
                for i, t in zip(members, ts):
                    objects[i] = {"tensor": ti, "view": [t.storage_offset() - lo, list(t.shape),
                                                         list(t.stride())]}
            for i in members:
                objects[i].update(param=self.objects[i]["param"],
                                  requires_grad=self.objects[i]["rg"])
            tensors.append({"name": names[0], "aliases": names[1:], "shape": list(arr.shape),
                            "dtype": str(arr.dtype).replace("torch.", "")})
            if any(i in self.no_huffman for i in members):
                tensors[-1]["_no_huffman"] = True
            arrays.append(arr)
        return objects, tensors, arrays


class _Unsupported(Exception):
    def __init__(self, msg: str):
        super().__init__(msg)
        self.depth: int | None = None


def _type_name(v: Any) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _is_hook_dict(k: str) -> bool:
    return k.startswith("_") and "hook" in k


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module_path(path: str) -> str:
    return f"model.{path}" if path else "model"


def _where(m: nn.Module, path: str) -> str:
    return f"{_module_path(path)} ({type(m).__name__})"


def _build(model: nn.Module, huffman: bool) -> bytes:
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    saver = _Saver(model, huffman)
    root = saver.node(model, "")
    objects, tensors, arrays = saver.tensor_table()
    blobs: list[bytes] = []
    for tj, arr in zip(tensors, arrays):
        u = _bits_of(arr)
        segs, rec = _encode(u, u.dtype.itemsize, huffman and not tj.pop("_no_huffman", False))
        tj["enc"] = rec
        tj["seg"] = [len(s) for s in segs]
        blobs.extend(segs)
    blob = b"".join(blobs)
    header = {"crc32": _CRC_BLANK, "format": "nbcompress", "version": FORMAT_VERSION,
              "huffman": bool(huffman), "torch": torch.__version__.split("+")[0], "root": root,
              "objects": objects, "tensors": tensors, "blob_bytes": len(blob)}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                    ).encode("utf-8")
    crc = b"%08x" % (zlib.crc32(blob, zlib.crc32(hb)) & 0xFFFFFFFF)
    hb = hb[:_CRC_AT] + crc + hb[_CRC_AT + 8:]
    packed = zlib.compress(hb, 9)
    if len(packed) < len(hb):
        hb = packed
    return MAGIC + _LEN.pack(len(hb)) + hb + blob


def save(model: nn.Module, path_or_file, *, huffman: bool = True) -> int:
    """Write ``model`` (architecture, parameters, buffers, attributes, train/eval mode) to a path
    or a writable binary file object. Returns the number of bytes written.

    Raises :class:`BadInput` (naming the module) for anything that cannot be stored safely: an
    attribute that is not plain data, a parametrized or prune-hooked module, a tensor subclass.
    Forward/backward hooks are not saved.
    """
    data = _build(model, huffman)
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise BadInput(f"cannot write {path}: {e.strerror or e}") from None
    elif hasattr(path_or_file, "write"):
        path_or_file.write(data)
    else:
        raise BadInput(f"save needs a path or a writable binary file, got "
                       f"{type(path_or_file).__name__}")
    return len(data)


# ============================================================================ loading

def _read(path_or_file) -> tuple[dict, memoryview]:
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        try:
            with open(path, "rb") as f:
                header, blob, extra = _read_stream(f)
        except FileNotFoundError:
            raise BadInput(f"no such file: {path}") from None
        except IsADirectoryError:
            raise BadInput(f"{path} is a directory, not an nbcompress file") from None
        if extra:
            raise BadInput(f"corrupt nbcompress file: unexpected data after the end ({path})")
        return header, blob
    if hasattr(path_or_file, "read"):
        header, blob, _ = _read_stream(path_or_file, check_end=False)
        return header, blob
    raise BadInput(f"load needs a path or a readable binary file, got "
                   f"{type(path_or_file).__name__}")


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if data is None:
        data = b""
    if isinstance(data, str):
        raise BadInput("the file is open in text mode; open it with 'rb'")
    return bytes(data)


def _read_stream(f, check_end: bool = True) -> tuple[dict, memoryview, bool]:
    """(header, blob, whether more bytes follow). ``header["_overhead"]``: the bytes before the
    blob (magic, header length, JSON header)."""
    head = _read_exact(f, _PREFIX_BYTES)
    if not head:
        raise BadInput("not an nbcompress file (it is empty)")
    if head[:len(MAGIC)] != MAGIC[:min(len(head), len(MAGIC))]:
        raise BadInput("not an nbcompress file (it does not start with NBC1)")
    if len(head) < _PREFIX_BYTES:
        raise BadInput("truncated nbcompress file (it ends inside the file prefix)")
    (hlen,) = _LEN.unpack(head[len(MAGIC):])
    hb = _read_exact(f, hlen)
    if len(hb) < hlen:
        raise BadInput("truncated nbcompress file (it ends inside the header)")
    if hb[:1] != b"{":                          # zlib-compressed JSON
        try:
            d = zlib.decompressobj()
            hb = d.decompress(hb, _MAX_HEADER)
            if d.unconsumed_tail or not d.eof or d.unused_data:
                raise zlib.error
        except zlib.error:
            raise BadInput("corrupt nbcompress file: the header does not decompress") from None
    try:
        header = json.loads(hb.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadInput("corrupt nbcompress file: the header is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != "nbcompress":
        raise BadInput("not an nbcompress file (the header is not an nbcompress header)")
    if header.get("version") != FORMAT_VERSION:
        raise BadInput(f"unsupported nbcompress file version {header.get('version')!r} "
                       f"(this nbcompress reads version {FORMAT_VERSION})")
    nblob = header.get("blob_bytes")
    if type(nblob) is not int or nblob < 0:
        raise BadInput("corrupt nbcompress file: bad blob length")
    blob = _read_exact(f, nblob)
    if len(blob) < nblob:
        raise BadInput(f"truncated nbcompress file (the data ends after {len(blob)} of "
                       f"{nblob} bytes)")
    if hb[:_CRC_AT] == _CRC_KEY:
        # a changed bit in the header or the packed data would otherwise load as a silently
        # different model
        blank = hb[:_CRC_AT] + _CRC_BLANK.encode() + hb[_CRC_AT + 8:]
        crc = b"%08x" % (zlib.crc32(blob, zlib.crc32(blank)) & 0xFFFFFFFF)
        if crc != hb[_CRC_AT:_CRC_AT + 8]:
            raise BadInput("corrupt nbcompress file: its bytes do not match their CRC-32 checksum")
    extra = bool(_read_exact(f, 1)) if check_end else False
    header["_overhead"] = _PREFIX_BYTES + hlen
    return header, memoryview(blob), extra


def _tensor_entries(header: dict) -> list[tuple[dict, int]]:
    """(tensor record, blob offset) for each stored tensor, with the segment sizes checked."""
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise _Corrupt("no tensor table")
    out, off = [], 0
    for tj in tensors:
        seg = tj.get("seg") if isinstance(tj, dict) else None
        if not (isinstance(seg, list) and len(seg) == 5
                and all(type(s) is int and s >= 0 for s in seg)):
            raise _Corrupt("bad segment table")
        out.append((tj, off))
        off += sum(seg)
    if off != header["blob_bytes"]:
        raise _Corrupt("segment sizes do not add up to the data length")
    return out


def _decode_tensor(tj: dict, off: int, blob: memoryview) -> torch.Tensor:
    dtype = _DTYPES.get(tj.get("dtype"))
    if dtype is None:
        raise _Corrupt(f"unknown dtype {tj.get('dtype')!r}")
    shape = tj.get("shape")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise _Corrupt("bad shape")
    n = math.prod(shape) * (2 if dtype in _COMPLEX_PART else 1)
    if n > (1 << 36):
        raise _Corrupt("implausible tensor size")
    isz = _COMPLEX_PART.get(dtype, dtype).itemsize
    segs = []
    for s in tj["seg"]:
        segs.append(bytes(blob[off:off + s]))
        off += s
    rec = tj.get("enc")
    if not isinstance(rec, dict):
        raise _Corrupt("missing encoding record")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return _tensor_from_bits(_decode(segs, rec, n, isz), dtype, shape)


class _Resolver:
    def __init__(self, classes: Iterable, trusted_modules: Iterable[str]):
        if isinstance(classes, type):
            classes = [classes]
        if isinstance(trusted_modules, str):
            trusted_modules = [trusted_modules]
        self.by_name: dict[str, type] = {_class_name(c): c for c in _CODECS}
        for c in classes or ():
            if not isinstance(c, type):
                raise BadInput(f"classes= must hold classes, got {c!r}")
            self.by_name[_class_name(c)] = c
        self.prefixes = tuple(p.strip(".") for p in (*SAFE_PREFIXES, *(trusted_modules or ()))
                              if isinstance(p, str) and p.strip("."))

    def __call__(self, name: Any) -> type:
        if not isinstance(name, str) or not name:
            raise _Corrupt("bad class name")
        if name in self.by_name:
            return self.by_name[name]
        short = name.rsplit(".", 1)[-1]
        if not any(name.startswith(p + ".") for p in self.prefixes) or "<" in name:
            raise BadInput(f"refusing to import {name} from file; pass classes=[{short}] if you "
                           f"trust this file")
        parts = name.split(".")
        mod = None
        for i in range(len(parts) - 1, 0, -1):
            modname = ".".join(parts[:i])
            if not any(modname == p or modname.startswith(p + ".") for p in self.prefixes):
                break
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            obj: Any = mod
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if (isinstance(obj, type) and issubclass(obj, nn.Module)
                    and _class_name(obj) == name):
                return obj
            break
        if mod is None:
            raise BadInput(f"cannot load: class {name} named in the file cannot be imported here")
        raise BadInput(f"cannot load: {name} named in the file is not an nn.Module class "
                       f"found at that name")


class _Loader:
    def __init__(self, header: dict, blob: memoryview, resolver: _Resolver, device: torch.device):
        self.resolve = resolver
        self.modules: dict[str, nn.Module] = {}
        bases = [_decode_tensor(tj, off, blob).to(device) for tj, off in _tensor_entries(header)]
        self.objects: list[torch.Tensor] = []
        used: set[int] = set()
        objs = header.get("objects")
        if not isinstance(objs, list):
            raise _Corrupt("no object table")
        for o in objs:
            ti = o["tensor"]
            if type(ti) is not int or not 0 <= ti < len(bases):
                raise _Corrupt("object points at no tensor")
            base = bases[ti]
            view = o.get("view")
            if view is None:
                t = base if ti not in used else base.view(base.shape)
                used.add(ti)
            else:
                off, shape, stride = view
                if base.dim() != 1:
                    raise _Corrupt("view of a non-flat storage")
                if len(shape) != len(stride) or any(type(x) is not int or x < 0
                                                    for x in [off, *shape, *stride]):
                    raise _Corrupt("bad view")
                if math.prod(shape) and off + sum((s - 1) * st for s, st in zip(shape, stride)) \
                        >= base.numel():
                    raise _Corrupt("view outside its storage")
                t = base.as_strided(shape, stride, off)
            if o.get("param"):
                t = nn.Parameter(t, requires_grad=bool(o.get("requires_grad", True))
                                 and (t.is_floating_point() or t.is_complex()))
            elif o.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
                t = t.requires_grad_()
            self.objects.append(t)

    def obj(self, ref: Any, param: bool | None = None) -> torch.Tensor | None:
        if ref is None:
            return None
        if type(ref) is not int or not 0 <= ref < len(self.objects):
            raise _Corrupt("bad tensor reference")
        t = self.objects[ref]
        if param is True and not isinstance(t, nn.Parameter):
            raise _Corrupt("a parameter slot refers to a non-parameter tensor")
        return t

    def dec(self, v: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise _Corrupt("attributes nested too deeply")
        if v is None or type(v) in (bool, int, float, str):
            return v
        if type(v) is list:
            return [self.dec(x, depth + 1) for x in v]
        if type(v) is not dict or len(v) != 1:
            raise _Corrupt("bad attribute value")
        (tag, x), = v.items()
        if tag == "$tuple" and type(x) is list:
            return tuple(self.dec(y, depth + 1) for y in x)
        if tag == "$dict" and type(x) is dict:
            return {str(k): self.dec(y, depth + 1) for k, y in x.items()}
        if tag == "$float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "$size" and type(x) is list and all(type(y) is int for y in x):
            return torch.Size(x)
        if tag == "$dtype" and x in _ALL_DTYPES:
            return _ALL_DTYPES[x]
        if tag == "$device" and type(x) is str:
            try:
                return torch.device(x)
            except (RuntimeError, ValueError):
                raise _Corrupt(f"bad device {x!r}") from None
        if tag == "$t":
            return self.obj(x)
        if tag == "$fn" and type(x) is str and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", x):
            f = getattr(F, x, None)
            if isinstance(f, (types.FunctionType, types.BuiltinFunctionType)):
                return f
        raise _Corrupt(f"bad attribute value tag {tag!r}")

    def build(self, node: Any, path: str) -> nn.Module:
        if not isinstance(node, dict):
            raise _Corrupt("bad module node")
        if "same_as" in node:
            m = self.modules.get(node["same_as"])
            if m is None:
                raise _Corrupt("reference to an unknown module")
            return m
        cls = self.resolve(node.get("class"))
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise BadInput(f"cannot load: {node.get('class')} is not an nn.Module class")
        training = node.get("training")
        if type(training) is not bool:
            raise _Corrupt("bad training flag")
        where = f"{_module_path(path)} ({cls.__name__})"
        if "codec" in node:
            attrs = {k: self.dec(v) for k, v in _dict(node.get("attrs")).items()}
            tensors = {k: self.obj(r) for k, r in _dict(node.get("tensors")).items()}
            codec = _CODECS.get(cls)
            if codec is not None:
                importer = codec[1]
            elif hasattr(cls, "nbc_import"):
                importer = cls.nbc_import
            else:
                raise BadInput(f"cannot load {where}: it was saved by a module codec and none "
                               f"is registered here (import the module that registers it)")
            try:
                m = importer(attrs, tensors)
            except BadInput:
                raise
            except Exception as e:  # noqa: BLE001 - report the codec's failure as one line
                raise BadInput(f"cannot load {where}: its codec failed: {type(e).__name__}: "
                               f"{e}") from None
            if not isinstance(m, nn.Module):
                raise BadInput(f"cannot load {where}: its codec returned "
                               f"{type(m).__name__}, not an nn.Module")
            m.train(training)
            self.modules[path] = m
            return m
        try:
            obj = cls.__new__(cls)
            nn.Module.__init__(obj)
        except Exception as e:  # noqa: BLE001 - a class that cannot be made without its __init__
            raise BadInput(f"cannot load {where}: {type(e).__name__}: {e}") from None
        self.modules[path] = obj
        d = obj.__dict__
        for k, v in _dict(node.get("attrs")).items():
            if k in _BOOKKEEPING or _is_hook_dict(k) or k.startswith("__"):
                raise _Corrupt(f"attribute name {k!r} is not allowed")
            d[k] = self.dec(v)
        d["training"] = training
        for k, r in _dict(node.get("params")).items():
            obj._parameters[k] = self.obj(r, param=True)
        for k, r in _dict(node.get("buffers")).items():
            obj._buffers[k] = self.obj(r)
        nonpersistent = node.get("nonpersistent", [])
        if not (isinstance(nonpersistent, list) and all(k in obj._buffers for k in nonpersistent)):
            raise _Corrupt("bad non-persistent buffer list")
        obj._non_persistent_buffers_set.update(nonpersistent)
        for k, c in _dict(node.get("children")).items():
            obj._modules[k] = None if c is None else self.build(c, _join(path, k))
        for base, _, method in _DERIVED:
            if isinstance(obj, base):
                getattr(obj, method)()
        return obj


def _dict(v: Any) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(type(k) is str for k in v):
        raise _Corrupt("bad table in module node")
    return v


def load(path_or_file, *, classes: Iterable[type] = (), trusted_modules: Iterable[str] = (),
         map_location="cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save`, without unpickling anything.

    Module classes are imported only from ``torch.nn``, ``torch.ao.nn``, ``nbcompress`` and the
    ``trusted_modules`` prefixes; other classes (e.g. defined in a notebook) must be passed in
    ``classes=`` and are matched by module and qualified name. Corrupt, truncated or foreign
    files raise :class:`BadInput`.
    """
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"unknown map_location {map_location!r}") from None
    resolver = _Resolver(classes, trusted_modules)
    header, blob = _read(path_or_file)
    try:
        loader = _Loader(header, blob, resolver, device)
        return loader.build(header.get("root"), "")
    except _Corrupt as e:
        raise BadInput(f"corrupt nbcompress file: {e}") from None
    except MemoryError:
        raise BadInput("corrupt nbcompress file: a tensor too large to allocate") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
            OverflowError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"corrupt nbcompress file: {type(e).__name__}: {e}") from None


# ============================================================================ describing

def describe(path_or_file) -> list[dict]:
    """One dict per stored tensor: name (and aliases), shape, dtype, numel, nnz, encoding, and its
    bytes split into ``positions`` (mask / gap stream and its Huffman table), ``indices``
    (codebook indices), ``codebook`` (distinct values and the index Huffman table), ``raw`` (raw
    values); ``bytes`` is their sum and ``bits_per_element`` ``8 * bytes / numel``.

    The ``bytes`` of all rows add up to the file size minus the overhead: 4 magic bytes, the 4-byte
    header length and the JSON header (module tree, attributes, encodings).
    """
    header, _ = _read(path_or_file)
    try:
        entries = _tensor_entries(header)
        rows = []
        for tj, _off in entries:
            pt, p, cb, vt, v = tj["seg"]
            rec = tj["enc"]
            raw = rec["val"] == "raw"
            numel = math.prod(tj["shape"])
            total = pt + p + cb + vt + v
            rows.append({"name": tj["name"], "aliases": list(tj.get("aliases", [])),
                         "shape": tuple(tj["shape"]), "dtype": tj["dtype"], "numel": numel,
                         "nnz": rec.get("nnz", 0), "encoding": _encoding_name(rec),
                         "positions": pt + p, "indices": 0 if raw else v,
                         "codebook": cb + vt, "raw": v if raw else 0, "bytes": total,
                         "bits_per_element": 8.0 * total / numel if numel else 0.0})
        return rows
    except (_Corrupt, KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        if isinstance(e, BadInput):
            raise
        raise BadInput(f"corrupt nbcompress file: {e}") from None


def breakdown(model: nn.Module, huffman: bool = True) -> list[dict]:
    """:func:`describe` of what :func:`save` would write for ``model``, without writing a file."""
    return describe(io.BytesIO(_build(model, huffman)))


def overhead_bytes(path_or_file) -> int:
    """Bytes of the file that are not tensor data: magic, header length and JSON header."""
    header, _ = _read(path_or_file)
    return header["_overhead"]
