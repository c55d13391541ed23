"""Early exits (see model.py)."""
from .model import *  # noqa: F401,F403
from .model import __all__  # noqa: F401
from .model import CACHE_BYTES  # noqa: F401
