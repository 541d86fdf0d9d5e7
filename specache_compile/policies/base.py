"""The policy interface and its registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import Config
    from ..runtime.store import Site

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` selectable as ``specache.compile(model, policy=cls.name)``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"specache.register_policy: {cls.__name__} needs a class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Policy]]:
    return dict(_REGISTRY)


class Policy:
    """Base class. Subclasses set ``name`` and implement ``decode``; the others have working defaults.

    Per site, the runtime calls, in order: ``reset(site)`` when a new sequence starts, ``append(site, k, v, start)``
    after new tokens were written to the host store, then ``decode(...)`` for single-query steps. Multi-query calls
    (prefill, chunked prefill) are exact attention, done by the runtime: every method here (SpeCache Algorithm 1,
    KCache, CAKE) computes prefill attention exactly and only changes what is kept afterwards.
    """

    name: ClassVar[str] = ""

    def __init__(self, config: Config) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(config)

    def reset(self, site: Site) -> None:
        site.tier.clear()

    def append(self, site: Site, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """k, v: [B, Hkv, Sn, D] on the model's device, the tokens just written at positions [start, start+Sn)."""

    def decode(
        self, site: Site, q: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int, scale: float
    ) -> torch.Tensor:
        """Attention of q [B, Hq, 1, D] over store positions [lo, hi); bias [B|1, Hq|1, 1, hi-lo] additive or None.
        Returns [B, Hq, 1, Dv] in q.dtype."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}
