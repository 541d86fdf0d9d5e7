"""KIVI-style low-bit KV cache on the device, nothing offloaded: SpeCache's low-bit copy alone, with no fetch.

Paper: Liu, Yuan, Jin, Zhong, Xu, Braverman, Chen, Hu, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", ICML 2024, arXiv 2402.02750 (digest: ../shared/research/papers.md §1, the quantizer SpeCache builds on).
Keys are quantized per channel (a group = ``group_size`` consecutive tokens of one channel: key outliers sit in fixed
channels), values per token (a group = ``group_size`` consecutive channels of one token); the newest tokens stay in
full precision (the residual) until a whole group has left the window. Per group, b-bit (b in 2, 4):

    z = min,  s = (max - min) / (2^b - 1),  c = clamp(round((x - z) / s), 0, 2^b - 1),  x̂ = z + c · s
    |x - x̂| <= s / 2

Decode step t, for query q_t over positions [lo, hi), nq of them quantized:

    o_t = softmax(scale · q_t · [K̂_[lo, nq); K_sinks; K_win]ᵀ + mask) · [V̂_[lo, nq); V_sinks; V_win]

computed by ``ops.lowbit_decode_attention`` straight from the packed codes (Triton on CUDA), with the full-precision
sinks and window as the substituted columns and no fetched row.

Hyperparameters are Config fields: ``bits`` (2 or 4 for KIVI; 1 also runs, with SpeCache's quarter-point 1-bit
quantizer), ``group_size`` (default 64) and ``window`` (the residual, default 64): SpeCache §4.1's KIVI setting, so
``quant`` is SpeCache without the host copy at equal device bytes. ``sinks`` (default 0, KIVI keeps none) keeps the
first tokens in full precision as in SpeCache. ``policy_options={"static": "auto"}`` (the default; True requires it)
decodes index-mode caches through SpeCache's static path without the fetch (fixed-capacity state, CUDA graphs under
``model.generate``).

The state and its update are SpeCache's exactly (this class inherits ``append``): a partial group is never quantized
and appending a token never re-quantizes the past. ``uses_store = False``: the runtime writes nothing to the host.
"""

from __future__ import annotations

import torch

from ..kernels import ops
from .base import Policy, register_policy
from .specache import SpeCachePolicy

# SpeCache's per-sequence state that a policy without fetches does not need (its prefetch slots and hit counters)
_FETCH_STATE = ("prefetch", "fetch_k", "fetch_v", "hits", "hit_total", "spec_steps")


@register_policy
class QuantPolicy(SpeCachePolicy):
    name = "quant"
    uses_store = False
    speculative = False

    def __init__(self, config):
        Policy.__init__(self, config)  # not SpeCachePolicy's: it parses SpeCache's own policy_options
        self.bits = config.bits
        self.group = config.group_size
        self.window = config.window
        self.sinks = config.sinks
        self.topk = 0  # nothing is fetched (SpeCache's reset sizes its fetch slots by it; they are dropped below)
        # what SpeCache's static path reads of its options: every token outside the window attends through the copy
        self.lowbit_remainder, self.miss_rule, self.prefetch = True, "lowbit", "demand"
        opts = dict(config.policy_options)
        static = opts.pop("static", "auto")
        if opts:
            raise ValueError(f"quant policy: unknown policy_options {sorted(opts)}; expected at most 'static' "
                             "(bits, group_size, window and sinks are Config fields); fix: pass them as keywords, "
                             "e.g. specache.compile(model, policy='quant', bits=4, window=128)")
        # SpeCache's static path without the fetch (policies/specache_static.py): fixed-capacity copy and ring,
        # lengths on the device, so model.generate's steps replay as CUDA graphs. "auto" (the default) takes it where
        # the cache is written by position and the options allow it, True requires it, False never
        from . import specache_static

        specache_static.parse_static(self, static)

    def reset(self, site):
        super().reset(site)
        for name in _FETCH_STATE:  # allocated by SpeCache for its fetches: freed, so the device tier is KIVI's alone
            site.tier.pop(name, None)

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, Sq, D]; attended store positions [lo, hi); bias [.., Sq, hi - lo] or None.
        t = site.tier
        nq = t["nq"]
        b, sq = q.shape[0], q.shape[2]
        qhi = max(lo, min(hi, nq))  # columns [lo, qhi) are low-bit on the device, [qhi, hi) in the window
        k_win = t["win_k"].view(qhi - nq, hi - nq)
        v_win = t["win_v"].view(qhi - nq, hi - nq)
        if qhi == lo:  # everything attended is in full precision already
            return ops.sparse_attention(q, k_win, v_win, bias, scale)
        c_lo = max(lo, min(self.sinks, qhi))  # attended sinks: [lo, c_lo)
        dev, hkv = q.device, site.heads
        pos = torch.cat([torch.arange(lo, c_lo, device=dev), torch.arange(qhi, hi, device=dev)])
        fp_pos = pos.expand(b, hkv, -1).contiguous()  # [B, Hkv, F] absolute positions of the full-precision columns
        if c_lo > lo:  # the range starts inside the sinks (not past a sliding window)
            k_win = torch.cat([t["sink_k"].view(lo, c_lo), k_win], dim=2)
            v_win = torch.cat([t["sink_v"].view(lo, c_lo), v_win], dim=2)
        if bias is None and hi < nq:  # the op attends [lo, nq) of the low-bit copy unless a bias bounds it
            bias = torch.zeros((1, 1, sq, hi - lo), dtype=torch.float32, device=dev)
        low = [t[n].view() for n in ("kq", "ks", "kz", "vq", "vs", "vz")]
        return ops.lowbit_decode_attention(q, *low, self.bits, self.group, lo, k_win, v_win, fp_pos, bias, scale)

    def decode_speculative(self, site, q, k_spec, v_spec, bias, lo, hi, scale):
        return Policy.decode_speculative(self, site, q, k_spec, v_spec, bias, lo, hi, scale)

    def site_report(self, site):
        return {}

    def describe(self):
        return {"policy": self.name, "bits": self.bits, "group_size": self.group, "window": self.window,
                "sinks": self.sinks}
