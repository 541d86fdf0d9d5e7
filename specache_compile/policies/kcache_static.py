"""KCache's static decode path: every shape fixed by the cache's capacity, every length a device scalar.

KCache's default path (policies/kcache.py) attends store positions [lo, hi), sizes set by host-side lengths that grow
every step, so a step cannot be replayed as a CUDA graph. Here, for a model decoding a StaticCache (index-mode writes
at ``cache_position``), a step does the same work whatever the position:

- K lives on the device at the cache's capacity C, ``[B, Hkv, C, D]``, zero-initialised (an unwritten column gives
  a finite logit, which its mask then removes: a NaN there would survive ``+ -inf``); the new token's K goes to the
  column of its device position (``index_copy_``);
- the new K and V go to the host store at that position (``quant_ops.scatter_rows_static``: the GPU writes pinned
  memory in place), so the store stays the full-precision history a rewrite rebuilds from;
- logits over all C columns plus the step's bias (the causal mask of the step, or the model's mask), columns at or
  past ``n`` (tokens written, a device scalar) masked too: softmax, the GQA-mean top-N over C (``ops.topk_positions``,
  the default path's selection) with every masked column turned into -1;
- the N V rows fetched by device index into a preallocated buffer (``quant_ops.gather_rows_static``: a -1 reads
  nothing and gives a zero row), then weighted by their probabilities, renormalised as the default path does.

A row of unwritten pinned memory may hold anything, NaN included, and ``0 * NaN`` is NaN: a -1 slot gets weight 0
and its row is replaced by zeros (``torch.where``) before the weighted sum, so nothing but written rows can reach the
output, whatever the gather returned. Once N covers the written columns every one of them is fetched, and the output
is exact attention, as on the default path.

The write position is checked on the device (``bad``, raised by ``Runtime.check_deferred``). A multi-token call after
static steps is served by the runtime's ``rewrite_history``: KCache keeps the full-precision store, so its default
state is rebuilt from it (``KCachePolicy.reset`` drops this state with the rest of the tier) and the next one-token
step builds this state again.
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.quant_ops import gather_rows_static, scatter_rows_static
from ..runtime.state import StaticDecodeState
from .cake import _safe_softmax

_NEG = float("-inf")


def renormalized(w: torch.Tensor) -> torch.Tensor:
    """Weights [.., N] divided by their sum (the softmax restricted to the fetched rows); all zero stays zero."""
    mass = w.sum(dim=-1, keepdim=True)
    return w / torch.where(mass > 0, mass, torch.ones_like(mass))


class KCacheState(StaticDecodeState):
    """One site's fixed-capacity KCache state (see the module docstring). ``k`` [B, Hkv, C, D]: the keys;
    ``fetch_v`` [B, Hkv, N, Dv]: the fetched values (N = min(topk, C)); ``n``: tokens written (a device scalar);
    ``cols``: 0..C-1, a constant (a graph replays its address)."""

    def __init__(self, policy, site, capacity: int) -> None:
        super().__init__(site.device, site.length)
        t, dev = site.tier, site.device
        b, h, n = site.batch, site.heads, site.length
        self.k = torch.zeros((b, h, capacity, site.head_dim), dtype=site.dtype, device=dev)
        if n:
            self.k[:, :, :n].copy_(t["k"].view())
        self.topn = min(policy.topn, capacity)
        self.fetch_v = torch.zeros((b, h, self.topn, site.v_head_dim), dtype=site.dtype, device=dev)
        for name in ("k", "fetch_v"):
            t.pop(name)  # the default path's buffers: this state's replace them until the tier is reset
        self.cols = torch.arange(capacity, device=dev)
        self.renormalize = policy.renormalize
        # what one step fetches, as the default path counts it (values only): replayed() repeats it
        self.rows = self.fetch_v.shape[0] * self.fetch_v.shape[1] * self.topn
        self.fetch_bytes = self.fetch_v.numel() * self.fetch_v.element_size()
        site.k.reserve(capacity)  # one allocation: from now on the store is written in place at device positions
        site.v.reserve(capacity)
        if dev.type == "cuda" and site.k.data.device.type == "cpu" and not site.k.data.is_pinned():
            raise RuntimeError(f"specache: site {site.name}: kcache's static decode path writes the host store from "
                               "the GPU, which needs it pinned; expected Config.kv_home='host' (pinned on CUDA), got "
                               "a pageable store. Fix: compile with kv_home='host', or pass static=False")

    def tensors(self):
        return (self.k, self.fetch_v, self.n, self.cols)

    def replayed(self, site, steps: int) -> None:
        """A replayed step stores one row and fetches ``rows`` value rows, as the step run from Python counts."""
        super().replayed(site, steps)
        if steps > 0:
            site.stats.fetched_rows += self.rows * steps
            site.stats.fetched_bytes += self.fetch_bytes * steps

    def step(self, site, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
             bias: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode step: q [B, Hq, 1, D], the new token's K/V [B, Hkv, 1, D] at the device position pos [1], bias
        [B|1, Hq|1, 1, C] over the cache's capacity. Returns [B, Hq, 1, Dv] in q.dtype."""
        b, hq = q.shape[:2]
        hkv, c, topn = self.k.shape[1], self.k.shape[2], self.topn
        rep = hq // hkv
        p = pos[:1]
        self.advance(p)
        self.k.index_copy_(2, p, k_new[:, :, :1])
        scatter_rows_static(k_new[:, :, :1], p, site.k.data)
        scatter_rows_static(v_new[:, :, :1], p, site.v.data)

        logits = ops.attention_logits(q[:, :, :1], self.k, scale) + bias  # [B, Hq, 1, C] fp32
        logits = logits.masked_fill(self.cols >= self.n, _NEG)  # unwritten columns, whatever the mask says
        probs = _safe_softmax(logits)
        # a column is a candidate of a KV head if one of its query heads sees it
        seen = ~torch.isneginf(logits).reshape(b, hkv, rep, c).all(dim=2)  # [B, Hkv, C]
        score = probs.reshape(b, hkv, rep, c).mean(dim=2).masked_fill(~seen, _NEG)
        top = ops.topk_positions(score, topn)  # [B, Hkv, N] ascending; -inf columns only once the others are taken
        ok = seen.gather(2, top)
        idx = torch.where(ok, top, -1)
        gather_rows_static(site.v.data, idx, self.fetch_v)
        site.stats.fetched_rows += self.rows
        site.stats.fetched_bytes += self.fetch_bytes
        v = torch.where(ok.unsqueeze(-1), self.fetch_v, 0.0)

        ok_q = ok.repeat_interleave(rep, dim=1).unsqueeze(2)  # [B, Hq, 1, N]
        w = probs.gather(3, top.repeat_interleave(rep, dim=1).unsqueeze(2))
        w = torch.where(ok_q, w, 0.0)
        if self.renormalize:
            w = renormalized(w)
        out = w.reshape(b, hkv, rep, topn) @ v.float()  # [B, Hkv, rep, Dv]
        return out.reshape(b, hq, 1, v.shape[-1]).to(q.dtype)
