"""What a sample of a flat unsigned array proves about its codebook, without counting every
value: :func:`_no_codebook` (more distinct values than a codebook holds, wide elements) and
:func:`_no_byte_codebook` (a byte codebook's indices as wide as the bytes). Used by
:func:`nbcompress.storage.codec._plan` to skip an exact count that cannot change the choice."""
from __future__ import annotations

import numpy as np

MAX_CODEBOOK = 1 << 16      # distinct values a codebook may hold


_SAMPLE = 73_728          # elements drawn to prove that a tensor cannot use a codebook (> 65536)
_RUN = 512               # drawn as runs of this many neighbours (contiguous reads)


def _draw(a: np.ndarray, count: int, rng) -> np.ndarray:
    """About ``count`` elements of ``a``: runs of ``_RUN`` neighbours at random places."""
    runs = -(-count // _RUN)
    if runs * _RUN * 2 >= a.size:
        return a
    starts = np.sort(rng.integers(0, a.size - _RUN, runs))
    # (rows of a strided window view: each run copied whole, no index array of every element)
    return np.lib.stride_tricks.sliding_window_view(a, _RUN)[starts].reshape(-1)


def _no_codebook(u: np.ndarray, nnz: int, idx: np.ndarray | None = None) -> bool:
    """True only when ``u`` provably has more than MAX_CODEBOOK distinct nonzero values, so
    neither the dense nor the sparse layouts can use a codebook: a sample that already has that
    many does (a sample's distinct count bounds the whole's). False means "not proved" (the exact
    count decides). ``idx``: the nonzero positions, when known (drawn from directly).
    Deterministic: the draw is seeded by the size."""
    if nnz <= MAX_CODEBOOK:
        return False
    rng = np.random.default_rng(u.size)
    # a first sample (92,160 nonzeros: distinct values fill about 88,000 buckets, 65,537 are
    # needed), then one almost five times larger when it falls short: values with many repeats
    # (a narrow range of floats) can hold fewer than 65,537 distinct values in the first draws
    # and far more in the whole tensor; a larger sample still costs less than the sort
    zero = 1 if nnz < u.size else 0     # the zero fills one bucket / counts as one value
    for size in (5 * _SAMPLE // 4, 6 * _SAMPLE):
        if idx is not None:
            s = u[_draw(idx, size, rng)]
        else:                           # (zeros are drawn too: cheaper than dropping them)
            s = _draw(u, -(-size * u.size // nnz) + (_RUN if zero else 0), rng)
        if s.size <= MAX_CODEBOOK:
            return False
        if _hashed_distinct(s) - zero > MAX_CODEBOOK:
            return True
        if s.size >= u.size:            # the sample was the whole tensor: count it exactly
            break
    s = np.sort(s)                  # (np.unique's hash table is ~100x slower here)
    return int(np.count_nonzero(s[1:] != s[:-1])) + 1 - zero > MAX_CODEBOOK


_BYTE_SAMPLE = 16_384     # bytes drawn to prove that a byte codebook cannot help


def _no_byte_codebook(u: np.ndarray) -> bool:
    """True when a codebook provably cannot beat raw bytes: a byte tensor without Huffman codes
    (int8 codes) whose nonzero values include more than 128 distinct ones has codebook indices of
    8 bits, as wide as the values, plus the codebook itself, in both the dense and the sparse
    layouts. A sample's distinct count bounds the whole's, so a draw of a few runs proves it
    without counting every byte (int8 codes of a real layer use about 255 values; the exact count
    cost 1.4 ns a byte, a third of planning a pruned int8 layer). False: not proved."""
    if u.size <= 2 * _BYTE_SAMPLE:
        return False
    runs = _BYTE_SAMPLE // _RUN                 # (runs at even steps: any sample proves it)
    s = u[:u.size - u.size % runs].reshape(runs, -1)[:, :_RUN]
    seen = np.zeros(256, bool)
    seen[s] = True
    return int(np.count_nonzero(seen[1:])) > 128


_HASH_BITS = 20
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _hashed_distinct(s: np.ndarray) -> int:
    """A lower bound on the number of distinct values of ``s``: how many of 2**20 buckets a
    multiplicative hash of them fills (equal values fill one bucket, so distinct values are at
    least that many). A sample of 73,728 distinct values fills about 71,200, one of 147,456
    about 137,400: the bound proves "more than 65,536" without sorting (10x faster); when it does
    not, the caller counts exactly. (A table of 1 MB, not more: a fresh table's pages are faulted
    in on every call, which cost more than the hashing in a process that trims freed memory.)"""
    h = s.astype(np.uint64)
    h *= _GOLDEN                                 # (wraps around: multiplication modulo 2**64)
    h >>= np.uint64(64 - _HASH_BITS)
    seen = np.zeros(1 << _HASH_BITS, bool)
    seen[h] = True
    return int(np.count_nonzero(seen))
