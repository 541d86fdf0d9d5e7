"""The eviction policies' static decode path: a fixed set of kept rows, each new token written to a slot the device
computes from its position.

StreamingLLM and SnapKV decode by attending over the rows they kept (``streaming.kept_attention``: the model's bias
read at each row's position, rows holding nothing masked). Their default path sizes that attention by host-side
counts that change every step (SnapKV's kept rows grow by one a step), so a step cannot be replayed as a CUDA graph.
Here the rows have the capacity the sequence can reach, fixed at the first decode step, and a step does the same work
whatever the position:

- the new token's row goes to the slot ``slot(p)`` of its position ``p`` (a device scalar, the model's
  cache_position): StreamingLLM's ring, ``p`` for a sink, else ``S + (p - S) mod (budget - S)``; SnapKV's
  ``p - L + m`` (L the prompt length, m the rows the prompt kept: generated tokens are always kept), over slots
  grown in steps (``fits``: a step past them runs from Python, which grows them; a replay never passes them);
- the slot's position is recorded, and attention runs over all the slots with the bias over the cache's capacity
  gathered at their positions (the causal mask of the step, or the model's mask): an empty slot (position -1) or a
  position the mask hides contributes nothing.

The write position is checked on the device (``bad``, raised by ``Runtime.check_deferred``). A multi-token call
after static steps (a chunk more of prompt) is refused, as on the default path: these policies keep no
full-precision store to attend the earlier tokens exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..runtime.state import StaticDecodeState
from .streaming import kept_attention, kept_bias

# Where a step attends through torch's SDPA (one fused kernel over the slots) instead of the policies' reference
# attention (float32 matmuls and softmax, ~15 small kernels a layer, whose GPU time and gaps exceed a full-cache
# step at 2048 kept rows): "auto" on CUDA, "always" everywhere (tests of the CPU wiring), "never".
SDPA = "auto"


class KeptRows(StaticDecodeState):
    """One site's kept rows at a fixed capacity. ``k``, ``v``: [B, Hkv, N, D]; ``pos``: [N] (one position list for
    every batch row and head, StreamingLLM's) or [B, Hkv, N] (SnapKV's), -1 for an empty slot; ``n``: tokens seen
    (a device scalar); ``slot``: the slot of each position of a [P] tensor, computed on the device."""

    def __init__(self, site, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                 slot: Callable[[torch.Tensor], torch.Tensor], owned: bool, limit: int | None = None) -> None:
        super().__init__(site.device, site.length)
        self.k, self.v, self.pos, self.slot = k, v, pos, slot
        self.owned = owned  # the rows are this state's (counted here) rather than the policy's tier entries
        self.limit = limit  # the positions below it have a slot (None: every position the cache can write)

    def fits(self, site) -> bool:
        return self.limit is None or site.length < self.limit

    def tensors(self):
        return (self.k, self.v, self.pos, self.n) if self.owned else (self.n,)

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor,
             scale: float) -> torch.Tensor:
        """One decode step: q [B, Hq, 1, D], the new token's K/V [B, Hkv, 1, D] at the device position pos [1], bias
        [B|1, Hq|1, 1, C] over the cache's capacity. Returns [B, Hq, 1, Dv]."""
        p = pos[:1]
        self.advance(p)
        s = self.slot(p)
        self.k.index_copy_(2, s, k_new[:, :, :1])
        self.v.index_copy_(2, s, v_new[:, :, :1])
        if self.pos.dim() == 1:
            self.pos.index_copy_(0, s, p)
            rows = self.pos.view(1, 1, -1)
        else:
            self.pos.index_copy_(2, s, p.expand(*self.pos.shape[:2], 1))
            rows = self.pos
        if SDPA == "always" or SDPA == "auto" and q.is_cuda:
            return _sdpa_over_slots(q, self.k, self.v, rows, bias, scale)
        return kept_attention(q, self.k, self.v, rows, bias, 0, bias.shape[-1], scale)


def _sdpa_over_slots(q, k, v, pos, bias, scale):
    """``kept_attention`` over the slots through SDPA (the same mask, ``kept_bias``). Never a row with every slot
    masked (the step's own token holds a slot), so SDPA's NaN for such a row cannot arise. q [B, Hq, 1, D], k/v
    [B, Hkv, N, D], pos [B|1, Hkv|1, N], bias [B|1, Hq|1, 1, C]."""
    mask = kept_bias(q, pos, bias, 0, bias.shape[-1]).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=q.shape[1] > k.shape[1])


def streaming_state(policy, site) -> KeptRows:
    """StreamingLLM's rows are already fixed (sinks, then a ring): the state steps them in place."""
    t = site.tier
    s, ring = t["s"], t["cap"] - t["s"]

    def slot(p):
        return torch.where(p < s, p, s + (p - s) % ring)

    return KeptRows(site, t["k"], t["v"], t["pos"], slot, owned=False)


def snapkv_state(policy, site, capacity: int) -> KeptRows:
    """SnapKV's kept rows plus slots for the positions to come: rows m.. hold positions L... The slots cover a
    quarter of m positions past the prompt (at least 16; at most what the cache can still write), doubled by
    ``grown`` when a step would pass them (a new state, so a recapture: a few per sequence). A slot per position the
    cache could write would hold as many rows as the full cache for a cache allocated far beyond what the loop
    generates."""
    t = site.tier
    k, v, pos = t.pop("k").view(), t.pop("v").view(), t.pop("pos").view()
    extra = max(16, pos.shape[2] // 4)
    return _snapkv_rows(site, k, v, pos, site.length, min(capacity - site.length, extra), capacity)


def grown(site, st: KeptRows) -> KeptRows:
    """``st`` with twice the slots past the prompt (a new state: graphs captured over the old one are not replayed)."""
    m, prompt = st.rows0, st.prompt
    used = m + site.length - prompt
    extra = min(st.capacity - prompt, 2 * (st.k.shape[2] - m))
    return _snapkv_rows(site, st.k[:, :, :used], st.v[:, :, :used], st.pos[:, :, :used], prompt, extra, st.capacity,
                        rows0=m)


def _snapkv_rows(site, k, v, pos, prompt, extra, capacity, rows0=None) -> KeptRows:
    b, h, used = pos.shape
    m = used if rows0 is None else rows0  # rows the prompt kept; rows m.. hold positions prompt..
    n = m + max(0, extra)
    kk = k.new_zeros((b, h, n, k.shape[-1]))
    vv = v.new_zeros((b, h, n, v.shape[-1]))
    pp = pos.new_full((b, h, n), -1)
    kk[:, :, :used].copy_(k)
    vv[:, :, :used].copy_(v)
    pp[:, :, :used].copy_(pos)
    shift = m - prompt

    def slot(p):
        return p + shift

    st = KeptRows(site, kk, vv, pp, slot, owned=True, limit=prompt + n - m)
    st.rows0, st.prompt, st.capacity = m, prompt, capacity
    return st
