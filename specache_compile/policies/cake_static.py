"""CAKE's static decode path: the kept rows of a site at a fixed number of slots, the decode eviction computed on
the device on fixed shapes, so a one-token step does the same work whatever the position and is replayed as a CUDA
graph (decode_graphs.py).

CAKE's default decode (policies/cake.py) sizes every tensor by a host count of kept rows: rows grow by one a step
until a layer holds its budget B_l plus the window S_w, then each step appends one row and evicts one. Here, after
the prefill (and the budgets made final), a site's rows get ``slots`` slots once:

- ``decode_evict`` (the default): ``keep + 1`` slots, keep = B_l + S_w (fewer when the cache's capacity ends
  before the rows could reach that: then nothing is ever evicted). A device counter ``used`` says how many slots
  hold a token: the new token goes to slot ``used``, attention runs over every slot with the model's bias (over the
  cache's capacity) gathered at each slot's position and empty slots (position -1) masked, then the code's rule is
  computed whether or not it applies: the new query's probabilities over the first ``keep + 1 - S_w`` slots (the
  non-window rows when every slot is used), avg-pooled, GQA-averaged, the top B_l plus the S_w most recent slots,
  gathered in ascending position order. ``torch.where`` on the device condition ``used == keep + 1`` writes them
  back or leaves the rows as they were, so rows, positions and kept sets are the default path's at every step.
- ``decode_evict=False``: every generated token is kept; slots for a quarter of the prompt's rows past the prompt
  (at least 16), doubled by ``grown`` when a step would pass them (``fits``: a replay never passes them; a new
  state, so a recapture: a few per sequence).

Attention and the eviction's scores go through the same ops as the default path (``ops.sparse_attention``,
``ops.attention_logits``), over the same rows once the rows are full: the two paths give the same tokens. The write
position is checked on the device (``bad``, raised by ``Runtime.check_deferred``), never read on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import ops
from ..runtime.state import StaticDecodeState
from .cake import _kept_bias, _safe_softmax


class CakeRows(StaticDecodeState):
    """One site's kept rows at ``slots`` slots: ``k``, ``v`` [B, Hkv, slots, D], ``pos`` [B, Hkv, slots] (-1: empty),
    the first ``used`` holding tokens in ascending position order; ``keep``: B_l + S_w where the decode rule evicts
    (None: it never does). ``rows0``, ``prompt``: the rows used and the sequence length when the state was built (the
    host's count of the rows used at length L is rows0 + L - prompt while nothing is evicted); ``capacity``: the
    positions the cache can hold."""

    def __init__(self, site, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, slots: int, keep: int | None,
                 sw: int, kernel: int, capacity: int, rows0: int | None = None, prompt: int | None = None) -> None:
        super().__init__(site.device, site.length)
        b, h, used = pos.shape
        self.k = k.new_zeros((b, h, slots, k.shape[-1]))
        self.v = v.new_zeros((b, h, slots, v.shape[-1]))
        self.pos = pos.new_full((b, h, slots), -1)
        self.k[:, :, :used].copy_(k)
        self.v[:, :, :used].copy_(v)
        self.pos[:, :, :used].copy_(pos)
        self.used = torch.tensor(used, dtype=torch.int64, device=site.device)
        self.slots, self.sw, self.kernel, self.capacity = slots, sw, kernel, capacity
        self.keep = keep if keep is not None and slots == keep + 1 else None
        self.rows0 = used if rows0 is None else rows0
        self.prompt = site.length if prompt is None else prompt

    def fits(self, site) -> bool:
        return self.keep is not None or self.rows0 + site.length - self.prompt < self.slots

    def tensors(self):
        return (self.k, self.v, self.pos, self.used, self.n)

    def step(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor,
             scale: float) -> torch.Tensor:
        """One decode step: q [B, Hq, 1, D], the new token's K/V [B, Hkv, 1, D] at the device position pos [1], bias
        [B|1, Hq|1, 1, C] over the cache's capacity. Returns [B, Hq, 1, Dv]."""
        p = pos[:1]
        self.advance(p)
        b, h, slots = self.pos.shape
        s = self.used.clamp(max=slots - 1).view(1)  # clamped: a flagged step must not index past the slots
        self.k.index_copy_(2, s, k_new[:, :, :1])
        self.v.index_copy_(2, s, v_new[:, :, :1])
        self.pos.index_copy_(2, s, p.expand(b, h, 1))
        self.used.add_(1)
        kb = _kept_bias(bias, self.pos, 0, q.shape[1])  # [B, Hq, 1, slots], empty slots -inf
        out = ops.sparse_attention(q, self.k, self.v, kb, scale)
        if self.keep is not None:
            self._evict(q, kb, scale)
        return out

    def _evict(self, q: torch.Tensor, kb: torch.Tensor, scale: float) -> None:
        """CakePolicy._decode_evict on the full slots, applied only where every slot is used (a device condition)."""
        b, h, slots = self.pos.shape
        hq, keep, sw = q.shape[1], self.keep, self.sw
        full = self.used == slots
        logits = ops.attention_logits(q, self.k, scale) + kb  # [B, Hq, 1, slots] float32
        probs = _safe_softmax(logits)[:, :, 0, : slots - sw]
        probs = F.avg_pool1d(probs, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        score = probs.reshape(b, h, hq // h, slots - sw).mean(dim=2)
        kept = ops.topk_positions(score, keep - sw)  # [B, Hkv, B_l] ascending
        recent = torch.arange(slots - sw, slots, device=kept.device).expand(b, h, sw)
        rows = torch.cat([kept, recent], dim=2)  # [B, Hkv, keep]
        # gather first (new tensors), then write back: no aliasing between the two
        for x in (self.k, self.v):
            got = x.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
            x[:, :, :keep].copy_(torch.where(full, got, x[:, :, :keep]))
        self.pos[:, :, :keep].copy_(torch.where(full, self.pos.gather(2, rows), self.pos[:, :, :keep]))
        self.pos[:, :, keep:].masked_fill_(full, -1)
        self.used.sub_(full.to(torch.int64))


def cake_state(policy, site, capacity: int) -> CakeRows:
    """The state of a site whose prefill is done and budgets final, from the default path's rows in ``site.tier``
    (taken out of it: the state owns the rows from here). ``capacity``: the positions the cache can hold."""
    t = site.tier
    n, sw = t["n"], t["sw"]
    k, v, pos = (t.pop(name)[:, :, :n] for name in ("k", "v", "pos"))
    room = capacity - site.length  # positions still to come: rows never exceed n + room
    if policy.options.decode_evict:
        keep = t["budget"] + sw
        if n > keep:
            raise RuntimeError(f"specache cake: site {site.name}: expected at most budget + window = {keep} kept rows "
                               f"after the prefill, got {n}; fix: report this (the prefill's eviction missed rows)")
        return CakeRows(site, k, v, pos, min(keep + 1, n + room), keep, sw, policy.options.kernel, capacity)
    return CakeRows(site, k, v, pos, n + min(room, max(16, n // 4)), None, sw, policy.options.kernel, capacity)


def grown(site, st: CakeRows) -> CakeRows:
    """``st`` (rows that never evict) with twice the slots past the prompt, at most what the cache can still write
    (a new state: graphs captured over the old one are not replayed)."""
    used = st.rows0 + site.length - st.prompt
    slots = st.rows0 + min(st.capacity - st.prompt, 2 * (st.slots - st.rows0))
    return CakeRows(site, st.k[:, :, :used], st.v[:, :, :used], st.pos[:, :, :used], slots, None, st.sw, st.kernel,
                    st.capacity, rows0=st.rows0, prompt=st.prompt)
