"""specache: ``import specache; model = specache.compile(model)``. The package is ``specache_compile``."""

from specache_compile import *  # noqa: F401,F403
from specache_compile import __all__, __version__  # noqa: F401
