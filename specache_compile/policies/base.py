"""The policy interface and its registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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


@dataclass
class PrefillView:
    """What a policy sees of one exact multi-query call (prefill or a chunk of it), after the runtime computed it.

    q: [B, Hq, Sq, D] the queries; k, v: [B, Hkv, hi-lo, D] the attended keys/values on the model's device (store
    positions [lo, hi)); the new tokens are store positions [start, start+Sq). ``bias(rows)`` gives the additive
    float32 bias of the last ``rows`` query rows (mask and causality as the model asked): [B|1, Hq|1, rows, hi-lo].
    Building only the rows a statistic needs keeps an observation window at O(rows x S), never O(S^2).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    lo: int
    hi: int
    start: int
    scale: float

    def bias(self, rows: int) -> torch.Tensor | None:
        sq, ncols, dev = self.q.shape[2], self.hi - self.lo, self.q.device
        rows = min(rows, sq)
        out = None
        if self.mask is not None:
            m = self.mask[..., sq - rows :, :ncols] if self.mask.shape[-2] > 1 else self.mask[..., :ncols]
            if m.dtype == torch.bool:
                out = torch.zeros(m.shape, dtype=torch.float32, device=dev).masked_fill_(~m, float("-inf"))
            else:
                out = m.to(device=dev, dtype=torch.float32)
        if self.is_causal:  # SDPA's top-left aligned triangle: query row i sees columns j <= i
            r = torch.arange(sq - rows, sq, device=dev).unsqueeze(1)
            c = torch.arange(ncols, device=dev).unsqueeze(0)
            causal = torch.zeros(rows, ncols, dtype=torch.float32, device=dev).masked_fill_(c > r, float("-inf"))
            out = causal if out is None else out + causal
        return out


class Policy:
    """Base class. Subclasses set ``name`` and implement ``decode``; the others have working defaults.

    Per site, the runtime calls, in order: ``reset(site)`` when a new sequence starts, ``append(site, k, v, start)``
    after new tokens were written to the host store, ``prefill(site, view)`` after each exact multi-query call, then
    ``decode(...)`` for single-query steps. Multi-query calls (prefill, chunked prefill) are exact attention, done by
    the runtime: every method here (SpeCache Algorithm 1, KCache, CAKE, SnapKV) computes prefill attention exactly
    and only changes what is kept afterwards.

    ``uses_store``: False for policies that never read the full-precision store back (eviction and on-device
    compression: streaming, snapkv, cake, quant, kvcomp); the runtime then writes nothing to it (unless
    ``Config.measure_error`` needs the exact KV) and chunked prefill over earlier chunks is refused.
    """

    name: ClassVar[str] = ""
    uses_store: ClassVar[bool] = True
    speculative: ClassVar[bool] = False  # implements decode_speculative (specache.generate's speculative steps)
    # Declared capabilities the runtime reads (set per instance by a policy whose options choose them):
    # ``static``: decodes index-mode caches through fixed-shape state (``decode_static``), lengths on the device;
    # ``static_required``: the user asked for that path: an append-mode (DynamicCache) decode is refused instead of
    # decoded by the default path, and specache.generate defaults to a StaticCache;
    # ``host_codec``: the name of the codec that replaces the full-precision host store (``new_host_codec``), or None.
    static: bool = False
    static_required: bool = False
    host_codec: str | None = None
    # A frozen dataclass of the policy's options: given, the base class builds ``self.options`` from
    # ``Config.policy_options`` (unknown names and wrong types refused with expected / got / fix; the dataclass's
    # ``__post_init__`` checks values). Policies without one parse ``policy_options`` themselves.
    Options: ClassVar[type | None] = None

    def __init__(self, config: Config) -> None:
        self.config = config
        self.options = options_of(type(self), config.policy_options) if self.Options is not None else None

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(config)

    def reset(self, site: Site) -> None:
        site.clear_state()

    def append(self, site: Site, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """k, v: [B, Hkv, Sn, D] on the model's device, the tokens just written at positions [start, start+Sn)."""

    def prefill(self, site: Site, view: PrefillView) -> None:
        """After an exact multi-query call (see PrefillView). Eviction policies score and evict here."""

    def decode(
        self, site: Site, q: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int, scale: float
    ) -> torch.Tensor:
        """Attention of q [B, Hq, 1, D] over store positions [lo, hi); bias [B|1, Hq|1, 1, hi-lo] additive or None.
        Returns [B, Hq, 1, Dv] in q.dtype."""
        raise NotImplementedError

    def decode_speculative(
        self, site: Site, q: torch.Tensor, k_spec: torch.Tensor, v_spec: torch.Tensor, bias: torch.Tensor | None,
        lo: int, hi: int, scale: float,
    ) -> torch.Tensor:
        """A speculative step (SpeCache Algorithms 2-3): q [B, Hq, R, D] holds R-1 real rows (already appended at
        [hi-R+1, hi)) and, last, the speculative row, whose key/value k_spec, v_spec [B, Hkv, 1, D] sit at position
        ``hi`` and are never stored. Attention over store positions [lo, hi] (bias [.., R, hi-lo+1] or None). The
        speculative row's attention predicts the next step's fetch."""
        raise NotImplementedError(f"policy {self.name!r} has no speculative decode")

    def decode_static(self, site: Site, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      pos: torch.Tensor, bias: torch.Tensor, scale: float, n_real: int, speculating: bool
                      ) -> torch.Tensor:
        """A decode step of an index-mode cache through fixed-shape state (``static`` policies only): q [B, Hq, R, D],
        the new K/V written at the device positions ``pos``, bias over the cache's capacity."""
        raise NotImplementedError(f"policy {self.name!r} declares no static decode path")

    def new_host_codec(self, host: str = "cpu", pin: bool = False, capacity: int = 0):
        """The compressed host store replacing the full-precision one (``host_codec`` policies only)."""
        raise NotImplementedError(f"policy {self.name!r} declares no host codec")

    def site_report(self, site: Site) -> dict[str, Any]:
        """Extra per-site figures for specache.stats (may sync: reporting only)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def options_of(cls: type[Policy], raw: dict[str, Any]) -> Any:
    """``cls.Options(**raw)``, with the names and the types of ``raw`` checked against the dataclass's fields."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{cls.name} policy: unknown policy_options {unknown}; expected some of {sorted(fields)}; "
                         f"fix: drop them or rename them to one of those")
    for name, value in raw.items():
        f = fields[name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        want = _TYPES.get(kind)
        if want and (not isinstance(value, want) or (bool not in want and isinstance(value, bool))):
            raise ValueError(f"{cls.name} policy: policy_options[{name!r}] expected {kind}, got {value!r}; "
                             f"fix: pass {name}={f.default!r} (the default) or another {kind}")
    return cls.Options(**raw)
