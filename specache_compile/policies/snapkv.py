"""SnapKV: the prompt's last queries vote for the prefix tokens worth keeping, once, at the end of the prefill.

Paper: Li, Huang, Yang, Venkitesh, Locatelli, Ye, Cai, Lewis, Chen, "SnapKV: LLM Knows What You are Looking for
Before Generation", NeurIPS 2024, arXiv 2404.14469 (official code: FasterDecoding/SnapKV, ``snapkv_utils.py``).
Each head attends to the prompt in a pattern that the last ``w`` prompt queries (the observation window) already
show, so their attention picks the prefix tokens generation will need. For a prompt of L tokens, per layer:

    A      = softmax(scale · Q_obs · Kᵀ + mask)          Q_obs: the last w queries, [w, L] per query head
    C_j    = Σ_i A_ij                                    votes of the window rows, prefix columns j < L - w
    C'     = pool(C, kernel)                              1-D pooling: keeps a hit's neighbours (clustering)
    C''    = mean of C' over the query heads of a KV group (GQA)
    keep   = TopK_j(C'', budget - w)  ∪  {L - w, ..., L - 1}      per KV head

Decode attends over the kept rows and every token generated since (new tokens are always kept), so the device holds
``budget + generated`` tokens per KV head per layer.

Options (``Config.policy_options``):

- ``budget``: tokens kept per KV head per layer after the prompt, window included (int >= 1, or a float in (0, 1] =
  that fraction of the prompt length, rounded up). Default 2048, the official code's ``max_capacity_prompt``.
- ``window``: observation window, default 32 (the paper's and the official code's ``window_size``). ``Config.window``
  sets it too when it is not 64 (its default), so the harness' ``snapkv:window=16`` works.
- ``kernel``: pooling kernel, an odd int >= 1, default 7 (kvpress' SnapKVPress defaults to window 32 with kernel 7;
  the official code's ``SnapKVCluster`` defaults to 5; the paper's text was not available to check its choice).
- ``pooling``: ``"avg"`` (default, the official code's and kvpress') or ``"max"``.

Choices the paper leaves open, made here:

- GQA: the pooled votes are averaged over the query heads of each KV head (kvpress, and SnapKV issue #22), so the
  kept set is per KV head and no KV row is duplicated.
- A prompt no longer than the budget keeps everything. ``window`` is clamped to the budget and the prompt length.
- The window rows' bias (padding, causality, a sliding window) comes from ``PrefillView.bias(w)``: O(w·L), never
  O(L²). A column no window row may see (left padding, outside a sliding window) ranks below every visible one.
- Sliding-window layers (lo > 0 at decode) and padding: the model's decode bias is gathered at the kept positions,
  and kept positions outside [lo, hi) are masked.

Device state (``site.tier``): kept K, V ``[B, Hkv, N, D]`` and their positions ``[B, Hkv, N]`` (int64), in
``Growable`` buffers re-allocated at the budget after the prefill. Decode has no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import ops
from ..runtime.buffers import Growable
from ..runtime.state import parse_static
from .base import Policy, register_policy
from .cake import window_attention
from .kept_static import grown, snapkv_state
from .streaming import kept_attention, no_more_options, pop_budget, pop_int, pop_shared, resolve_budget

POOLINGS = ("avg", "max")


@register_policy
class SnapKVPolicy(Policy):
    name = "snapkv"
    uses_store = False

    def __init__(self, config, budget: int | float = 2048, window: int = 32, kernel: int = 7, pooling: str = "avg"):
        super().__init__(config)
        self.budget, self.window, self.kernel, self.pooling = budget, window, kernel, pooling

    @classmethod
    def from_config(cls, config):
        opts = dict(config.policy_options)
        budget = pop_budget(cls.name, opts)
        window = pop_shared(cls.name, opts, config, "window", 32, 1, "pass window=32 (the paper's)")
        kernel = pop_int(cls.name, opts, "kernel", 7, 1, "pass an odd kernel, e.g. kernel=7 (the paper's)")
        if kernel % 2 == 0:
            raise ValueError(f"snapkv policy: policy_options['kernel'] expected an odd int (the pooled votes keep "
                             f"their length), got {kernel}; fix: pass kernel={kernel + 1} or {kernel - 1}")
        pooling = opts.pop("pooling", "avg")
        if pooling not in POOLINGS:
            raise ValueError(f"snapkv policy: policy_options['pooling'] expected one of {list(POOLINGS)}, got "
                             f"{pooling!r}; fix: pass pooling='avg' (the official code's) or 'max'")
        static = opts.pop("static", "auto")
        no_more_options(cls.name, opts, ["budget", "window", "kernel", "pooling", "static"])
        policy = cls(config, budget=budget, window=window, kernel=kernel, pooling=pooling)
        parse_static(policy, static, [])
        return policy

    # -- state ------------------------------------------------------------------------------------------------------
    def reset(self, site):
        site.clear_state()
        self.alloc(site, 0)

    def alloc(self, site, capacity):
        t, b, h, dev = site.tier, site.batch, site.heads, site.device
        t["k"] = Growable((b, h), (site.head_dim,), site.dtype, dev, capacity=capacity)
        t["v"] = Growable((b, h), (site.v_head_dim,), site.dtype, dev, capacity=capacity)
        t["pos"] = Growable((b, h), (), torch.int64, dev, capacity=capacity)

    def append(self, site, k, v, start):
        # k, v: [B, Hkv, Sn, D] on the device, store positions [start, start + Sn): always kept (the prefill's are
        # pruned by prefill() right after this call).
        t = site.tier
        n = k.shape[2]
        t["k"].append(k)
        t["v"].append(v)
        t["pos"].append(torch.arange(start, start + n, device=k.device).expand(k.shape[0], k.shape[1], n))

    def prefill(self, site, view):
        # view.q: [B, Hq, L, D]; view.k, view.v: [B, Hkv, N, D] = store positions [view.lo, view.hi)
        b, hq, sq = view.q.shape[:3]
        hkv, ncols = view.k.shape[1], view.k.shape[2]
        cap = resolve_budget(self.budget, view.start + sq)
        if ncols <= cap:
            return  # the prompt fits: keep everything
        w = min(self.window, cap, sq)
        n_pre = ncols - w  # prefix columns [0, n_pre) compete for cap - w slots; the window's own w are kept
        bias = view.bias(w)  # [B|1, Hq|1, w, N], or [w, N] for a causal mask alone
        if bias is not None:
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        probs = window_attention(view.q, view.k, view.scale, bias, w)  # [B, Hq, w, N] fp32 (CAKE's, the same A)
        votes = probs[..., :n_pre].sum(dim=2)  # [B, Hq, n_pre]
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        votes = pool(votes, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        votes = votes.reshape(b, hkv, hq // hkv, n_pre).mean(dim=2)  # GQA: mean over the group
        if bias is not None:
            # columns no window row can see (padding, outside a sliding window) rank last
            dead = torch.isneginf(bias[..., :n_pre]).all(dim=2)  # [B|1, Hq|1, n_pre]
            if dead.shape[1] > 1:
                dead = dead.reshape(dead.shape[0], hkv, hq // hkv, n_pre).all(dim=2)
            votes = votes.masked_fill(dead, float("-inf"))
        top = ops.topk_positions(votes, cap - w)  # [B, Hkv, cap - w] columns, ascending
        cols = torch.cat([top, torch.arange(n_pre, ncols, device=top.device).expand(b, hkv, w)], dim=2)
        k_keep = view.k.gather(2, cols.unsqueeze(-1).expand(-1, -1, -1, view.k.shape[-1]))
        v_keep = view.v.gather(2, cols.unsqueeze(-1).expand(-1, -1, -1, view.v.shape[-1]))
        # Re-allocate at the budget (plus the decode tokens to come when max_seq_len says how many): the prompt-sized
        # buffers go, and the device tier reports what is kept.
        self.alloc(site, cap + max(0, site.capacity - (view.start + sq)))
        t = site.tier
        t["k"].append(k_keep)
        t["v"].append(v_keep)
        t["pos"].append(cols + view.lo)

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, 1, D]; attended store positions [lo, hi); bias [.., 1, hi - lo] or None
        t = site.tier
        return kept_attention(q, t["k"].view(), t["v"].view(), t["pos"].view(), bias, lo, hi, scale)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        # the kept rows at the capacity the cache can reach, written by the device position (policies/kept_static.py)
        if site.static is None:
            site.static = snapkv_state(self, site, bias.shape[-1])
        elif not site.static.fits(site):
            site.static = grown(site, site.static)
        return site.static.step(q, k_new, v_new, pos, bias, scale)

    def describe(self):
        return {"policy": self.name, "budget": self.budget, "window": self.window, "kernel": self.kernel,
                "pooling": self.pooling, "static": self.static}

