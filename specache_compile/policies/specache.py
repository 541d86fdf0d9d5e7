"""SpeCache: the full KV in host memory, a low-bit copy on the device scores which tokens matter, the top-k come back.

Paper: Jie, Tang, Han, Deng, Han, "SpeCache: Speculative Key-Value Caching for Efficient Generation of LLMs",
ICML 2025, arXiv 2503.16163 (digest: ../shared/research/papers.md §1).

Decode step t of one layer, for query q_t (Algorithm 3, without the speculative row, which the stream manager adds):

    s_j   = scale · q_t · K'_j                       for every cached position j (K' = KIVI low-bit keys)
    p     = softmax(s + mask)                         per query head; GQA: p averaged over the heads of a KV group
    κ_t   = ArgTopK_j(p_j, k)                         per KV head, over positions outside sinks ∪ window
    K̃    = K' with rows κ_t replaced by the full-precision K_κ fetched from the host (same for V)
    o_t   = softmax(scale · q_t · [K̃; K_win]ᵀ + mask) · [Ṽ; V_win]

Device state per layer: the KIVI copy (keys per channel over groups of ``group_size`` tokens, values per token over
groups of ``group_size`` channels), the full-precision recent window (the tokens not yet forming a whole group past
``window``, so between ``window`` and ``window + group_size - 1`` of them: a partial group is never quantized and
appending a token never re-quantizes the past, as KIVI's residual), the sinks, and one fetch buffer of ``topk`` rows.

Choices the paper leaves open, made here: the top-k candidates exclude sinks and the window (they are already in full
precision); the softmax that ranks candidates runs over all attended columns, window included, so the averaged
probabilities of a GQA group are comparable across heads (the port averages probabilities too).
``lowbit_remainder=False`` drops the non-fetched tokens instead of attending to their low-bit copy.

Composition with KVComp (Jiang et al. 2025), ``policy_options={"host_codec": "kvcomp", "host_rel": 0.02}``: the host
copy is stored KVComp-coded (runtime/host_codec.py): smaller host memory, fetched rows within rel/2 of each row's range.

Composition with CAKE (Qin et al., ICLR 2025; policies/cake.py), ``policy_options={"layer_budgets": "cake"}``: the
per-layer top-k is not ``topk`` everywhere but CAKE's allocation of the same total ``topk x L`` in proportion to each
layer's preference P_l = H_l^(1/tau1) V_l^(1/tau2), computed at prefill from the attention of the last
``cake_window`` queries (entropy H: spatial dispersion; variance V: temporal shift). A layer whose attention is
spread out gets more full-precision rows, a layer with one sharp peak fewer. Nothing is evicted: the low-bit copy
still covers every token.
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..runtime.buffers import Growable
from ..runtime.streams import Prefetch, overlap_count
from .base import Policy, register_policy


@register_policy
class SpeCachePolicy(Policy):
    name = "specache"
    speculative = True

    def __init__(self, config):
        super().__init__(config)
        self.bits = config.bits
        self.group = config.group_size
        self.topk = config.topk
        self.window = config.window
        self.sinks = config.sinks
        self.lowbit_remainder = config.lowbit_remainder
        opts = dict(config.policy_options)
        self.hit_every = opts.pop("hit_every", 8)
        if isinstance(self.hit_every, bool) or not isinstance(self.hit_every, int) or self.hit_every < 0:
            raise ValueError(f"specache policy: policy_options['hit_every'] expected an int >= 0 (0: never sample "
                             f"prefetch hits), got {self.hit_every!r}")
        # Composition with CAKE: per-layer top-k from CAKE's layer preferences (see the module docstring)
        self.layer_budgets = opts.pop("layer_budgets", None)
        if self.layer_budgets not in (None, "cake"):
            raise ValueError(f"specache policy: policy_options['layer_budgets'] expected None or 'cake', got "
                             f"{self.layer_budgets!r}; fix: layer_budgets='cake' or leave it out")
        # What a speculative step does with the real query's top-k rows the prefetch missed: "lowbit" (the paper:
        # they attend through the low-bit copy) or "fetch" (fetched on demand, on the critical path)
        self.miss_rule = opts.pop("miss_rule", "lowbit")
        if self.miss_rule not in ("lowbit", "fetch"):
            raise ValueError(f"specache policy: policy_options['miss_rule'] expected 'lowbit' or 'fetch', got "
                             f"{self.miss_rule!r}")
        # What a plain one-token static step (model.generate) attends with: "demand" ranks with its query, fetches
        # that top-k on the main stream and attends (two passes over the low-bit copy); "previous" attends with the
        # rows the previous step's query chose, prefetched on the side stream during that step (FreeKV's
        # previous-query prediction; misses attend through the low-bit copy), and ranks for the next step in the
        # same pass
        self.prefetch = opts.pop("prefetch", "demand")
        if self.prefetch not in ("demand", "previous"):
            raise ValueError(f"specache policy: policy_options['prefetch'] expected 'demand' or 'previous', got "
                             f"{self.prefetch!r}; fix: prefetch='demand' (the default) or 'previous'")
        # Composition with KVComp: the host copy stored with KVComp's codec (runtime/host_codec.py)
        self.host_codec = opts.pop("host_codec", None)
        self.host_rel = opts.pop("host_rel", 0.02)
        if self.host_codec not in (None, "kvcomp"):
            raise ValueError(f"specache policy: policy_options['host_codec'] expected None or 'kvcomp', got "
                             f"{self.host_codec!r}; fix: host_codec='kvcomp' or leave it out")
        if self.host_codec is not None:
            self.new_host_codec()  # validates host_rel now, not at the first prefill
        # the static decode path (policies/specache_static.py): fixed-capacity state, lengths on the device. "auto"
        # (the default): wherever the model's cache is written by position (a StaticCache, model.generate's default
        # cache for this policy) and the options allow it; a DynamicCache decodes through the default path. True:
        # required (a DynamicCache decode is refused, specache.generate makes a StaticCache); False: never.
        from . import specache_static

        specache_static.parse_static(self, opts.pop("static", "auto"))
        cake_keys = ("cake_window", "tau1", "tau2")
        self.cake = {"cake_window": 32, "tau1": 1.0, "tau2": 1.0}
        for key in cake_keys:
            if key in opts:
                value = opts.pop(key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"specache policy: policy_options[{key!r}] expected a number > 0, got {value!r}")
                self.cake[key] = value
        if opts:
            known = ["hit_every", "miss_rule", "prefetch", "layer_budgets", "host_codec", "host_rel", "static",
                     *cake_keys]
            raise ValueError(f"specache policy: unknown policy_options {sorted(opts)}; expected some of {known}")
        self._prefs: dict[str, float] = {}  # site -> CAKE preference of its last prefill
        self._topk: dict[str, int] | None = None  # site -> top-k, allocated at the first decode step
        self._cands: dict[str, int] = {}  # site -> candidate tokens after its prefill (the cap of its top-k)

    def new_host_codec(self, host="cpu", pin: bool = False, capacity: int = 0):
        from ..runtime.host_codec import KVCompHostStore

        return KVCompHostStore(rel=self.host_rel, host=host, pin=pin, capacity=capacity)

    # -- per-layer top-k (composition with CAKE) ------------------------------------------------------------------
    def prefill(self, site, view):
        if getattr(self, "layer_budgets", None) != "cake":  # (subclasses such as quant skip SpeCache's __init__)
            return
        from . import cake

        w = int(self.cake["cake_window"])
        probs = cake.window_attention(view.q, view.k, view.scale, view.bias(w), w)
        # NOTE: one host sync per layer per prefill (the preference is a scalar the allocation needs on the host)
        self._prefs[site.name] = float(cake.layer_preference(probs, self.cake["tau1"], self.cake["tau2"]))
        self._cands[site.name] = max(0, view.hi - self.window - self.sinks)
        self._topk = None  # re-allocated at the next decode step, once every layer has its preference

    def fit_slots(self, site, n_cand: int) -> None:
        """Grow the fetch slots (doubling, up to this site's top-k) when ``n_cand`` rows outgrow them: the one place
        slots grow, for a sequence longer than first thought and for a CAKE budget above Config.topk alike."""
        need = min(self.topk_of(site), n_cand)
        rows = site.tier["prefetch"].rows
        if rows < need:
            site.tier["prefetch"].cancel()
            _new_prefetch(site, min(self.topk_of(site), max(need, 2 * rows)))

    def topk_of(self, site) -> int:
        """This site's top-k: Config.topk, or with layer_budgets='cake' its share of topk x layers, in proportion to
        CAKE's preference P_l = H_l^(1/tau1) V_l^(1/tau2) (CAKE Eq. budget, capped at the layer's candidates)."""
        if getattr(self, "layer_budgets", None) != "cake":
            return self.topk
        if self._topk is None:
            from . import cake

            names = list(self._prefs)
            caps = [max(1, self._cands.get(n, 1 << 30)) for n in names]
            budgets = cake.allocate_budgets([self._prefs[n] for n in names], self.topk * len(names), caps)
            self._topk = dict(zip(names, budgets))
        return max(1, self._topk.get(site.name, self.topk))

    # -- state ----------------------------------------------------------------------------------------------------
    def reset(self, site):
        site.clear_state()
        dev = site.device
        b, h, d, dv = site.batch, site.heads, site.head_dim, site.v_head_dim
        vgroup = min(self.group, dv)
        t = site.tier
        t["nq"] = 0
        t["kq"] = Growable((b, h), (d * self.bits // 8,), torch.uint8, dev)
        t["ks"] = Growable((b, h), (d,), site.dtype, dev)
        t["kz"] = Growable((b, h), (d,), site.dtype, dev)
        t["vq"] = Growable((b, h), (dv * self.bits // 8,), torch.uint8, dev)
        t["vs"] = Growable((b, h), (dv // vgroup,), site.dtype, dev)
        t["vz"] = Growable((b, h), (dv // vgroup,), site.dtype, dev)
        t["win_k"] = Growable((b, h), (d,), site.dtype, dev, capacity=self.window + self.group)
        t["win_v"] = Growable((b, h), (dv,), site.dtype, dev, capacity=self.window + self.group)
        t["sink_k"] = Growable((b, h), (d,), site.dtype, dev)
        t["sink_v"] = Growable((b, h), (dv,), site.dtype, dev)
        # Fetched rows land in two slots of topk rows per KV head (never more than the sequence can hold: a top-k
        # of 10**6 meant "fetch everything"), allocated once per sequence when its capacity is known, else grown
        # with the candidates (fit_slots): the stream manager fills one (next step's prefetch) while attention reads
        # the other. On-demand fetches use the free one.
        _new_prefetch(site, max(1, min(self.topk, site.capacity or _FIRST_SLOT_ROWS)))
        t["hits"] = torch.zeros((), dtype=torch.int64, device=dev)  # sampled prefetch hits (device counters)
        t["hit_total"] = torch.zeros((), dtype=torch.int64, device=dev)
        t["spec_steps"] = 0
        if site.capacity:  # max_seq_len or specache.generate's hint: allocate once, no growth while decoding
            for name in ("kq", "vq", "vs", "vz"):
                t[name].reserve(site.capacity)
            for name in ("ks", "kz"):
                t[name].reserve(-(-site.capacity // self.group))

    def append(self, site, k, v, start):
        # k, v: [B, Hkv, Sn, D] on the device, positions [start, start + Sn).
        t = site.tier
        if start < self.sinks:
            n = min(self.sinks - start, k.shape[2])
            t["sink_k"].append(k[:, :, :n])
            t["sink_v"].append(v[:, :, :n])
        end = start + k.shape[2]
        # Quantize whole groups that have left the window; the rest (< window + group tokens) stays in full
        # precision. Quantized straight from [window; new] so the window buffer never grows to a prefill's size.
        target = max(t["nq"], (end - self.window) // self.group * self.group)
        n_new = target - t["nq"]
        if n_new > 0:
            k_all = torch.cat([t["win_k"].view(), k], dim=2)
            v_all = torch.cat([t["win_v"].view(), v], dim=2)
            kq, ks, kz = ops.quantize_keys(k_all[:, :, :n_new], self.bits, self.group)
            vq, vs, vz = ops.quantize_values(v_all[:, :, :n_new], self.bits, self.group)
            for name, x in (("kq", kq), ("ks", ks), ("kz", kz), ("vq", vq), ("vs", vs), ("vz", vz)):
                t[name].append(x)
            t["win_k"].clear()
            t["win_v"].clear()
            t["win_k"].append(k_all[:, :, n_new:])
            t["win_v"].append(v_all[:, :, n_new:])
            t["nq"] = target
        else:
            t["win_k"].append(k)
            t["win_v"].append(v)

    # -- decode ---------------------------------------------------------------------------------------------------
    def _dequant_range(self, site, lo, hi, dtype):
        """Low-bit K, V of positions [lo, hi) (hi <= nq) dequantized: [B, Hkv, hi-lo, D]."""
        t, g = site.tier, self.group
        g0, g1 = lo // g, -(-hi // g)
        k = ops.dequantize_keys(
            t["kq"].view(g0 * g, g1 * g), t["ks"].view(g0, g1), t["kz"].view(g0, g1), self.bits, g, dtype
        )
        v = ops.dequantize_values(
            t["vq"].view(g0 * g, g1 * g), t["vs"].view(g0 * g, g1 * g), t["vz"].view(g0 * g, g1 * g),
            self.bits, g, dtype,
        )
        off = g0 * g
        return k[:, :, lo - off : hi - off], v[:, :, lo - off : hi - off]

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, Sq, D]; attended store positions [lo, hi); bias [.., Sq, hi - lo] or None.
        if not self.lowbit_remainder:
            return self._decode_dropping(site, q, bias, lo, hi, scale)
        t = site.tier
        nq = t["nq"]
        b, hq, sq = q.shape[:3]
        hkv = site.heads
        qhi = max(lo, min(hi, nq))  # columns [lo, qhi) are low-bit on the device, [qhi, hi) in the window
        k_win = t["win_k"].view(qhi - nq, hi - nq)
        v_win = t["win_v"].view(qhi - nq, hi - nq)
        if qhi == lo:  # everything attended is in full precision on the device already
            return ops.sparse_attention(q, k_win, v_win, bias, scale)
        low = [t[n].view() for n in ("kq", "ks", "kz", "vq", "vs", "vz")]
        c_lo = max(lo, min(self.sinks, qhi))  # top-k candidates: [c_lo, qhi), outside sinks and window
        n_cand = qhi - c_lo
        self.fit_slots(site, n_cand)
        topk = self.topk_of(site)
        if n_cand <= topk:
            # topk covers every candidate: fetch them all, the attention is exact.
            idx = torch.arange(c_lo, qhi, device=q.device).expand(b, hkv, n_cand)
        else:
            # Rank candidates: scores straight from the packed keys, softmax over every attended column.
            low_logits = ops.lowbit_scores(q, low[0], low[1], low[2], self.bits, self.group, scale)[..., lo:qhi]
            logits = torch.cat([low_logits, ops.attention_logits(q, k_win, scale)], dim=-1)  # [B, Hq, Sq, hi-lo]
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1)[..., c_lo - lo : qhi - lo]  # [B, Hq, Sq, n_cand]
            # GQA: mean over the query heads of a group (and over the query rows of a step)
            probs = probs.reshape(b, hkv, (hq // hkv) * sq, n_cand).mean(dim=2)
            idx = ops.topk_positions(probs, topk) + c_lo  # [B, Hkv, k] absolute positions, ascending
            self._sample_previous(site, idx)
        with site.streams.span("demand", site.device, nbytes=_row_bytes(site, idx)):
            k_f, v_f = site.fetch(idx, *t["prefetch"].free_slot())
        # Full-precision columns in ascending position order: sinks < fetched (>= c_lo) < window (>= nq).
        dev = q.device
        pos = [torch.arange(lo, c_lo, device=dev).expand(b, hkv, c_lo - lo), idx,
               torch.arange(qhi, hi, device=dev).expand(b, hkv, hi - qhi)]
        sinks = c_lo > lo  # attended sinks exist only when the range starts inside them (not past a sliding window)
        k_fp = torch.cat([t["sink_k"].view(lo, c_lo), k_f, k_win] if sinks else [k_f, k_win], dim=2)
        v_fp = torch.cat([t["sink_v"].view(lo, c_lo), v_f, v_win] if sinks else [v_f, v_win], dim=2)
        fp_pos = torch.cat(pos, dim=2)
        if bias is None and hi < nq:  # the op attends [lo, nq) of the low-bit copy unless a bias bounds it
            bias = torch.zeros((1, 1, sq, hi - lo), dtype=torch.float32, device=dev)
        return ops.lowbit_decode_attention(q, *low, self.bits, self.group, lo, k_fp, v_fp, fp_pos, bias, scale)

    def _sample_previous(self, site, idx):
        """Every hit_every one-token steps, how much of this step's top-k the previous step's held: the hit rate a
        previous-query prefetch (the last step's rows kept for the next, as FreeKV predicts) would have, measured
        where ``model.generate`` feeds one token a step and the speculative token is not available. Device
        counters, no sync."""
        if not self.hit_every:
            return
        t = site.tier
        last = t.get("prev_idx")
        t["prev_idx"] = idx
        t["one_token_steps"] = t.get("one_token_steps", 0) + 1
        if last is None or last.shape != idx.shape or t["one_token_steps"] % self.hit_every:
            return
        t["prev_hits"] = t.get("prev_hits", 0) + overlap_count(idx, last)
        t["prev_total"] = t.get("prev_total", 0) + idx.numel()

    # -- speculative decode (Algorithms 2 and 3) -------------------------------------------------------------------
    def _rank(self, site, low_logits, q_rows, k_cols, bias_rows, lo, c_lo, qhi, scale):
        """Top-k candidate positions [B, Hkv, k] from the query rows q_rows [B, Hq, r, D]: softmax of the low-bit
        scores (low_logits [B, Hq, r, qhi-lo]) and the full-precision columns k_cols, GQA mean, top-k over
        [c_lo, qhi)."""
        b, hq, r = q_rows.shape[:3]
        hkv = site.heads
        n_cand = qhi - c_lo
        self.fit_slots(site, n_cand)
        logits = torch.cat([low_logits, ops.attention_logits(q_rows, k_cols, scale)], dim=-1)
        if bias_rows is not None:
            logits = logits + bias_rows
        probs = torch.softmax(logits, dim=-1)[..., c_lo - lo : qhi - lo]
        probs = probs.reshape(b, hkv, (hq // hkv) * r, n_cand).mean(dim=2)
        # torch.topk straight: ops.topk_positions' unique-key tie rule costs ~15 more launches per layer per step,
        # and which of two equally probable rows is fetched does not change the attention (fp_pos takes any order)
        return torch.topk(probs, self.topk_of(site), dim=-1, sorted=False).indices + c_lo

    def decode_speculative(self, site, q, k_spec, v_spec, bias, lo, hi, scale):
        # q: [B, Hq, R, D], R-1 real rows then the speculative row; k_spec, v_spec: [B, Hkv, 1, D] at position hi.
        # bias: [.., R, hi - lo + 1] or None. The fetched rows were chosen by the previous step's speculative row.
        t = site.tier
        pf: Prefetch = t["prefetch"]
        nq = t["nq"]
        b, hq, r = q.shape[:3]
        hkv, dev = site.heads, q.device
        width = hi - lo + 1
        if bias is None:  # real rows never see the speculative column (a model without a causal mask)
            bias = torch.zeros((1, 1, r, width), dtype=torch.float32, device=dev)
            bias[:, :, : r - 1, -1] = float("-inf")
        qhi = max(lo, min(hi, nq))  # [lo, qhi) low-bit; [qhi, hi) window; hi the speculative token
        k_cols = torch.cat([t["win_k"].view(qhi - nq, hi - nq), k_spec], dim=2)
        v_cols = torch.cat([t["win_v"].view(qhi - nq, hi - nq), v_spec], dim=2)
        got = pf.take()  # what the previous step's speculative row prefetched (waits for its event, no host sync)
        if qhi == lo:  # everything attended is in full precision on the device
            return ops.sparse_attention(q, k_cols, v_cols, bias, scale)
        low = [t[n].view() for n in ("kq", "ks", "kz", "vq", "vs", "vz")]
        c_lo = max(lo, min(self.sinks, qhi))
        n_cand = qhi - c_lo
        self.fit_slots(site, n_cand)
        sinks = c_lo > lo
        if n_cand <= self.topk_of(site):
            # every candidate fits: fetch them all now (exact attention); nothing to predict
            idx = torch.arange(c_lo, qhi, device=dev).expand(b, hkv, n_cand)
            with site.streams.span("demand", site.device, nbytes=_row_bytes(site, idx)):
                k_f, v_f = site.fetch(idx, *pf.free_slot())
        else:
            low_logits = ops.lowbit_scores(q, low[0], low[1], low[2], self.bits, self.group, scale)[..., lo:qhi]
            # next step's top-k from the speculative row, fetched on the side stream while this step goes on
            nxt = self._rank(site, low_logits[:, :, -1:], q[:, :, -1:], k_cols, bias[..., -1:, :], lo, c_lo, qhi,
                             scale)
            if got is None:  # first step after a prefill (pre-decoding): no prefetched rows, the low-bit copy only
                idx = torch.full((b, hkv, 0), -1, dtype=torch.long, device=dev)
                k_f = q.new_empty((b, hkv, 0, q.shape[-1]))
                v_f = q.new_empty((b, hkv, 0, v_cols.shape[-1]))
            else:
                idx, k_f, v_f = got
                t["spec_steps"] += 1
            sample = got is not None and self.hit_every and t["spec_steps"] % self.hit_every == 0
            if r > 1 and (sample or self.miss_rule == "fetch"):
                # the real row's own top-k: to count how much of it the prefetch held, and (miss_rule="fetch") to
                # bring the rows it missed now, on demand
                real = self._rank(site, low_logits[:, :, :1], q[:, :, :1], k_cols, bias[..., :1, :], lo, c_lo,
                                  qhi, scale)
                if sample:
                    t["hits"] += overlap_count(real, idx)
                    t["hit_total"] += real.numel()
                if self.miss_rule == "fetch":
                    miss = torch.where((real.unsqueeze(-1) == idx.unsqueeze(-2)).any(-1), -1, real)  # -1: held
                    if "miss_k" not in t:  # allocated once per sequence, on the first speculative step
                        t["miss_k"] = torch.empty_like(pf.slots_k[0])
                        t["miss_v"] = torch.empty_like(pf.slots_v[0])
                    with site.streams.span("demand", site.device, nbytes=_row_bytes(site, miss)):
                        k_m, v_m = site.fetch(miss.clamp(min=c_lo), t["miss_k"], t["miss_v"])
                    # fp_pos -1 is ignored by the attention: held rows are not attended twice
                    idx, k_f, v_f = torch.cat([idx, miss], 2), torch.cat([k_f, k_m], 2), torch.cat([v_f, v_m], 2)
            pf.issue(site, nxt)
        pos = [torch.arange(lo, c_lo, device=dev).expand(b, hkv, c_lo - lo), idx,
               torch.arange(qhi, hi + 1, device=dev).expand(b, hkv, hi + 1 - qhi)]
        k_fp = torch.cat([t["sink_k"].view(lo, c_lo), k_f, k_cols] if sinks else [k_f, k_cols], dim=2)
        v_fp = torch.cat([t["sink_v"].view(lo, c_lo), v_f, v_cols] if sinks else [v_f, v_cols], dim=2)
        return ops.lowbit_decode_attention(q, *low, self.bits, self.group, lo, k_fp, v_fp, torch.cat(pos, dim=2),
                                           bias, scale)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        """The static decode path (policies/specache_static.py): the runtime calls it for every decode step of an
        index-mode cache when policy_options['static'] is set."""
        from . import specache_static

        if site.static is None:
            site.static = specache_static.StaticState(self, site, bias.shape[-1])
        return specache_static.decode(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating)

    def site_report(self, site):
        t = site.tier
        pf = t.get("prefetch")
        if pf is None:
            return {}
        extra = {"topk": self.topk_of(site)} if self.layer_budgets == "cake" and site.name in self._prefs else {}
        total = int(t["hit_total"])  # reporting only: syncs
        prev = int(t.get("prev_total", 0))
        return {"prefetch_issued": pf.stats.issued, "prefetch_consumed": pf.stats.consumed,
                "prefetch_dropped": pf.stats.dropped, "prefetch_hits": int(t["hits"]), "prefetch_sampled": total,
                "prefetch_hit_rate": (int(t["hits"]) / total) if total else None,
                "previous_query_hit_rate": int(t["prev_hits"]) / prev if prev else None, **extra}

    def _decode_dropping(self, site, q, bias, lo, hi, scale):
        """lowbit_remainder=False: attention over sinks ∪ top-k ∪ window only (the low-bit copy only ranks)."""
        # q: [B, Hq, 1, D]; attended store positions [lo, hi); bias [.., 1, hi - lo] or None.
        t = site.tier
        nq = t["nq"]
        b, hq = q.shape[:2]
        hkv = site.heads
        qhi = max(lo, min(hi, nq))  # columns [lo, qhi) are low-bit on the device, [qhi, hi) in the window
        k_win = t["win_k"].view(qhi - nq, hi - nq)
        v_win = t["win_v"].view(qhi - nq, hi - nq)
        if qhi == lo:  # everything attended is in full precision on the device already
            return ops.sparse_attention(q, k_win, v_win, bias, scale)

        k_low, v_low = self._dequant_range(site, lo, qhi, q.dtype)
        # Rank candidates [c_lo, qhi): low-bit scores, softmax over every attended column.
        c_lo = max(lo, min(self.sinks, qhi))
        n_cand = qhi - c_lo
        self.fit_slots(site, n_cand)
        topk = self.topk_of(site)
        k_cols = torch.cat([k_low, k_win], dim=2)
        v_cols = torch.cat([v_low, v_win], dim=2)
        if n_cand <= topk:
            # topk covers every candidate: fetch them all, the attention is exact.
            idx = torch.arange(c_lo, qhi, device=q.device).expand(b, hkv, n_cand)
        else:
            logits = ops.attention_logits(q, k_cols, scale)  # [B, Hq, 1, ncols] fp32
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1)[..., c_lo - lo : n_cand + c_lo - lo]  # [B, Hq, 1, n_cand]
            probs = probs.reshape(b, hkv, hq // hkv, n_cand).mean(dim=2)  # GQA: mean over the group
            idx = ops.topk_positions(probs, topk) + c_lo  # [B, Hkv, k] absolute positions
        with site.streams.span("demand", site.device, nbytes=_row_bytes(site, idx)):
            k_f, v_f = site.fetch(idx, *t["prefetch"].free_slot())
        rel = (idx - lo).unsqueeze(-1)
        k_cols[:, :, : qhi - lo].scatter_(2, rel.expand(-1, -1, -1, k_cols.shape[-1]), k_f)
        v_cols[:, :, : qhi - lo].scatter_(2, rel.expand(-1, -1, -1, v_cols.shape[-1]), v_f)
        if c_lo > lo:  # sinks, full precision from the device
            k_cols[:, :, : c_lo - lo] = t["sink_k"].view(lo, c_lo)
            v_cols[:, :, : c_lo - lo] = t["sink_v"].view(lo, c_lo)
        if n_cand > topk:
            keep = torch.zeros(b, hkv, hi - lo, dtype=torch.bool, device=q.device)
            keep[:, :, : c_lo - lo] = True
            keep[:, :, qhi - lo :] = True
            keep.scatter_(2, idx - lo, True)
            drop = torch.zeros(keep.shape, dtype=torch.float32, device=q.device).masked_fill_(~keep, float("-inf"))
            drop = drop.repeat_interleave(hq // hkv, dim=1).unsqueeze(2)  # [B, Hq, 1, ncols]
            bias = drop if bias is None else bias + drop
        return ops.sparse_attention(q, k_cols, v_cols, bias, scale)


def _row_bytes(site, idx) -> int:
    """Bytes of the K and V rows idx [B, Hkv, K] (shape arithmetic, no sync)."""
    return idx.numel() * (site.head_dim + site.v_head_dim) * site.dtype.itemsize


_FIRST_SLOT_ROWS = 1024  # fetch slot rows before the sequence's length is known (a prompt of that many fits at once)


def _new_prefetch(site, rows: int) -> Prefetch:
    """The site's two fetch slots of ``rows`` rows per KV head (runtime/streams.py), kept in the device tier."""
    pf = Prefetch.allocate(site.streams, site.batch, site.heads, rows, site.head_dim, site.v_head_dim, site.dtype,
                           site.device)
    site.tier["prefetch"] = pf
    site.tier["fetch_k"], site.tier["fetch_v"] = pf.slots_k, pf.slots_v  # counted in the device tier
    return pf
