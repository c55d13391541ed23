"""The techniques, one package each. Importing this package registers them all
(``nbcompress.core.TECHNIQUES``): the built-in five in the order the demo and the README show
them, then any other package found here (a new technique is one new package: its ``__init__``
calls ``register_technique``; see docs/ARCHITECTURE.md)."""
from __future__ import annotations

import importlib
import pkgutil

from . import prune, distill, quantize, lowrank, earlyexit  # (in registration order)

MODULES = {"prune": prune, "distill": distill, "quantize": quantize, "lowrank": lowrank,
           "earlyexit": earlyexit}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.ispkg and _info.name not in MODULES:
        MODULES[_info.name] = importlib.import_module(f"{__name__}.{_info.name}")
