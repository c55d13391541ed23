"""The techniques, one package each. Importing this package registers them all
(``nbcompress.core.TECHNIQUES``), in the order the demo and the README show them."""
from __future__ import annotations

import importlib

ORDER = ("prune", "distill", "quantize", "lowrank", "earlyexit")


def _load(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:        # not yet moved into techniques/ (transition)
        if e.name != f"{__name__}.{name}":
            raise
        return importlib.import_module(f"nbcompress.{name}")


MODULES = {name: _load(name) for name in ORDER}
