"""Saving (:func:`save`, :func:`breakdown`): the module tree walked into header nodes, each
tensor object registered once (tied parameters, views of one storage), packed by
:mod:`.codec` and framed by :mod:`.format`.
"""
from __future__ import annotations

import enum
import functools
import math
import os
import re
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import BadInput
from ..fingerprint import MEMO
from .format import (_ALL_DTYPES, _BOOKKEEPING, _CODECS, _DERIVED, _DTYPES, V2_TAGS, _class_name,
                     _is_hook_dict, _join, _prefix, _rows, _type_name, _where)
from .names import is_cache, is_config, name_of
from .pack import _bar, crc32_combine, pack


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
        self.values: list[Any] = []          # library config objects, each stored once
        self._value_of: dict[int, int] = {}
        self._keep: list[Any] = []           # (so that their ids stay theirs while saving)
        self.version = 1                     # 2 once a value needs a version-2 tag

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
            out = self._enc(v, what, depth)
        except _Unsupported as e:
            if e.depth is None:
                e.depth = depth
            raise
        if type(out) is dict and len(out) == 1 and (
                next(iter(out)) in V2_TAGS or "." in str(out.get("$fn", ""))):
            self.version = 2                 # a tag nbcompress before version 2 does not read
        return out

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
            if all(type(k) is str for k in v):
                return {"$dict": {k: self.enc(x, what, depth + 1) for k, x in v.items()}}
            return {"$items": [[self.enc(k, what, depth + 1), self.enc(x, what, depth + 1)]
                               for k, x in v.items()]}
        if t is set or t is frozenset:
            try:
                items = sorted(v)
            except TypeError:
                items = sorted(v, key=repr)
            return {"$" + t.__name__: [self.enc(x, what, depth + 1) for x in items]}
        if isinstance(v, enum.Enum):
            return {"$enum": [self._name(type(v), "an Enum"), v.name]}
        if isinstance(v, type):
            return {"$class": self._name(v, "a class")}
        if t is functools.partial:
            if not isinstance(v.func, (type, types.FunctionType, types.BuiltinFunctionType,
                                       functools.partial)):
                raise _Unsupported(f"a functools.partial of a {_type_name(v.func)}")
            return {"$partial": [self.enc(v.func, what, depth + 1),
                                 [self.enc(x, what, depth + 1) for x in v.args],
                                 self.enc(dict(v.keywords), what, depth + 1)]}
        if is_config(v):
            return {"$obj": self.value(v, what, depth)}
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
            return {"$fn": self._name(v, "a function")}
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

    @staticmethod
    def _name(obj: Any, what: str) -> str:
        name = name_of(obj)
        if name is None:
            raise _Unsupported(f"{what} {getattr(obj, '__qualname__', obj)!s} that cannot be "
                               f"imported by name (defined inside a function?)")
        return name

    def value(self, v: Any, what: str, depth: int) -> int:
        """Index of library config ``v`` in the values table: ``{"class", "dict": to_dict(),
        "state": the instance attributes to_dict does not say (or says differently)}``; every
        module that holds the same config object refers to one entry."""
        if id(v) in self._value_of:
            return self._value_of[id(v)]
        i = self._value_of[id(v)] = len(self.values)
        self._keep.append(v)
        self.values.append(None)
        try:
            d = v.to_dict()
        except Exception as e:  # noqa: BLE001 - the library's failure, as the reason
            raise _Unsupported(f"a {_type_name(v)} whose to_dict() fails ({type(e).__name__}: "
                               f"{e})") from None
        if type(d) is not dict:
            raise _Unsupported(f"a {_type_name(v)} whose to_dict() is not a dict")
        state = {}
        for k, x in vars(v).items():
            try:
                same = k in d and type(d[k]) is type(x) and bool(d[k] == x)
            except Exception:  # noqa: BLE001 - values that do not compare are kept as state
                same = False
            if not same:
                state[k] = x
        self.values[i] = {"class": self._name(type(v), "a config class"),
                          "dict": self.enc(d, what, depth + 1),
                          "state": self.enc(state, what, depth + 1)}
        return i

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
        attrs = {k: (type(v)() if type(v) is dict and is_cache(m, k) else v)
                 for k, v in m.__dict__.items()
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
        self.owners: list[torch.Tensor | None] = []   # the model's tensor whose values each holds
        for members in groups.values():
            ts = [self.objects[i]["t"].detach() for i in members]
            views = {(t.storage_offset(), tuple(t.shape), tuple(t.stride())) for t in ts}
            names = [n for i in members for n in self.objects[i]["names"]]
            ti = len(tensors)
            if len(views) == 1 and ts[0].is_contiguous():
                arr = ts[0]
                self.owners.append(self.objects[members[0]]["t"])
                for i in members:
                    objects[i] = {"tensor": ti, "view": None}
            else:
                lo = min(t.storage_offset() for t in ts)
                hi = max(t.storage_offset() + sum((s - 1) * st for s, st in
                                                  zip(t.shape, t.stride())) + 1 for t in ts)
                arr = ts[0].as_strided((hi - lo,), (1,), lo)
                self.owners.append(None)            # a span of a storage: not remembered
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


def _packed(model: nn.Module, huffman: bool, want_bytes: bool, progress: bool | None = False):
    """(prefix: magic + header length + header, [segments of each tensor] or None, blob bytes,
    the header's tensor table) for ``model``. Each tensor's plan, segment lengths and CRC come from
    :func:`nbcompress.storage.pack.pack` (remembered per tensor while its values stay)."""
    if not isinstance(model, nn.Module):
        raise BadInput(f"expected a torch.nn.Module, got {type(model).__name__}")
    if progress not in (None, True, False):
        raise BadInput(f"progress must be True, False or None (automatic), got {progress!r}")
    saver = _Saver(model, huffman)
    root = saver.node(model, "")
    objects, tensors, arrays = saver.tensor_table()
    parts: list[list] | None = [] if want_bytes else None
    blob_bytes, blob_crc = 0, 0
    bar = _bar(sum(a.numel() * a.element_size() for a in arrays), len(arrays), progress,
               "packing" if want_bytes else "measuring")
    try:
        with MEMO.trusting():
            for tj, arr, owner in zip(tensors, arrays, saver.owners):
                h = huffman and not tj.pop("_no_huffman", False)
                rec, lens, crc, segs = pack(arr, owner, h, want_bytes)
                tj["enc"], tj["seg"] = rec, lens
                n = sum(lens)
                if want_bytes:
                    blob_crc = crc32_combine(blob_crc, crc, n)
                blob_bytes += n
                if parts is not None:
                    parts.append(segs)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    prefix = _prefix(huffman, root, objects, tensors, blob_bytes, blob_crc, saver.values,
                     saver.version)
    return prefix, parts, blob_bytes, tensors


def _build(model: nn.Module, huffman: bool) -> bytes:
    """The whole file as one bytes object (for :func:`breakdown` and tests; :func:`save` streams)."""
    prefix, parts, _, _ = _packed(model, huffman, True)
    return prefix + b"".join(s for segs in parts for s in segs)


def packed_size(model: nn.Module, huffman: bool = True) -> int:
    """Exactly ``len`` of what :func:`save` writes for ``model``, without producing the file: only
    tensors whose values changed since they were last measured or saved are encoded again."""
    prefix, _, blob_bytes, _ = _packed(model, huffman, False)
    return len(prefix) + blob_bytes


def _write(f, prefix: bytes, parts: list[list]) -> None:
    f.write(prefix)
    for i, segs in enumerate(parts):
        for s in segs:
            if len(s):
                f.write(s)
        parts[i] = None                     # an encoded tensor's bytes go once written


def save(model: nn.Module, path_or_file, *, huffman: bool = True,
         progress: bool | None = None, width: float | None = None) -> int:
    """Write ``model`` (architecture, parameters, buffers, attributes, train/eval mode) to a path
    or a writable binary file object. Returns the number of bytes written.

    Raises :class:`BadInput` (naming the module) for anything that cannot be stored safely: an
    attribute that is not plain data, a parametrized or prune-hooked module, a tensor subclass.
    Forward/backward hooks are not saved. A path is written under a temporary name and renamed
    when complete: an error or an interruption (Ctrl-C) leaves the target as it was and no
    temporary file. ``progress``: a bar per tensor (None: only for models above 256 MB).
    ``width``: of a slimmable network (:func:`nbcompress.slim`), write only that width, as the
    plain narrower network it runs (a smaller file; loads as the model's own class).
    """
    if width is not None:
        at_width = getattr(model, "at_width", None)
        if not callable(at_width):
            raise BadInput(f"save(width=...) applies to a slimmable network (nbcompress.slim); "
                           f"this model is a {type(model).__name__}")
        model = at_width(width)
    is_path = isinstance(path_or_file, (str, os.PathLike))
    if not is_path and not hasattr(path_or_file, "write"):
        raise BadInput(f"save needs a path or a writable binary file, got "
                       f"{type(path_or_file).__name__}")
    prefix, parts, blob_bytes, _ = _packed(model, huffman, True, progress)
    total = len(prefix) + blob_bytes
    if not is_path:
        _write(path_or_file, prefix, parts)
        return total
    path = os.fspath(path_or_file)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            _write(f, prefix, parts)
        os.replace(tmp, path)
    except BaseException as e:              # Ctrl-C included: no half-written file stays
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BadInput(f"cannot write {path}: {e.strerror or e}") from None
        raise
    return total


def breakdown(model: nn.Module, huffman: bool = True) -> list[dict]:
    """:func:`describe` of what :func:`save` would write for ``model``, without writing a file
    (from the same per-tensor results as :func:`packed_size`)."""
    _, _, blob_bytes, tensors = _packed(model, huffman, False)
    return _rows({"tensors": tensors, "blob_bytes": blob_bytes})


