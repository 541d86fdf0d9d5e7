"""specache configuration: one frozen dataclass, validated on construction.

Defaults follow the SpeCache paper (Jie et al., "SpeCache: Speculative Key-Value Caching for Efficient Generation of
LLMs", ICML 2025, arXiv 2503.16163) as digested in ../shared/research/papers.md §1; each field says where its default
comes from.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class KVHome(str, enum.Enum):
    """Where the full-precision KV cache lives."""

    HOST = "host"  # CPU memory (pinned when CUDA is present): the point of SpeCache
    DEVICE = "device"  # same device as the model: for debugging and for comparing against offload


class Inner(str, enum.Enum):
    """What compiles the graph after specache's pass has rewritten it."""

    AUTO = "auto"  # inductor when the graph runs on CUDA, eager on CPU (C++ codegen costs minutes per graph there)
    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"


@dataclass(frozen=True)
class Config:
    """What specache does to every attention it rewrites.

    policy: name of a registered KV-cache policy (``specache.policies()`` lists them). "specache" by default;
        "full" keeps and attends to every token in full precision (the exactness mode).
    bits: bits per element of the low-bit KV copy kept on the device: 1, 2 or 4. SpeCache reports 2-bit and 1-bit
        (1-bit with its modified quarter-point quantizer); 2 is the paper's main setting (LongBench avg 45.0 vs 45.3
        full, Llama-3-8B, Table 1). Use bits=1 for the paper's "10x" compression point.
    group_size: KIVI quantization group: keys are quantized per channel over groups of this many tokens, values per
        token over groups of this many channels (clamped to head_dim). SpeCache §4.1 uses g=64 in its comparison.
    topk: full-precision KV pairs fetched per KV head per layer per decode step. SpeCache §4.1: "we prefetch top-64
        16-bit KV pairs from CPU memory".
    window: most recent tokens always kept on the device in full precision (KIVI's residual). SpeCache §4.1 shortens
        KIVI's 128 to 64.
    sinks: first tokens always kept on the device in full precision (StreamingLLM's attention sinks). The SpeCache
        paper keeps none, so 0.
    speculative: prefetch the next step's top-k on a side stream, chosen by a speculative token decoded alongside the
        real one (SpeCache §3.3, Algorithm 3). Off: fetch after the real query is known.
    lowbit_remainder: tokens outside sinks ∪ top-k ∪ window still take part in attention through their low-bit copy,
        as in SpeCache Algorithm 3 (K = K' ∪ K_κ). Off: they are dropped (a pure top-k sparse attention).
    kv_home: where the full-precision KV lives ("host": CPU memory, pinned on CUDA machines; "device").
    max_seq_len: if set, host buffers are allocated once for this many tokens; if None they grow geometrically.
    inner: what compiles the rewritten graph ("auto", "inductor", "aot_eager", "eager").
    measure_error: also compute exact attention at every decode step and record the relative error of the policy's
        output per layer (``specache.attention_error``). Costs a full fetch per step: for evaluation only.
    cuda_graphs: replay the compiled model's one-token decode steps as CUDA graphs, under ``model.generate`` or any
        loop, where the policy decodes through fixed-shape state on CUDA (specache_compile/decode_graphs.py). Off:
        every step runs the compiled graph and the runtime from Python.
    sliding_layers: what becomes of a sliding-window layer (one whose cache keeps only its last tokens, as Gemma-3's
        local layers and transformers' DynamicSlidingWindowLayer do). "model" (default): it keeps its original code
        and the model's own window cache, which holds fewer device bytes than any policy's state over the whole
        history; it is counted as skipped with that reason. "rewrite": the policy takes it like any other layer.
    policy_options: extra hyperparameters for non-default policies, by name.
    """

    policy: str = "specache"
    bits: int = 2
    group_size: int = 64
    topk: int = 64
    window: int = 64
    sinks: int = 0
    speculative: bool = True
    lowbit_remainder: bool = True
    kv_home: KVHome = KVHome.HOST
    max_seq_len: int | None = None
    inner: Inner = Inner.AUTO
    measure_error: bool = False
    cuda_graphs: bool = True
    sliding_layers: str = "model"
    policy_options: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self) -> None:
        # Coerce the str enums so `Config(kv_home="device")` works and stays hashable/comparable.
        for name, enum_type in (("kv_home", KVHome), ("inner", Inner)):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    object.__setattr__(self, name, enum_type(value))
                except ValueError:
                    choices = ", ".join(repr(e.value) for e in enum_type)
                    raise ValueError(f"specache.Config.{name}: expected one of {choices}, got {value!r}") from None
        from .policies import registered  # late: policies import config for type hints only

        if not isinstance(self.policy, str) or self.policy not in registered():
            raise ValueError(
                f"specache.Config.policy: expected one of {sorted(registered())}, got {self.policy!r}; "
                "register a new one with specache.register_policy"
            )
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in (1, 2, 4):
            raise ValueError(f"specache.Config.bits: expected 1, 2 or 4, got {self.bits!r}")
        _positive_int("group_size", self.group_size)
        if self.group_size & (self.group_size - 1):
            raise ValueError(
                f"specache.Config.group_size: expected a power of two (the packed layout splits head_dim by it), "
                f"got {self.group_size}"
            )
        for name in ("topk", "window", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"specache.Config.{name}: expected an int >= 0, got {value!r}")
        if self.max_seq_len is not None:
            _positive_int("max_seq_len", self.max_seq_len)
        for name in ("speculative", "lowbit_remainder", "measure_error", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"specache.Config.{name}: expected True or False, got {getattr(self, name)!r}")
        if self.sliding_layers not in ("model", "rewrite"):
            raise ValueError(f"specache.Config.sliding_layers: expected 'model' or 'rewrite', got "
                             f"{self.sliding_layers!r}")
        if not isinstance(self.policy_options, dict):
            raise ValueError(f"specache.Config.policy_options: expected a dict, got {type(self.policy_options)}")

    def replace(self, **overrides: Any) -> Config:
        return with_overrides(self, overrides)

    def key(self) -> str:
        """A stable string of every field, mixed into the pass's uuid so the FX graph cache never serves a graph
        compiled under another config."""
        items = dataclasses.asdict(self)
        items["policy_options"] = sorted(self.policy_options.items())
        return repr(sorted((k, getattr(v, "value", v)) for k, v in items.items()))


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"specache.Config.{name}: expected an int > 0, got {value!r}")


def with_overrides(base: Config | None, overrides: dict[str, Any]) -> Config:
    """Return ``base`` (or the defaults) with ``overrides`` applied; unknown names raise ValueError."""
    base = base if base is not None else Config()
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"specache: unknown option(s) {unknown}; expected some of {sorted(fields)} "
            "(policy hyperparameters go in policy_options={...})"
        )
    return dataclasses.replace(base, **overrides)


def checked(config: Config) -> Config:
    """What compiling refuses beyond Config's own checks (Config admits topk=0, a legal size in itself): called by
    specache.compile, api.backend, and the backend string's first call."""
    if config.topk < 1:
        raise ValueError(
            f"specache: expected topk >= 1 (full-precision rows fetched per KV head per step), got topk={config.topk}; "
            "fix: leave it at the default (64) or pass a positive count; for no fetch at all use policy='quant'"
        )
    return config
