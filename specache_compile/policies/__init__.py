"""KV-cache policies: one small file per method, registered by name.

A policy decides, for each decode step of one attention site, which tokens take part in attention and at what
precision, and what it keeps on the device between steps. It sees the runtime's store (``runtime.store.Site``) and
calls kernels (``kernels.ops``); it never sees the graph, and the pass never knows which policy runs.
"""

from __future__ import annotations

from .base import Policy, PrefillView, register_policy, registered
from .cake import CakePolicy  # noqa: F401
from .full import FullPolicy
from .kcache import KCachePolicy  # noqa: F401
from .kvcomp import KVCompPolicy  # noqa: F401
from .quant import QuantPolicy  # noqa: F401
from .snapkv import SnapKVPolicy  # noqa: F401
from .specache import SpeCachePolicy
from .streaming import StreamingPolicy  # noqa: F401

__all__ = ["Policy", "PrefillView", "register_policy", "registered", "FullPolicy", "SpeCachePolicy"]
