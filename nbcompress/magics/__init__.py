"""IPython front end: the core magics (%nbcompress, %undo, %redo, %compress_history, %export) and one
generated magic per registered technique (``magics/technique.py``)."""
from __future__ import annotations

import importlib
import weakref

from ..core import _ON_REGISTER, TECHNIQUES
from .core import CoreMagics
from .export import ExportMagics
from .technique import technique_magics

_SHELLS: "weakref.WeakSet" = weakref.WeakSet()


def _register(ipython, cls) -> None:
    ipython.register_magics(technique_magics(cls))


def _on_register(cls) -> None:
    for shell in list(_SHELLS):
        _register(shell, cls)


def load_ipython_extension(ipython):
    importlib.import_module("nbcompress.techniques")      # registers every technique
    importlib.import_module("nbcompress.report")          # the dashboards: loaded with the
    #                                                       extension, not by its first magic

    ipython.register_magics(CoreMagics)
    ipython.register_magics(ExportMagics)
    for cls in list(TECHNIQUES.values()):
        _register(ipython, cls)
    _SHELLS.add(ipython)
    if _on_register not in _ON_REGISTER:
        _ON_REGISTER.append(_on_register)


def unload_ipython_extension(ipython):
    mm = ipython.magics_manager
    names = set(CoreMagics.magics["line"]) | set(ExportMagics.magics["line"]) | {c.magic_name() for c in TECHNIQUES.values()}
    for kind in ("line", "cell"):
        for name in names:
            mm.magics[kind].pop(name, None)
    mm.registry = {k: v for k, v in mm.registry.items()
                   if not type(v).__module__.startswith("nbcompress.")}
    _SHELLS.discard(ipython)
