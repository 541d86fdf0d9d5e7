"""KCache: keys stay on the device in full precision, values live in host memory; each step fetches the top-N values.

Paper: He, Wu, "Efficient LLM Inference with Kcache", arXiv 2404.18057, 2024 (no code; the full text was not
available here, so this follows the abstract and its TL;DR: "keeping K states in high-bandwidth memory and moving V
states to CPU RAM, retrieving V vectors on-demand via a TopN-filtered attention mechanism"; digest:
../shared/research/papers.md §2). Decode step t, for query q_t over store positions [lo, hi):

    p      = softmax(scale · q_t · K_[lo, hi)ᵀ + mask)       exact: every key is on the device
    κ_t    = TopN_j(p̄_j)                                      p̄: p averaged over the query heads of a KV group
    o_t    = Σ_{j ∈ κ_t} p_j V_j / Σ_{j ∈ κ_t} p_j             V_κ fetched from the host, N rows per KV head

Choices the paper (as far as it could be read) leaves open, made here:

- N is ``Config.topk`` (one knob for "rows fetched per KV head per layer per step", as SpeCache's; the STYLE
  example ``specache.compile(model, policy="kcache", topk=1024)``). Its default, 64, is SpeCache §4.1's, so the two
  policies move the same bytes per step; the paper's N values are unconfirmed. ``policy_options["topn"]`` is refused.
- GQA: the top-N is chosen once per KV head by the group's mean probability, so each V row is fetched once; every
  query head then weights the fetched rows by its own probabilities.
- Renormalised (``policy_options["renormalize"]``, default True): the output is the exact softmax restricted to the
  top-N, a convex combination of values. Without it the output shrinks by the missing mass 1 - Σ_κ p, a bias toward
  zero in every dense head; with it the error is (1 - Σ_κ p)·(mean of V over κ - mean over the rest), which cancels
  the component all values share. Both are exact once N covers the attended range.
- No value stays on the device (no recent window): the paper moves every V row to the host, and the device tier is
  then K plus the N-row fetch buffer, ≈ half the full cache.
- Prefill is exact (the runtime's); sliding-window layers and padding come in through [lo, hi) and the bias.
- ``policy_options["static"]`` ("auto" by default, True, False): a StaticCache (what ``model.generate`` after
  ``specache.compile`` decodes into) is decoded through fixed-shape state, positions on the device
  (policies/kcache_static.py), so its one-token steps replay as CUDA graphs (decode_graphs.py). The same attention
  as below: K at the cache's capacity, the top-N over every written column.

Device state (``site.tier``): K ``[B, Hkv, S, D]`` (appended every step) and the fetch buffer ``[B, Hkv, N, Dv]``;
on the static path, ``site.static`` instead (the same two at the cache's capacity, and a token counter).
Decode has no host sync on CUDA (the top-N stays on the device; the gather reads pinned host memory).
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..runtime.buffers import Growable
from ..runtime.state import parse_static
from .base import Policy, register_policy
from .cake import _safe_softmax
from .kcache_static import KCacheState, renormalized


@register_policy
class KCachePolicy(Policy):
    name = "kcache"
    uses_store = True

    def __init__(self, config, renormalize: bool = True):
        super().__init__(config)
        self.topn = config.topk
        self.renormalize = renormalize

    @classmethod
    def from_config(cls, config):
        opts = dict(config.policy_options)
        if "topn" in opts:
            raise ValueError(f"kcache policy: policy_options['topn'] expected absent (N is Config.topk), got "
                             f"{opts['topn']!r}; fix: specache.compile(model, policy='kcache', topk={opts['topn']!r})")
        if config.topk < 1:
            raise ValueError(f"kcache policy: Config.topk (N, value rows fetched per KV head per step) expected an "
                             f"int >= 1, got {config.topk}; fix: pass topk=64 or more")
        renormalize = opts.pop("renormalize", True)
        if not isinstance(renormalize, bool):
            raise ValueError(f"kcache policy: policy_options['renormalize'] expected True or False, got "
                             f"{renormalize!r}; fix: pass renormalize=True (the default) or False")
        static = opts.pop("static", "auto")
        if opts:
            raise ValueError(f"kcache policy: unknown policy_options {sorted(opts)}; expected some of "
                             "['renormalize', 'static']; fix: remove them (N is Config.topk)")
        policy = cls(config, renormalize=renormalize)
        parse_static(policy, static, [])  # every option of this policy has a static path
        return policy

    def reset(self, site):
        site.clear_state()
        t, b, h, dev = site.tier, site.batch, site.heads, site.device
        t["k"] = Growable((b, h), (site.head_dim,), site.dtype, dev, capacity=site.capacity)
        t["fetch_v"] = torch.empty((b, h, self.topn, site.v_head_dim), dtype=site.dtype, device=dev)

    def append(self, site, k, v, start):
        # k: [B, Hkv, Sn, D] on the device at positions [start, start + Sn); v went to the host store (runtime)
        site.tier["k"].write(start, k)

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, Sq, D]; attended store positions [lo, hi); bias [.., Sq, hi - lo] or None
        t = site.tier
        b, hq, sq = q.shape[:3]
        hkv, n = site.heads, hi - lo
        rep = hq // hkv
        logits = ops.attention_logits(q, t["k"].view(lo, hi), scale)  # [B, Hq, Sq, n] fp32
        if bias is not None:
            logits = logits + bias
        p = _safe_softmax(logits)
        if n <= self.topn:  # N covers the range: every value comes back, the attention is exact
            rel = torch.arange(n, device=q.device).expand(b, hkv, n)
        else:
            rel = ops.topk_positions(p.reshape(b, hkv, rep * sq, n).mean(dim=2), self.topn)  # [B, Hkv, N]
        _, v = site.fetch(rel + lo, None, t["fetch_v"], keys=False)  # [B, Hkv, N', Dv] on the device
        w = p.gather(3, rel.repeat_interleave(rep, dim=1).unsqueeze(2).expand(b, hq, sq, rel.shape[-1]))
        if self.renormalize:
            w = renormalized(w)
        out = w.reshape(b, hkv, rep * sq, -1) @ v.float()  # [B, Hkv, rep*Sq, Dv]
        return out.reshape(b, hq, sq, v.shape[-1]).to(q.dtype)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        # K at the cache's capacity, V fetched by device index (policies/kcache_static.py); built at the first step
        if site.static is None:
            site.static = KCacheState(self, site, bias.shape[-1])
        return site.static.step(site, q, k_new, v_new, pos, bias, scale)

    def describe(self):
        return {"policy": self.name, "topn": self.topn, "renormalize": self.renormalize, "static": self.static}
