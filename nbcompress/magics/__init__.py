"""IPython front end: one Magics class per technique, all sharing magics/base.py."""
from __future__ import annotations

from .core import CoreMagics
from .distill import DistillMagics
from .earlyexit import EarlyExitMagics
from .lowrank import LowRankMagics
from .prune import PruneMagics
from .quantize import QuantizeMagics

MAGIC_CLASSES = [CoreMagics, PruneMagics, QuantizeMagics, LowRankMagics, DistillMagics,
                 EarlyExitMagics]


def load_ipython_extension(ipython):
    for cls in MAGIC_CLASSES:
        ipython.register_magics(cls)


def unload_ipython_extension(ipython):
    mm = ipython.magics_manager
    for cls in MAGIC_CLASSES:
        for kind, names in cls.magics.items():
            for name in names:
                mm.magics[kind].pop(name, None)
    names = {c.__name__ for c in MAGIC_CLASSES}
    mm.registry = {k: v for k, v in mm.registry.items() if type(v).__name__ not in names}
