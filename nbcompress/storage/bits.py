"""Bit-level helpers of :mod:`nbcompress.storage`: numbers packed MSB first at fixed or variable
widths, and canonical, length-limited Huffman codes whose long streams decode block-parallel.

Plain numpy on unsigned integer arrays; nothing here knows about tensors or files.
"""
from __future__ import annotations

import numpy as np

_HUFF_LIMIT = 20                            # longest Huffman code, bits


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
        total = int(lens.sum())
    codes, lens = _merged(codes, lens)
    n = codes.size
    if not fixed:
        ends_all = np.cumsum(lens)
    span = n * int(lens) if fixed else int(ends_all[-1])
    # int64 bit patterns: codes are below 2**57, and numpy's shifts by 64 or more give 0
    codes = codes.view(np.int64)
    words = np.zeros((span + 63) // 64 + 1, np.int64)
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
        idx = np.empty(2 * c.size, np.int64)        # each code: its part in word w, then the
        val = np.empty(2 * c.size, np.int64)        # low bits that spill into word w + 1 (or 0)
        idx[0::2] = w
        idx[1::2] = w + (r < 0)
        val[0::2] = (c << np.maximum(r, 0)) >> np.maximum(-r, 0)
        val[1::2] = c << (64 + r)
        _or_into(words, idx, val)
    return words.view(np.uint64).astype(">u8").tobytes()[:(total + 7) // 8]


def _merged(codes: np.ndarray, lens):
    """Neighbouring codes joined into one (``(a << len(b)) | b``) while the joined codes still fit
    57 bits: the same bit stream from half as many (wider) codes, each halving of the count
    costing a few passes over half the codes. An odd count gets a zero-length code at the end
    (a fixed width gets a zero code, cut off with the padding)."""
    fixed = np.ndim(lens) == 0
    while codes.size >= 64:
        widest = int(lens) if fixed else int(lens.max())
        if 2 * widest > 57:
            break
        if codes.size % 2:
            codes = np.append(codes, np.uint64(0))
            if not fixed:
                lens = np.append(lens, 0)
        if fixed:
            codes = (codes[0::2] << np.uint64(lens)) | codes[1::2]
            lens = 2 * int(lens)
        else:
            codes = (codes[0::2] << lens[1::2].astype(np.uint64)) | codes[1::2]
            lens = lens[0::2] + lens[1::2]
    return codes, lens


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
    # (small entries: a 2**20-entry table of bytes stays in cache; of int64 it would not)
    sym_tab = np.zeros(1 << L, np.int32)
    len_tab = np.zeros(1 << L, np.uint8)
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
        table = np.empty((_BLOCK, nb), np.int32)
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
        if starts[-1] + int(len_tab[tail].sum(dtype=np.int64)) > nbits:
            raise _Corrupt("Huffman stream ends early")
    if (len_tab[win] == 0).any():
        raise _Corrupt("invalid Huffman code in stream")
    return sym_tab[win].astype(np.int64)
