"""Loading (:func:`load`): the model rebuilt from the header's module tree without unpickling
anything; class and function names resolve only to registered codecs, ``classes=`` and modules
under the trusted prefixes (:mod:`.names`), all of them checked before anything is built.
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import types
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import BadInput
from .bits import _Corrupt
from .codec import _COMPLEX_PART, _decode, _tensor_from_bits
from .format import (_ALL_DTYPES, _BOOKKEEPING, _CODECS, _DERIVED, _DTYPES, _check_crc,
                     _check_end, _is_hook_dict, _join, _module_path, _opened, _read_exact,
                     _read_header, _tensor_entries, _truncated)
from .pack import _bar, crc32
from .names import MOVED_MODULES, Resolver

__all__ = ["load", "MOVED_MODULES"]    # MOVED_MODULES: where moved classes live now


def _tensor_shape(tj: dict) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, number of unsigned elements, bytes per element) of a tensor record."""
    dtype = _DTYPES.get(tj.get("dtype"))
    if dtype is None:
        raise _Corrupt(f"unknown dtype {tj.get('dtype')!r}")
    shape = tj.get("shape")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise _Corrupt("bad shape")
    n = math.prod(shape) * (2 if dtype in _COMPLEX_PART else 1)
    if n > (1 << 36):
        raise _Corrupt("implausible tensor size")
    return dtype, shape, n, _COMPLEX_PART.get(dtype, dtype).itemsize


def _decode_tensor(tj: dict, segs: list) -> torch.Tensor:
    dtype, shape, n, isz = _tensor_shape(tj)
    rec = tj.get("enc")
    if not isinstance(rec, dict):
        raise _Corrupt("missing encoding record")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return _tensor_from_bits(_decode(segs, rec, n, isz), dtype, shape)


def _is_raw_dense(tj: dict, n: int, isz: int) -> bool:
    rec = tj.get("enc")
    return (isinstance(rec, dict) and rec.get("pos") == "dense" and rec.get("val") == "raw"
            and n > 0 and tj["seg"] == [0, 0, 0, 0, n * isz])


class _StreamCRC:
    """zlib's CRC-32 of byte chunks fed in order, from ``state`` on. A chunk of ``BIG`` bytes or
    more is checked in a thread pool, in pieces (zlib releases the GIL), while the caller reads
    the next one; smaller chunks run inline. :meth:`value` joins the pieces in order with
    :func:`~.pack.crc32_combine`: the same number as ``zlib.crc32`` over the whole stream."""

    BIG = 1 << 22
    _pool = None
    _pool_pid = None

    def __init__(self, state: int):
        self.first = state
        self.parts: list = []             # [crc or future, length], in order

    @classmethod
    def _executor(cls):
        if cls._pool is None or cls._pool_pid != os.getpid():     # (not a forked parent's)
            from concurrent.futures import ThreadPoolExecutor

            cls._pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                           thread_name_prefix="nbcompress-crc")
            cls._pool_pid = os.getpid()
        return cls._pool

    def feed(self, chunk) -> None:
        n = len(chunk)
        if not n:
            return
        if n < self.BIG:
            last = self.parts[-1] if self.parts else None
            if last is not None and isinstance(last[0], int):
                last[0] = crc32(chunk, last[0])
                last[1] += n
            else:
                self.parts.append([crc32(chunk), n])
            return
        pool = self._executor()
        mv = memoryview(chunk).cast("B")
        step = max(self.BIG, -(-n // 2))
        for at in range(0, n, step):
            piece = mv[at:at + step]
            self.parts.append([pool.submit(crc32, piece), len(piece)])

    def value(self) -> int:
        from .pack import crc32_combine

        state = self.first & 0xFFFFFFFF
        for c, n in self.parts:
            state = crc32_combine(state, c if isinstance(c, int) else c.result(), n)
        return state


def _read_tensors(f, header: dict, crc: tuple | None, bar=None) -> list[torch.Tensor]:
    """Every stored tensor, read from ``f`` (just after the header) and checked against the CRC
    before any is decoded. A dense raw tensor is read straight into its own memory (no copy of
    the file's bytes); the others' segments are kept until the CRC is checked, then decoded."""
    stream = _StreamCRC(crc[1] if crc else 0)
    got, want = 0, header["blob_bytes"]
    try:                                # a file shorter than its header says: before allocating
        left = os.fstat(f.fileno()).st_size - f.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        left = None
    if left is not None and left < want:
        _truncated(max(left, 0), want)
    readinto = getattr(f, "readinto", None)
    pending: list = []
    for tj, _off in _tensor_entries(header):
        dtype, shape, n, isz = _tensor_shape(tj)
        if readinto is not None and _is_raw_dense(tj, n, isz):
            part = _COMPLEX_PART.get(dtype, dtype)
            t = torch.empty(n, dtype=part)
            view = memoryview(t.view(torch.uint8).numpy())
            done = 0
            while done < n * isz:
                k = readinto(view[done:])
                if not k:
                    _truncated(got + done, want)
                done += k
            stream.feed(view)
            got += done
            t = torch.view_as_complex(t.reshape(list(shape) + [2])) if part is not dtype \
                else t.reshape(shape)
            pending.append(t)
        else:
            segs = []
            for size in tj["seg"]:
                seg = _read_exact(f, size)
                got += len(seg)
                if len(seg) < size:
                    _truncated(got, want)
                stream.feed(seg)
                segs.append(seg)
            pending.append((tj, segs))
        if bar is not None:
            bar.update(1)
    _check_crc(crc, stream.value())
    return [p if isinstance(p, torch.Tensor) else _decode_tensor(*p) for p in pending]


class _Loader:
    def __init__(self, header: dict, bases: list[torch.Tensor], resolver: Resolver,
                 device: torch.device):
        self.resolve = resolver
        self.modules: dict[str, nn.Module] = {}
        self.values = header.get("values") or []
        if not isinstance(self.values, list):
            raise _Corrupt("bad values table")
        self.built: dict[int, Any] = {}
        bases = [b.to(device) for b in bases]
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
        if tag == "$fn" and type(x) is str:
            return self.resolve(x, "function")
        if tag == "$class" and type(x) is str:
            return self.resolve(x, "class")
        if tag == "$enum" and type(x) is list and len(x) == 2 and type(x[1]) is str:
            cls = self.resolve(x[0], "enum")
            if x[1] not in cls.__members__:
                raise BadInput(f"cannot load: {x[0]} has no member {x[1]!r} here")
            return cls[x[1]]
        if tag in ("$set", "$frozenset") and type(x) is list:
            items = [self.dec(y, depth + 1) for y in x]
            return set(items) if tag == "$set" else frozenset(items)
        if tag == "$items" and type(x) is list and all(type(p) is list and len(p) == 2 for p in x):
            return {self.dec(k, depth + 1): self.dec(y, depth + 1) for k, y in x}
        if tag == "$partial" and type(x) is list and len(x) == 3 and type(x[1]) is list:
            if not (type(x[0]) is dict and len(x[0]) == 1
                    and next(iter(x[0])) in ("$class", "$fn", "$partial")):
                raise _Corrupt("a partial of something that is not a class or function")
            kwargs = self.dec(x[2], depth + 1)
            if type(kwargs) is not dict:
                raise _Corrupt("bad partial keywords")
            return functools.partial(self.dec(x[0], depth + 1),
                                     *[self.dec(y, depth + 1) for y in x[1]], **kwargs)
        if tag == "$obj" and type(x) is int:
            return self.value(x)
        raise _Corrupt(f"bad attribute value tag {tag!r}")

    def value(self, i: int) -> Any:
        """Library config ``i`` of the values table, built once with its class's own
        ``from_dict(to_dict())``, then the instance attributes to_dict does not say."""
        if i in self.built:
            if self.built[i] is None:
                raise _Corrupt("a config refers to itself")
            return self.built[i]
        if not 0 <= i < len(self.values) or not isinstance(self.values[i], dict):
            raise _Corrupt("bad config reference")
        rec = self.values[i]
        self.built[i] = None
        cls = self.resolve(rec.get("class"), "config")
        d, state = self.dec(rec.get("dict")), self.dec(rec.get("state"))
        if type(d) is not dict or type(state) is not dict \
                or any(type(k) is not str or k.startswith("__") for k in state):
            raise _Corrupt("bad config record")
        try:
            obj = cls.from_dict(d)
        except Exception as e:  # noqa: BLE001 - the library's refusal, as one line
            raise BadInput(f"cannot load: {rec['class']}.from_dict failed: "
                           f"{type(e).__name__}: {e}") from None
        obj.__dict__.update(state)
        self.built[i] = obj
        return obj

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
         map_location="cpu", progress: bool | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save`, without unpickling anything.

    Classes (and the functions an attribute names) are imported only from ``torch.nn``,
    ``torch.ao.nn``, ``nbcompress``, the model libraries ``transformers``, ``timm`` and
    ``torchvision``, and the ``trusted_modules`` prefixes; other classes (e.g. defined in a
    notebook) must be passed in ``classes=`` and are matched by module and qualified name (a
    refusal names every one the file needs). A transformers config is rebuilt by its own class's
    ``from_dict``, once per config object. Corrupt, truncated or foreign files raise
    :class:`BadInput`. ``progress``: a bar per tensor (None: only for files above 256 MB).
    """
    if progress not in (None, True, False):
        raise BadInput(f"progress must be True, False or None (automatic), got {progress!r}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"unknown map_location {map_location!r}") from None
    resolver = Resolver(classes, trusted_modules, _CODECS)
    try:
        with _opened(path_or_file) as (f, is_path):
            header, crc = _read_header(f)
            tensors = header.get("tensors")
            bar = _bar(header["blob_bytes"], len(tensors) if isinstance(tensors, list) else 0,
                       progress, "loading")
            try:
                bases = _read_tensors(f, header, crc, bar)
            finally:
                if bar is not None:
                    bar.close()
            if is_path:
                _check_end(f, path_or_file)
        resolver.check_all(header)
        loader = _Loader(header, bases, resolver, device)
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
