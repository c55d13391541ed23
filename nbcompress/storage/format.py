"""Safe, compact model files: :func:`save`, :func:`load`, :func:`describe`, :func:`breakdown`.

A file holds the whole model (architecture included) and loading it never unpickles anything:

``b"NBC1"`` | header length (little-endian u32) | header | one binary blob

The header is UTF-8 JSON, either as is (it starts with ``{``) or zlib-compressed (RFC 1950, level
9), whichever is shorter: the module tree and encoding records repeat the same keys, so deflate
shrinks them 4-5x, which for a 4-bit or binary LeNet is 2.6 kB of a 36-139 kB file. (Files
written since 2026-12 deflate the header's first 18 bytes, which hold the CRC, as a stored block
of their own, so a file's length does not depend on its CRC: see ``_deflate_header``.)

The JSON header is::

    {"format": "nbcompress", "version": 1 | 2, "huffman": bool, "torch": "2.x",
     "root": <node>, "objects": [<object>], "tensors": [<tensor>], "blob_bytes": int,
     "values": [<config>]}                       (only when the model holds library configs)

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
``{"$size": [...]}``, ``{"$device": "cpu"}``, and, in version 2 files, ``{"$set": [...]}``, ``{"$frozenset": [...]}``,
``{"$items": [[key, value], ...]}`` (a dict with keys that are not all str), ``{"$fn": "relu"}`` (a
``torch.nn.functional`` function) or ``{"$fn": "module.qualname"}`` (a function by name),
``{"$class": "module.qualname"}`` (a class, e.g. torchvision ResNet's ``_norm_layer``),
``{"$enum": ["module.qualname", "MEMBER"]}``, ``{"$partial": [function or class, [args],
kwargs]}`` (a ``functools.partial``), ``{"$obj": i}`` (entry ``i`` of ``values``, a library config
shared by every module that holds it), ``{"$t": object_id}`` (a tensor that is also a registered
parameter/buffer). Names are imported on load only under the trust rules of :mod:`.names`.

A ``<config>`` is a transformers config (or GenerationConfig): ``{"class": "module.qualname",
"dict": config.to_dict(), "state": {instance attributes that to_dict does not say, or says
differently, e.g. "_attn_implementation_internal"}}``, rebuilt with ``class.from_dict(dict)``
and then ``state``. A cache a module fills lazily from its own parameters (timm's
``attention_bias_cache``, :data:`.names.CACHES`) is stored empty.

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

import contextlib
import json
import math
import os
import struct
import zlib
from typing import Any, Callable

import torch
from torch import nn

from ..core import BadInput
from .bits import _Corrupt
from .codec import _encoding_name
from .pack import crc32, crc32_combine

MAGIC = b"NBC1"
FORMAT_VERSION = 2          # the newest version this nbcompress writes and reads
# Version 2 added the values table and the attribute tags below; a file that uses none of them
# is written as version 1, which nbcompress releases before them read too.
V2_TAGS = frozenset({"$items", "$set", "$frozenset", "$enum", "$class", "$partial", "$obj"})
_LEN = struct.Struct("<I")
_PREFIX_BYTES = len(MAGIC) + _LEN.size      # 8: magic + header length
_CRC_KEY = b'{"crc32":"'                    # the header's first key: CRC-32 of header and blob,
_CRC_AT = len(_CRC_KEY)                     # 8 hex digits, computed with them set to zeros
_CRC_BLANK = "00000000"
_MAX_HEADER = 1 << 28                       # a decompressed header above 256 MiB is corrupt


_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "complex64", "complex128",
                "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
                "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                "float8_e8m0fnu")
_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES
                                   if isinstance(getattr(torch, n, None), torch.dtype)}
_ALL_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in dir(torch)
                                       if isinstance(getattr(torch, n, None), torch.dtype)}

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


# ============================================================================ names in the header

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


# ============================================================================ the file frame

def _frame(huffman: bool, root: dict, objects: list[dict], tensors: list[dict],
           blob: bytes, values: list[dict] = (), version: int = 1) -> bytes:
    """The file: magic, header length, JSON header (its CRC-32 of header and blob written in,
    zlib-compressed when that is shorter), then ``blob``."""
    return _prefix(huffman, root, objects, tensors, len(blob), crc32(blob), values,
                   version) + blob


def _prefix(huffman: bool, root: dict, objects: list[dict], tensors: list[dict], blob_bytes: int,
            blob_crc: int, values: list[dict] = (), version: int = 1) -> bytes:
    """Everything before the blob (magic, header length, header) for a blob of ``blob_bytes``
    bytes whose own CRC-32 is ``blob_crc``: the header's CRC of header and blob is combined from
    the two, so the blob need not be in memory (or exist: :func:`.saver.packed_size`)."""
    header = {"crc32": _CRC_BLANK, "format": "nbcompress", "version": version,
              "huffman": bool(huffman), "torch": torch.__version__.split("+")[0], "root": root,
              "objects": objects, "tensors": tensors, "blob_bytes": int(blob_bytes)}
    if values:
        header["values"] = list(values)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False
                    ).encode("utf-8")
    crc = b"%08x" % crc32_combine(zlib.crc32(hb), blob_crc, blob_bytes)
    hb = hb[:_CRC_AT] + crc + hb[_CRC_AT + 8:]
    packed = _deflate_header(hb)
    if len(packed) < len(hb):
        hb = packed
    return MAGIC + _LEN.pack(len(hb)) + hb


def _deflate_header(hb: bytes) -> bytes:
    """``hb`` as one zlib stream (RFC 1950, read by ``zlib.decompress``) whose length does not
    depend on the 8 CRC digits: the header's first 18 bytes (``{"crc32":"`` and the digits) are
    a stored block ended by a full flush (which byte-aligns the stream and forgets what came
    before), the rest is deflated at level 9 after it. So the length of a file is known without
    its CRC (:func:`.saver.packed_size` computes none); it costs the header about 10 bytes."""
    head, tail = hb[:_CRC_AT + 8], hb[_CRC_AT + 8:]
    out = [b"\x78\xda"]                                # zlib header: deflate, 32 KiB window, level 9
    c = zlib.compressobj(0, zlib.DEFLATED, -15)         # '{"crc32":"<digits>' stored as it is
    out.append(c.compress(head) + c.flush(zlib.Z_FULL_FLUSH))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out.append(c.compress(tail) + c.flush(zlib.Z_FINISH))
    out.append(struct.pack(">I", zlib.adler32(hb) & 0xFFFFFFFF))
    return b"".join(out)


def _read(path_or_file, keep_blob: bool = True) -> tuple[dict, memoryview | None]:
    """(header, blob) of a whole file, its CRC checked; ``keep_blob=False``: the blob is read in
    pieces for the check only, and None is returned for it."""
    with _opened(path_or_file) as (f, is_path):
        header, crc = _read_header(f)
        want, got, state = header["blob_bytes"], 0, crc[1] if crc else 0
        pieces = []
        while got < want:
            piece = _read_exact(f, want - got if keep_blob else min(want - got, 1 << 22))
            if not piece:
                _truncated(got, want)
            got += len(piece)
            state = crc32(piece, state)
            if keep_blob:
                pieces.append(piece)
        _check_crc(crc, state)
        if is_path:
            _check_end(f, path_or_file)
    if not keep_blob:
        return header, None
    return header, memoryview(pieces[0] if len(pieces) == 1 else b"".join(pieces))


@contextlib.contextmanager
def _opened(path_or_file):
    """(binary file, whether it was opened from a path), closed after when it was."""
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise BadInput(f"no such file: {path}") from None
        except IsADirectoryError:
            raise BadInput(f"{path} is a directory, not an nbcompress file") from None
        with f:
            yield f, True
    elif hasattr(path_or_file, "read"):
        yield path_or_file, False
    else:
        raise BadInput(f"load needs a path or a readable binary file, got "
                       f"{type(path_or_file).__name__}")


def _check_end(f, path) -> None:
    if _read_exact(f, 1):
        raise BadInput(f"corrupt nbcompress file: unexpected data after the end "
                       f"({os.fspath(path)})")


def _truncated(got: int, want: int):
    raise BadInput(f"truncated nbcompress file (the data ends after {got} of {want} bytes)")


def _check_crc(crc: tuple | None, blob_crc_state: int) -> None:
    """``crc``: (the header's CRC digits, the CRC-32 of the header with them blanked) or None for
    files written before the CRC; ``blob_crc_state``: that CRC continued over the blob."""
    if crc is not None and b"%08x" % (blob_crc_state & 0xFFFFFFFF) != crc[0]:
        # a changed bit in the header or the packed data would otherwise load as a silently
        # different model
        raise BadInput("corrupt nbcompress file: its bytes do not match their CRC-32 checksum")


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if data is None:
        data = b""
    if isinstance(data, str):
        raise BadInput("the file is open in text mode; open it with 'rb'")
    return bytes(data)


def _read_header(f) -> tuple[dict, tuple | None]:
    """(header, crc) from the start of a file; ``crc`` is (the header's CRC digits, CRC-32 of the
    header with them blanked) or None (a file without one). ``header["_overhead"]``: the bytes
    before the blob (magic, header length, JSON header)."""
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
    if header.get("version") not in range(1, FORMAT_VERSION + 1):
        raise BadInput(f"unsupported nbcompress file version {header.get('version')!r} "
                       f"(this nbcompress reads versions 1 to {FORMAT_VERSION}; a newer "
                       f"nbcompress wrote it)")
    nblob = header.get("blob_bytes")
    if type(nblob) is not int or nblob < 0:
        raise BadInput("corrupt nbcompress file: bad blob length")
    crc = None
    if hb[:_CRC_AT] == _CRC_KEY:
        blank = hb[:_CRC_AT] + _CRC_BLANK.encode() + hb[_CRC_AT + 8:]
        crc = (hb[_CRC_AT:_CRC_AT + 8], zlib.crc32(blank))
    header["_overhead"] = _PREFIX_BYTES + hlen
    return header, crc


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


# ============================================================================ describing

def describe(path_or_file) -> list[dict]:
    """One dict per stored tensor: name (and aliases), shape, dtype, numel, nnz, encoding, and its
    bytes split into ``positions`` (mask / gap stream and its Huffman table), ``indices``
    (codebook indices), ``codebook`` (distinct values and the index Huffman table), ``raw`` (raw
    values); ``bytes`` is their sum and ``bits_per_element`` ``8 * bytes / numel``.

    The ``bytes`` of all rows add up to the file size minus the overhead: 4 magic bytes, the 4-byte
    header length and the JSON header (module tree, attributes, encodings).
    """
    header, _ = _read(path_or_file, keep_blob=False)
    return _rows(header)


def _rows(header: dict) -> list[dict]:
    """:func:`describe`'s rows from a header's tensor table (and its ``blob_bytes``)."""
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


def overhead_bytes(path_or_file) -> int:
    """Bytes of the file that are not tensor data: magic, header length and JSON header."""
    header, _ = _read(path_or_file, keep_blob=False)
    return header["_overhead"]
