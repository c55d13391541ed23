"""Low-rank factorisation and depthwise-separable layers: the ``%lowrank`` technique (moved here
from ``nbcompress/lowrank.py``; the split into modules and the declared options follow)."""
from .factorize import *  # noqa: F401,F403
from .factorize import __all__  # noqa: F401
