"""StreamingLLM: attention sinks plus a window of recent tokens on the device; everything else is evicted.

Paper: Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453. Autoregressive LMs pour a large share of their attention into the first tokens whatever they say
("attention sinks"); window attention fails once those leave the cache, and keeping their KV restores it. The cache
of each layer and KV head is

    C_t = {0, ..., S-1}  ∪  {t - R + 1, ..., t}          S = sinks, R = budget - S recent tokens (t included)
    o_t = softmax(scale · q_t · K_Cᵀ + mask_C) · V_C

so it never holds more than ``budget`` tokens: at every step the oldest non-sink token leaves.

Options (``Config.policy_options``):

- ``sinks``: attention sinks, default 4 (the paper's: four initial tokens suffice, §3.2). ``Config.sinks`` sets it
  too when it is not 0 (its default), so the harness' ``streaming:sinks=8`` works; ``policy_options={"sinks": 0}``
  gives plain window attention.
- ``budget``: tokens kept per KV head per layer, sinks included: an int >= 1, or a float in (0, 1] = that fraction
  of the prompt length (rounded up, at least 1), fixed at the prompt. Default 2048 (the official code's
  run_streaming_llama.py keeps start_size 4 + recent_size 2000; 2048 is also SnapKV's code default
  ``max_capacity_prompt``, so the two compare at the same budget).

Choices the paper leaves open, made here:

- Positions are the ones the model gave: the cached keys are post-RoPE, so the paper's re-numbering of positions
  inside the cache (which needs pre-RoPE keys) is not done. kvpress' StreamingLLMPress keeps the original
  positions too (its KeyRerotationPress wrapper is what re-rotates).
- Sinks are clamped to ``budget - 1``, so the current token always has a slot.
- Prefill attention is exact (every policy's); the eviction applies from the first decode step on.
- Sliding-window layers (Mistral) and left padding: the model's bias over positions [lo, hi) is gathered at the
  positions each slot holds, and slots outside [lo, hi) are masked, so an evicted or out-of-window token never counts.

Device state (``site.tier``): K and V ``[B, Hkv, budget, D]`` (sinks first, then a ring of recent tokens, so a decode
step writes one row and copies nothing) and the position of each slot (``-1`` = empty). The decode path has no host
sync: slot indices come from Python-side counters.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..kernels import ops
from ..runtime.state import parse_static
from .base import Policy, register_policy

DEFAULT_BUDGET = 2048


# -- options shared by the eviction policies (snapkv imports these) ----------------------------------------------------


def pop_int(policy: str, opts: dict[str, Any], name: str, default: int, minimum: int, fix: str) -> int:
    """policy_options[name] as an int >= minimum (removed from opts), or default."""
    value = opts.pop(name, default)
    _check_int(policy, name, value, minimum, fix)
    return value


def _check_int(policy: str, name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{policy} policy: policy_options[{name!r}] expected an int >= {minimum}, got {value!r}; "
                         f"fix: {fix}")


def pop_shared(policy: str, opts: dict[str, Any], config, name: str, paper: int, minimum: int, fix: str) -> int:
    """A hyperparameter that is also a Config field (``sinks``, ``window``): policy_options[name] if given, else the
    Config field if it is not its default (the harness' "streaming:sinks=8" sets the field), else the paper's value."""
    field_default = type(config).__dataclass_fields__[name].default
    field = getattr(config, name)
    if name in opts:
        value = opts.pop(name)
        _check_int(policy, name, value, minimum, fix)
        if field != field_default and field != value:
            raise ValueError(f"{policy} policy: {name} given twice, expected one value, got Config.{name}={field} and "
                             f"policy_options[{name!r}]={value}; fix: pass only one of them")
        return value
    return field if field != field_default else paper


def pop_budget(policy: str, opts: dict[str, Any]) -> int | float:
    """policy_options['budget']: tokens kept per KV head per layer (int >= 1) or a fraction of the prompt (float)."""
    value = opts.pop("budget", DEFAULT_BUDGET)
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0.0 < value <= 1.0)
    )
    if not ok:
        raise ValueError(
            f"{policy} policy: policy_options['budget'] expected an int >= 1 (tokens per KV head per layer) or a "
            f"float in (0, 1] (a fraction of the prompt length), got {value!r}; fix: e.g. budget=256 or budget=0.1"
        )
    return value


def no_more_options(policy: str, opts: dict[str, Any], known: list[str]) -> None:
    if opts:
        raise ValueError(f"{policy} policy: unknown policy_options {sorted(opts)}; expected some of {sorted(known)}; "
                         "fix: remove them or correct their names")


def resolve_budget(budget: int | float, prompt_len: int) -> int:
    """Tokens kept: the int budget, or the fraction of the prompt length rounded up (at least 1)."""
    if isinstance(budget, float):
        return max(1, math.ceil(budget * prompt_len))
    return budget


def kept_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int,
    scale: float,
) -> torch.Tensor:
    """Attention of q over kept rows that hold store positions ``pos``; only positions in [lo, hi) count.

    bias (the model's, over positions [lo, hi)) is gathered at each row's position. Returns [B, Hq, Sq, Dv].
    """
    return ops.sparse_attention(q, k, v, kept_bias(q, pos, bias, lo, hi), scale)


def kept_bias(q: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    """The additive float32 mask of ``kept_attention``: the model's bias read at each kept row's position, -inf for
    a row holding nothing or a position outside [lo, hi). Broadcastable to [B, Hq, Sq, N]."""
    # q: [B, Hq, Sq, D]; pos: [B|1, Hkv|1, N] int64 (-1: empty); bias: [B|1, Hq|1, Sq, hi-lo]
    b, hq, sq = q.shape[:3]
    hkv, n = pos.shape[1], pos.shape[2]
    rep = hq // hkv
    valid = (pos >= lo) & (pos < hi)
    extra = torch.zeros(valid.shape, dtype=torch.float32, device=q.device).masked_fill_(~valid, float("-inf"))
    if extra.shape[1] > 1:
        extra = extra.repeat_interleave(rep, dim=1)
    extra = extra.unsqueeze(2)  # [B|1, Hq|1, 1, N]
    if bias is not None and hi > lo:
        rel = (pos - lo).clamp(0, hi - lo - 1)
        if rel.shape[0] == 1 and rel.shape[1] == 1:  # one position list for every batch row and head
            extra = extra + bias.float().index_select(-1, rel.reshape(-1))
        else:
            idx = rel.repeat_interleave(rep, dim=1).unsqueeze(2).expand(b, hq, sq, n)
            extra = extra + bias.float().expand(b, hq, sq, hi - lo).gather(3, idx)
    return extra


@register_policy
class StreamingPolicy(Policy):
    name = "streaming"
    uses_store = False

    def __init__(self, config, sinks: int = 4, budget: int | float = DEFAULT_BUDGET):
        super().__init__(config)
        self.sinks = sinks
        self.budget = budget

    @classmethod
    def from_config(cls, config):
        opts = dict(config.policy_options)
        sinks = pop_shared(cls.name, opts, config, "sinks", 4, 0, "pass sinks=4 (the paper's) or another int >= 0")
        budget = pop_budget(cls.name, opts)
        static = opts.pop("static", "auto")
        no_more_options(cls.name, opts, ["sinks", "budget", "static"])
        if isinstance(budget, int) and budget <= sinks:
            raise ValueError(f"streaming policy: policy_options['budget'] expected more than sinks={sinks} tokens "
                             f"(room for the recent window), got {budget}; fix: raise budget or lower sinks")
        policy = cls(config, sinks=sinks, budget=budget)
        parse_static(policy, static, [])
        return policy

    def append(self, site, k, v, start):
        # k, v: [B, Hkv, Sn, D] on the device, store positions [start, start + Sn).
        t = site.tier
        n, dev = k.shape[2], k.device
        if "k" not in t:  # first call of the sequence: the prompt sets a fractional budget
            cap = resolve_budget(self.budget, start + n)
            t["cap"], t["s"] = cap, min(self.sinks, cap - 1)
            t["k"] = torch.zeros((site.batch, site.heads, cap, site.head_dim), dtype=site.dtype, device=dev)
            t["v"] = torch.zeros((site.batch, site.heads, cap, site.v_head_dim), dtype=site.dtype, device=dev)
            t["pos"] = torch.full((cap,), -1, dtype=torch.int64, device=dev)
        cap, s = t["cap"], t["s"]
        end = start + n
        if start < s:  # sinks: slot = position
            m = min(s, end) - start
            t["k"][:, :, start : start + m] = k[:, :, :m]
            t["v"][:, :, start : start + m] = v[:, :, :m]
            t["pos"][start : start + m] = torch.arange(start, start + m, device=dev)
        p0 = max(start, s, end - (cap - s))  # only the last cap - s non-sink tokens can survive this call
        if p0 < end:
            # ring of recent tokens: position p lives in slot s + (p - s) % (cap - s)
            p = torch.arange(p0, end, device=dev)
            slots = s + (p - s) % (cap - s)
            t["k"].index_copy_(2, slots, k[:, :, p0 - start :])
            t["v"].index_copy_(2, slots, v[:, :, p0 - start :])
            t["pos"].index_copy_(0, slots, p)

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, 1, D]; attended store positions [lo, hi); bias [.., 1, hi - lo] or None
        t = site.tier
        return kept_attention(q, t["k"], t["v"], t["pos"].view(1, 1, -1), bias, lo, hi, scale)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        # the ring stepped in place by the device position (policies/kept_static.py, which imports this module)
        from .kept_static import streaming_state

        if site.static is None:
            site.static = streaming_state(self, site)
        return site.static.step(q, k_new, v_new, pos, bias, scale)

    def describe(self):
        return {"policy": self.name, "sinks": self.sinks, "budget": self.budget, "static": self.static}
