"""Per-tensor packing as :func:`.saver.save` and :func:`packed_size` use it: each stored tensor's
encoding plan, segment lengths and CRC-32, kept in :data:`nbcompress.fingerprint.MEMO` while the
tensor keeps its values, so measuring a model again after a step encodes only the tensors the step
changed; and :func:`crc32_combine`, which joins those per-tensor CRCs into the file's.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..fingerprint import MEMO
from .codec import _bits_of, _check_size, _emit, _plan, _seg_lengths

# ============================================================================ CRC-32 combination
# zlib's CRC-32 of A + B from crc(A), crc(B) and len(B): crc32(B, init) is affine in init, and
# the linear part is the same for every B of that length (the CRC register advanced over
# len(B) zero bytes), so crc(A + B) = Z_len(B) crc(A) ^ crc(B). Z_n is a 32x32 matrix over GF(2),
# kept as its 32 columns (the images of the 32 unit vectors); Z_(2^k) by repeated squaring.

def _apply(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _zero_byte_matrix() -> list[int]:
    zero = zlib.crc32(b"\0", 0)
    return [zlib.crc32(b"\0", 1 << i) ^ zero for i in range(32)]


_POWERS: list[list[int]] = [_zero_byte_matrix()]        # _POWERS[k] = Z_(2^k)


def _power(k: int) -> list[int]:
    while len(_POWERS) <= k:
        m = _POWERS[-1]
        _POWERS.append([_apply(m, c) for c in m])
    return _POWERS[k]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and
    ``len2 = len(b)`` (zlib's ``crc32_combine``, which Python does not expose)."""
    crc1 &= 0xFFFFFFFF
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _apply(_power(k), crc1)
        len2 >>= 1
        k += 1
    return (crc1 ^ crc2) & 0xFFFFFFFF


try:        # Intel ISA-L's CRC-32 (python-isal): zlib's polynomial and values, 5-10x faster
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives the same numbers
    _crc32 = zlib.crc32


def crc32(data, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, computed by ISA-L where it is installed (same values)."""
    return _crc32(data, value)


def crc32_of(segments, crc: int = 0) -> int:
    for s in segments:
        if len(s):
            crc = crc32(s, crc)
    return crc & 0xFFFFFFFF


# ============================================================================ one stored tensor

class _Stale(Exception):
    """A remembered plan does not fit the tensor's values (a content-sum collision): plan again."""


def _memo_key(huffman: bool) -> tuple:
    return ("pack", bool(huffman))


def _emit_checked(u: np.ndarray, isz: int, plan: dict) -> list:
    """The bytes of a remembered plan, checked against the values: codebook indices must point
    at exactly the values, Huffman codes must exist, and the size must be the planned one."""
    if plan["val"] != "raw" and u.size:
        src = u[np.flatnonzero(u)] if plan["pos"] != "dense" else u
        book = plan["book"]
        idx = np.searchsorted(book, src)
        if idx.size and (int(idx.max()) >= book.size or not np.array_equal(book[idx], src)):
            raise _Stale
    try:
        segs = _emit(u, isz, plan)
        _check_size(segs, plan)
    except (AssertionError, IndexError, ValueError):
        raise _Stale from None
    return segs


def pack(arr: torch.Tensor, owner: torch.Tensor | None, huffman: bool,
         want_bytes: bool) -> tuple[dict, list[int], int, list | None]:
    """(encoding record, five segment lengths, CRC-32 of the segments, the segments) of one stored
    tensor ``arr``; when measuring (``want_bytes=False``) the last two are None. ``owner``: the
    model's tensor object whose values ``arr`` holds (its memo entry keeps the result); None for
    groups of several views (not remembered).

    ``want_bytes=False`` (measuring) trusts a remembered result entirely; ``want_bytes=True``
    (saving) reuses only the remembered plan, produces the bytes again and computes their CRC."""
    memo = MEMO.results(owner) if owner is not None else None
    key = _memo_key(huffman)
    hit = memo.get(key) if memo is not None else None
    if hit is not None and not want_bytes:
        return dict(hit["rec"]), list(hit["seg"]), hit["crc"], None
    u = _bits_of(arr)
    isz = u.dtype.itemsize
    if not want_bytes:
        # measuring: the plan gives every segment's length exactly; no bytes, no CRC (the
        # header's length does not depend on the CRC: see format._deflate_header)
        plan, scratch = _plan(u, isz, huffman, keep=False)
        del scratch
        lens = _seg_lengths(plan, u.size, isz)
        if memo is not None:
            memo[key] = {"rec": dict(plan["rec"]), "seg": lens, "crc": None, "plan": plan}
        return dict(plan["rec"]), lens, None, None
    segs = None
    if hit is not None:
        try:
            segs = _emit_checked(u, isz, hit["plan"])
            plan = hit["plan"]
        except _Stale:
            segs = None
    if segs is None:
        plan, scratch = _plan(u, isz, huffman)
        segs = _emit(u, isz, plan, scratch)
        del scratch
        _check_size(segs, plan)
    lens = [len(s) for s in segs]
    crc = crc32_of(segs)
    if memo is not None:
        memo[key] = {"rec": dict(plan["rec"]), "seg": lens, "crc": crc, "plan": plan}
    return dict(plan["rec"]), lens, crc, segs


# ============================================================================ progress

_PROGRESS_BYTES = 256 << 20     # models with more tensor bytes than this show a progress bar


def _bar(total_bytes: int, count: int, progress: bool | None, desc: str):
    """A ``tqdm.auto`` bar over ``count`` tensors, or None: shown when ``progress`` is True, or
    when it is None (automatic) and the tensors hold more than 256 MB."""
    if progress is False or (progress is None and total_bytes <= _PROGRESS_BYTES) or count == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=count, desc=desc, unit="tensor", leave=False)
