"""The gaps between a flat array's nonzero elements, as :mod:`.codec` plans their coding: the
gaps-minus-one themselves (:func:`_gaps`, what is written) and their histogram (what the plan needs:
every gap coding's size follows from it), computed on the whole array (saving) or streamed over it
in chunks without position arrays the size of the array (measuring: :func:`_streamed_gap_histogram`,
reading the packed nonzero mask a byte at a time when nonzeros are not rare)."""
from __future__ import annotations

import numpy as np
import torch

_HIST = 1 << 20          # gaps below this are counted in one bincount; longer ones are few


def _gaps(idx: np.ndarray) -> np.ndarray:
    """Gaps minus one between consecutive nonzero positions ``idx`` (the first from -1)."""
    d = np.empty(idx.size, np.int64)
    if idx.size:
        d[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=d[1:])
        d[1:] -= 1
    return d


def _gap_histogram(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct gaps-minus-one, their counts): every bit width's sizes follow from these, so the
    search over widths costs the number of distinct gaps, not the number of nonzeros."""
    if d.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    big = d >= _HIST if int(d.max()) >= _HIST else None
    nbig = int(np.count_nonzero(big)) if big is not None else 0
    small = d[~big] if nbig else d
    h = np.bincount(small) if small.size else np.zeros(0, np.int64)
    v = np.flatnonzero(h)
    c = h[v]
    if nbig:                    # at most n / 2**20 of them: the sum of the gaps is below n
        bv, bc = np.unique(d[big], return_counts=True)
        v, c = np.concatenate([v, bv]), np.concatenate([c, bc])
    return v.astype(np.int64), c.astype(np.int64)


_CHUNK = 1 << 16         # elements a streamed pass over a tensor looks at at once


def _streamed_gap_histogram(u: np.ndarray, nnz: int | None = None) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """:func:`_gap_histogram` of ``_gaps(np.flatnonzero(u))``, streamed over ``u`` in chunks:
    no array of all the nonzero positions and gaps (16 bytes a nonzero) is made, so measuring a
    sparse tensor needs a few MB of scratch, reused from chunk to chunk, instead of fresh memory
    the size of the tensor. With ``nnz`` (the nonzero count) of at least 1/32 of the elements the
    chunks are read as packed bits, a byte at a time (:func:`_byte_gap_histogram`)."""
    if nnz is not None and 32 * nnz >= u.size:
        return _byte_gap_histogram(u)
    hist = np.zeros(0, np.int64)
    big: list[np.ndarray] = []
    last = -1
    for start in range(0, u.size, _CHUNK):
        i = np.flatnonzero(u[start:start + _CHUNK] != 0)
        if not i.size:
            continue
        d = np.empty(i.size, np.int64)
        d[0] = i[0] + start - last - 1
        np.subtract(i[1:], i[:-1], out=d[1:])
        d[1:] -= 1
        last = int(i[-1]) + start
        hist = _add_gaps(hist, d, big)
    return _histogram_items(hist, big)


def _add_gaps(hist: np.ndarray, d: np.ndarray, big: list) -> np.ndarray:
    """``hist`` plus the bincount of gaps ``d`` (of one chunk: only ``d[0]`` can reach past the
    chunk, and one that long, 2**20 or more, goes to ``big`` rather than into a bincount)."""
    if d.size and int(d[0]) >= _HIST:
        big.append(d[:1].copy())
        d = d[1:]
    if not d.size:
        return hist
    h = np.bincount(d)
    if h.size > hist.size:
        h[:hist.size] += hist
        return h
    hist[:h.size] += h
    return hist


def _histogram_items(hist: np.ndarray, big: list) -> tuple[np.ndarray, np.ndarray]:
    v = np.flatnonzero(hist)
    c = hist[v]
    if big:
        bv, bc = np.unique(np.concatenate(big), return_counts=True)
        v, c = np.concatenate([v, bv]), np.concatenate([c, bc])
    return v.astype(np.int64), c.astype(np.int64)


def _byte_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each byte of a packed mask (``np.packbits``: the first element in the top bit): the
    place of its first set bit, of its last set bit, and how many of each gap 0..6 lie between
    its set bits."""
    first = np.zeros(256, np.int64)
    last = np.zeros(256, np.int64)
    inner = np.zeros((256, 7), np.int64)
    for b in range(1, 256):
        at = [k for k in range(8) if b >> (7 - k) & 1]
        first[b], last[b] = at[0], at[-1]
        for x, y in zip(at, at[1:]):
            inner[b, y - x - 1] += 1
    return first, last, inner


_FIRST_BIT, _LAST_BIT, _INNER_GAPS = _byte_tables()
_BYTE_CHUNK = 1 << 19      # elements (a multiple of 8: chunks start on a byte)
# per byte of a packed mask: its set bits with at least 3 / 7 clear bits of the same byte just
# before them (each is a nonzero whose gap-minus-one is at least 3 / 7)
_AFTER_3 = _INNER_GAPS[:, 3:].sum(1) + (_FIRST_BIT >= 3) * (np.arange(256) > 0)
_AFTER_7 = (np.arange(256) == 1).astype(np.int64)


def _packed_mask(c: np.ndarray) -> np.ndarray:
    """``np.packbits(c != 0)``; bytes are packed as they are (packbits sets a bit for any nonzero
    element: one pass, not two, 2.2x faster)."""
    return np.packbits(c) if c.dtype.itemsize == 1 else np.packbits(c != 0)


def fixed_gaps_lose(u: np.ndarray, nnz: int, budget: int) -> bool:
    """True when no fixed-width gap coding of ``u``'s nonzero positions can take fewer than
    ``budget`` bytes (the bitmask's), proved without the gaps' histogram: with ``b``-bit symbols
    (filler ``C = 2**b - 1``) the stream has ``nnz + sum(gap // C)`` symbols, exactly ``last + 1``
    for ``b = 1`` (``last``: the last nonzero's place), at least ``nnz`` plus the gaps of 3 (7)
    or more seen inside single bytes of the packed mask for ``b = 2`` (3), at least ``nnz`` for
    wider symbols. The mask's bytes are read only until the bound is reached: int8 codes of a
    pruned layer (about half nonzero) are decided from ``nnz`` and a fifth of the mask, where the
    histogram of every gap (:func:`_byte_gap_histogram`) reads all of it, several times slower."""
    n = u.size
    tail = 4096
    while True:                                   # the last nonzero, from the end
        at = np.flatnonzero(u[max(0, n - tail):])
        if at.size or tail >= n:
            break
        tail *= 8
    last = n - min(tail, n) + int(at[-1]) if at.size else -1
    if (last + 8) // 8 < budget or (4 * nnz + 7) // 8 < budget:
        return False
    need3 = -(-(8 * budget - 7 - 2 * nnz) // 2)   # the b = 2 (3) bound reaches the budget with
    need7 = -(-(8 * budget - 7 - 3 * nnz) // 3)   # this many long gaps
    got3 = got7 = 0
    for start in range(0, n, _BOUND_CHUNK):
        if got3 >= need3 and got7 >= need7:
            return True
        seen = torch.bincount(torch.from_numpy(_packed_mask(u[start:start + _BOUND_CHUNK])),
                              minlength=256).numpy()      # (torch: 2x numpy's bincount of bytes)
        got3 += int(seen @ _AFTER_3)
        got7 += int(seen[1])
    return got3 >= need3 and got7 >= need7


_BOUND_CHUNK = 1 << 17    # elements (a multiple of 8)


def _byte_gap_histogram(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_streamed_gap_histogram` read from the packed nonzero mask: the gaps inside a byte
    are counted from a table by the bytes' own histogram, and only the gaps between bytes are
    computed one by one (one per nonzero byte, not one per nonzero): about 1.7x faster when at
    least 1 element in 32 is nonzero."""
    hist = np.zeros(7, np.int64)
    bytes_seen = np.zeros(256, np.int64)
    big: list[np.ndarray] = []
    last = -1
    for start in range(0, u.size, _BYTE_CHUNK):
        packed = _packed_mask(u[start:start + _BYTE_CHUNK])
        bytes_seen += np.bincount(packed, minlength=256)
        j = np.flatnonzero(packed != 0)
        if not j.size:
            continue
        b = packed[j]
        j *= 8
        first = np.take(_FIRST_BIT, b)
        first += j
        end = np.take(_LAST_BIT, b)
        end += j
        g0 = int(first[0]) + start - last - 1
        first[1:] -= end[:-1]                    # the gap before each nonzero byte's first bit
        first[1:] -= 1
        first[0] = g0
        last = int(end[-1]) + start
        hist = _add_gaps(hist, first, big)
    hist[:7] += bytes_seen @ _INNER_GAPS
    return _histogram_items(hist, big)
