"""What a file may name, and how a name becomes a class or function again on load.

A file names module classes, and, in attribute values, classes (``{"$class": name}``, e.g.
torchvision ResNet's ``_norm_layer``), Enum members, functions (``{"$fn": name}``), the function of
a ``functools.partial`` and library config classes, always by ``module.qualname``. Loading
imports a name only when it is trusted, and never calls what it imports except a config class's
own ``from_dict``:

* under a trusted prefix: ``torch.nn``, ``torch.ao.nn``, ``nbcompress`` and the libraries a user
  installed for their models, ``transformers``, ``timm`` and ``torchvision`` (importing a class of
  those by name is as safe as importing ``torch.nn.Linear``), plus ``trusted_modules=``;
* or passed in ``classes=`` (classes or functions, matched by module and qualified name);
* or a torch tensor operator (``torch.sigmoid``: an ATen builtin, nothing else of ``torch``).

:meth:`Resolver.check_all` resolves every name of a file before anything is built, so a
refusal names every class the file needs in one line.
"""
from __future__ import annotations

import enum
import importlib
import sys
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core import BadInput
from .bits import _Corrupt

SAFE_PREFIXES = ("torch.nn", "torch.ao.nn", "nbcompress", "transformers", "timm", "torchvision")

# Files written before the techniques moved into nbcompress.techniques (issue 14) name their
# classes by the old module paths; they load as the same classes from their new homes.
MOVED_MODULES = {
    "nbcompress.qmodules": ("nbcompress.techniques.quantize.qmodules",
                            "nbcompress.techniques.quantize.qmodules_int8"),
    "nbcompress.earlyexit": ("nbcompress.techniques.earlyexit.model",),
    "nbcompress.distill": ("nbcompress.techniques.distill.students",),
}

# Config objects of a library, stored once per object as {"class", "dict": to_dict(), "state"}
# and rebuilt with the class's own from_dict (module prefix, base class names).
CONFIG_BASES = ("transformers.configuration_utils.PreTrainedConfig",
                "transformers.configuration_utils.PretrainedConfig",
                "transformers.generation.configuration_utils.GenerationConfig")

# Caches a module fills lazily from its own parameters and clears itself on .train() / .to():
# stored empty (module prefix, attribute). timm's LeViT, EfficientFormer (V2), EfficientViT-MSRA
# and TinyViT attention keep attention_biases[:, idxs] per device in eval mode.
CACHES = (("timm.", "attention_bias_cache"),)


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_config(v: Any) -> bool:
    """A library config object (a transformers PreTrainedConfig / GenerationConfig)."""
    return any(class_name(b) in CONFIG_BASES for b in type(v).__mro__)


def is_cache(m: nn.Module, attr: str) -> bool:
    return any(type(m).__module__.startswith(p) and attr == a for p, a in CACHES)


def name_of(obj: Any) -> str | None:
    """``module.qualname`` under which ``obj`` (a class or function) can be imported again, or
    None (defined inside a function, or not reachable at that name)."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(mod, str) and isinstance(qual, str)) or "<" in qual:
        return None
    found: Any = sys.modules.get(mod)
    for part in qual.split("."):
        found = getattr(found, part, None)
    if found is obj:
        return f"{mod}.{qual}"
    short = getattr(obj, "__name__", None)             # builtins: torch.sigmoid's qualname is
    if isinstance(short, str) and getattr(sys.modules.get(mod), short, None) is obj:
        return f"{mod}.{short}"                        # _VariableFunctionsClass.sigmoid
    return None


def _torch_op(name: str) -> Any:
    """``torch.<op>`` when it is an ATen tensor operator (torch.sigmoid), else None."""
    mod, _, op = name.rpartition(".")
    if mod != "torch" or not op.isidentifier():
        return None
    f = getattr(torch._C._VariableFunctions, op, None)
    return f if f is not None and getattr(torch, op, None) is f else None


_KINDS = {"module": "an nn.Module class", "class": "a class", "enum": "an Enum class",
          "function": "a function or class", "config": "a library config class"}


def _fits(obj: Any, kind: str) -> bool:
    if kind == "function":
        return isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType))
    if not isinstance(obj, type):
        return False
    if kind == "module":
        return issubclass(obj, nn.Module)
    if kind == "enum":
        return issubclass(obj, enum.Enum)
    if kind == "config":
        return any(class_name(b) in CONFIG_BASES for b in obj.__mro__) and hasattr(obj, "from_dict")
    return True


def _moved(name: str) -> Any:
    module, _, short = name.rpartition(".")
    for new in MOVED_MODULES.get(module, ()):
        obj = getattr(importlib.import_module(new), short, None)
        if obj is not None:
            return obj
    return None


class Resolver:
    """Class and function names of a file -> the objects, under the trust rules above."""

    def __init__(self, classes: Iterable, trusted_modules: Iterable[str], codecs: Iterable[type]):
        if isinstance(classes, (type, types.FunctionType)):
            classes = [classes]
        if isinstance(trusted_modules, str):
            trusted_modules = [trusted_modules]
        self.by_name: dict[str, Any] = {class_name(c): c for c in codecs}
        for c in classes or ():
            if not isinstance(c, (type, types.FunctionType)):
                raise BadInput(f"classes= must hold classes (or functions), got {c!r}")
            self.by_name[f"{c.__module__}.{c.__qualname__}"] = c
        self.prefixes = tuple(p.strip(".") for p in (*SAFE_PREFIXES, *(trusted_modules or ()))
                              if isinstance(p, str) and p.strip("."))
        self.cache: dict[tuple[str, str], Any] = {}

    def trusted(self, name: str) -> bool:
        return "<" not in name and any(name.startswith(p + ".") for p in self.prefixes)

    def __call__(self, name: Any, kind: str = "module") -> Any:
        if not isinstance(name, str) or not name:
            raise _Corrupt("bad class name")
        key = (name, kind)
        if key not in self.cache:
            self.cache[key] = self._resolve(name, kind)
        return self.cache[key]

    def _resolve(self, name: str, kind: str) -> Any:
        obj = self.by_name.get(name)
        if obj is None:
            obj = _moved(name)
        if obj is None and kind == "function":
            obj = _torch_op(name)
        if obj is None:
            if not self.trusted(name):
                raise _Untrusted(name)
            obj = self._import(name)
        if not _fits(obj, kind):
            raise BadInput(f"cannot load: {name} named in the file is not {_KINDS[kind]} found "
                           f"at that name")
        return obj

    def _import(self, name: str) -> Any:
        parts = name.split(".")
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
            if obj is not None and name_of(obj) == name:
                return obj
            raise BadInput(f"cannot load: {name} named in the file is not found at that name")
        raise BadInput(f"cannot load: {name} named in the file cannot be imported here")

    def check_all(self, header: dict) -> None:
        """Resolve every name the file uses; one BadInput naming every untrusted one."""
        untrusted: list[str] = []
        for name, kind in _names(header):
            try:
                self(name, kind)
            except _Untrusted:
                if name not in untrusted:
                    untrusted.append(name)
        if untrusted:
            shorts = ", ".join(n.rsplit(".", 1)[-1] for n in untrusted)
            raise BadInput(f"refusing to import {', '.join(untrusted)} from file; pass "
                           f"classes=[{shorts}] if you trust this file")


class _Untrusted(BadInput):
    def __init__(self, name: str):
        short = name.rsplit(".", 1)[-1]
        super().__init__(f"refusing to import {name} from file; pass classes=[{short}] if you "
                         f"trust this file")


_VALUE_KINDS = {"$class": "class", "$enum": "enum", "$fn": "function"}


def _names(header: dict) -> Iterable[tuple[str, str]]:
    """(name, kind) of every class and function the header names, in file order."""
    values = header.get("values") or []
    stack: list[tuple[Any, str]] = [(v, "value") for v in reversed(values)
                                    if isinstance(values, list)]
    stack.append((header.get("root"), "node"))
    while stack:
        item, what = stack.pop()
        if isinstance(item, list):
            stack += [(x, what) for x in reversed(item)]
        elif not isinstance(item, dict):
            continue
        elif what == "node":
            if isinstance(item.get("class"), str):
                yield item["class"], "module"
            kids = item.get("children")
            stack += [(c, "node") for c in reversed(list((kids or {}).values()))
                      if isinstance(kids, dict)]
            stack.append((list((item.get("attrs") or {}).values())
                          if isinstance(item.get("attrs"), dict) else [], "value"))
        elif "class" in item and "dict" in item:       # a config in the values table
            if isinstance(item["class"], str):
                yield item["class"], "config"
            stack += [(item.get("dict"), "value"), (item.get("state"), "value")]
        elif len(item) == 1:
            (tag, x), = item.items()
            if tag in _VALUE_KINDS:
                ref = x[0] if tag == "$enum" and isinstance(x, list) and x else x
                if isinstance(ref, str) and (tag != "$fn" or "." in ref):
                    yield ref, _VALUE_KINDS[tag]
            else:
                stack.append((list(x.values()) if isinstance(x, dict) else x, "value"))
