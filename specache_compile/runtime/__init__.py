"""The runtime: per-site KV stores (full precision in host memory, the policy's tier on the device)."""

from .runtime import APPEND, INDEX, CacheMismatch, Runtime

__all__ = ["APPEND", "INDEX", "CacheMismatch", "Runtime"]
