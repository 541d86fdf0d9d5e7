"""specache: a torch.compile backend that keeps the LLM KV cache in host memory and fetches only what matters.

Importing this package registers the ``specache::`` ops; it does not initialise CUDA or patch anything.
"""

from .api import attention_error, backend, compile, memory, policies, reset, runtime_of, stats
from .backend import specache_backend
from .config import Config, Inner, KVHome
from .generate import generate
from .policies import Policy, register_policy

__all__ = [
    "Config", "Inner", "KVHome", "Policy", "attention_error", "backend", "compile", "generate", "memory", "policies",
    "register_policy", "reset", "runtime_of", "specache_backend", "stats",
]
__version__ = "0.1.0"
