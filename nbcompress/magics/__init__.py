"""IPython front end. Each technique adds its Magics class to MAGIC_CLASSES."""
from __future__ import annotations

from .core import CoreMagics

MAGIC_CLASSES = [CoreMagics]


def _technique_magics():
    import importlib

    out = []
    for mod, cls in [("prune", "PruneMagics"), ("quantize", "QuantizeMagics"),
                     ("distill", "DistillMagics"), ("lowrank", "LowRankMagics"),
                     ("earlyexit", "EarlyExitMagics")]:
        try:
            m = importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{mod}":
                continue          # that technique has not landed
            raise
        out.append(getattr(m, cls))
    return out


def load_ipython_extension(ipython):
    for cls in MAGIC_CLASSES + _technique_magics():
        ipython.register_magics(cls)


def unload_ipython_extension(ipython):
    mm = ipython.magics_manager
    for cls in MAGIC_CLASSES + _technique_magics():
        for kind, names in cls.magics.items():
            for name in names:
                mm.magics[kind].pop(name, None)
    mm.registry = {k: v for k, v in mm.registry.items()
                   if type(v).__name__ not in {c.__name__ for c in MAGIC_CLASSES + _technique_magics()}}
