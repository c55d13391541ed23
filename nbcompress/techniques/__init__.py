"""The techniques, one package each. Importing this package registers them all
(``nbcompress.core.TECHNIQUES``): the built-in five in the order the demo and the README show
them, then any other package found here (a new technique is one new package: its ``__init__``
calls ``register_technique``; see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import importlib
import pkgutil

from ..core import DEMOS, TECHNIQUES

from . import prune, distill, quantize, lowrank, earlyexit  # (in registration order)

MODULES = {"prune": prune, "distill": distill, "quantize": quantize, "lowrank": lowrank,
           "earlyexit": earlyexit}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.ispkg and _info.name not in MODULES:
        MODULES[_info.name] = importlib.import_module(f"{__name__}.{_info.name}")


def _in_order(registry: dict) -> None:
    """The built-in five first, in MODULES' order, whatever order their imports registered them
    in (a technique that imports another's module registers that one first), then the others."""
    rank = {name: i for i, name in enumerate(MODULES)}
    items = sorted(registry.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    registry.clear()
    registry.update(items)


_in_order(TECHNIQUES)
_in_order(DEMOS)
