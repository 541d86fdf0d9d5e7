"""SpeCache's decode step with fixed-capacity device state and every length on the device: the static decode path.

Selected with ``policy_options={"static": True}`` on a model that decodes with a StaticCache (index-mode writes at
``cache_position``). Why: the default path (policies/specache.py) sizes its tensors from host-side lengths (stored
tokens, window, low-bit copy) that change every step, so the kernels a step launches change with it and a CUDA graph
captured over one step cannot replay the next, and each step pays ~80 launches from Python per layer (issue notes,
bench/results/host_profile_*). Here every tensor a decode step touches has a shape fixed for the sequence (the
StaticCache's ``max_cache_len`` C) and every length is a device scalar, so consecutive steps launch the same kernels
with the same arguments (tests/runtime/test_static.py compares the ops two consecutive steps dispatch); only the
prefetch slot alternates, so two graphs (even and odd steps) cover a sequence; ``specache.generate(...,
cuda_graph=True)`` captures and replays them (generate.py ``_fixed_buffer_steps``).

Device state per site, built at the first static step from what the prefill left (``setup``):

- the KIVI copy at capacity: codes ``kq``, ``vq`` and value scales ``vs``, ``vz`` for ``Cq + G`` rows, key scales
  ``ks``, ``kz`` for ``Cq / G + 1`` groups (``Cq``: C rounded up to whole groups of G). The last group is scratch:
  the branch-free quantize step writes there when no group is due. Zero-initialised: a row never written dequantizes
  to 0, never NaN, so a masked column contributes exactly nothing;
- the window as a ring of ``R = window + G`` rows, token ``p`` at row ``p mod R`` (window must be a multiple of G,
  so a group never wraps around the ring);
- ``nq`` (tokens in the low-bit copy) and ``n`` (tokens stored): int64 device scalars;
- the positions each of the two prefetch slots holds, ``[2, B, Hkv, k]`` (-1: nothing).

A step (per layer): (1) the real token at position ``p`` (a device scalar, from the model's cache_position) goes to
ring row ``p mod R`` and to the host store at ``p`` (a GPU write into pinned memory, kernels/quant_ops.py
``scatter_rows_static``), ``n += 1``; (2) the ring's oldest group is quantized every step and written to the copy at
``nq`` if the ring is full, else to the scratch group (one launch per tensor with the rows on the device:
``quant_ops.quantize_group_static``); ``nq += G`` if it was full; (3) scores of the ranking row over
the whole copy (positions at or past ``nq`` masked), softmax together with the ring and the speculative column, GQA
mean, top-k over ``[0, nq)``; (4) attention of every row over the copy with the fetched rows, the ring rows and the
speculative column substituted in full precision (``lowbit_decode_attention``; ring rows holding nothing have
position -1). Speculative steps rank with the speculative row and prefetch on the side stream for the next step, as
the default path does; plain steps rank with the real row and fetch at once on the main stream. What every layer
of a step would compute alike (positions, masks, bias, the group's rows) the first layer computes (``StepShared``).

Where its Triton kernel runs (CUDA, the shapes of ``fused_ops.fused_decode_supported``), (3) and (4) are one op,
``fused_decode``: a speculative step reads the copy once for both (the attention substitutes the rows the previous
step fetched, the ranking is the next step's); a plain step ranks first (the op's ranking alone, the keys only) and
attends after the fetch. The speculative token's K/V go to an extra ring row (row ``R``), so the columns are views of
preallocated state (no concatenation a step). Elsewhere, the unfused ops above (``FUSED`` switches).

Not supported here (``ValueError`` when the policy is built): sinks, ``lowbit_remainder=False``,
``miss_rule="fetch"``, the KVComp host codec, and a window that is not a multiple of ``group_size``. Prefetch hits
are sampled only with ``hit_every=1`` (every step): sampling every n-th step needs a step counter on the host, and
sampling costs a second ranking per step, so the default (8) samples nothing here.
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.attn_ops import select_topk
from ..kernels.fused_ops import fused_decode_supported
from ..kernels.quant_ops import gather_rows_static, quantize_group_static, scatter_rows_static
from ..runtime import state
from ..runtime.streams import overlap_count

_NEG = float("-inf")
# Where the static path runs fused_decode: "auto" where its Triton kernel runs, "always" also where the op runs its
# reference (tests of the wiring on CPU), "never" the unfused ops everywhere.
FUSED = "auto"


def parse_static(policy, value) -> None:
    """``policy_options['static']`` of SpeCache or quant (runtime/state.py ``parse_static``, with this path's
    ``problems``)."""
    state.parse_static(policy, value, problems(policy))


def check_options(policy) -> None:
    """Raise ValueError if the SpeCache policy's options need what the static path does not do."""
    bad = problems(policy)
    if bad:
        raise ValueError(f"{policy.name} policy: policy_options['static']=True does not support " + ", ".join(bad)
                         + "; fix: drop those options or decode without static=True")


def problems(policy) -> list[str]:
    """What in the SpeCache policy's options the static path does not do (empty: it can decode this policy)."""
    bad = []
    if policy.sinks:
        bad.append(f"sinks={policy.sinks} (expected 0)")
    if not policy.lowbit_remainder:
        bad.append("lowbit_remainder=False")
    if policy.miss_rule != "lowbit":
        bad.append(f"miss_rule={policy.miss_rule!r}")
    if policy.host_codec is not None:
        bad.append(f"host_codec={policy.host_codec!r}")
    if policy.window % policy.group:
        bad.append(f"window={policy.window} with group_size={policy.group} (expected a multiple of group_size)")
    return bad


class StepShared:
    """Tensors every layer of one decode step computes alike, computed by the first layer and reused by the others.

    Every site appends the same tokens, so after its own append each holds the same ``n`` and ``nq`` and reads the
    same positions and mask: the ring's positions, the masks over the copy and the columns, the attention bias are
    equal across layers. Computed once per step they save ~15 small launches per layer (each ~2-3 us of GPU time in
    a CUDA graph: the static path's small-op overhead is what it loses to the full cache at 8K, see the issue notes).
    A step begins when a site shows up a second time (no assumption on the order of the sites); under CUDA graph
    capture the first layer's kernels are captured and the other layers read their outputs. Keys name what a value
    depends on besides the step (shapes, the identity of the mask or bias tensor it was built from)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.vals: dict = {}

    def begin(self, site_name: str) -> None:
        if site_name in self.seen:
            self.clear()
        self.seen.add(site_name)

    def clear(self) -> None:
        """Forget the step (a new sequence, a prefill call): nothing computed before is reused."""
        self.seen.clear()
        self.vals.clear()

    def forget_values(self) -> None:
        """Drop the values, keep the sites seen: a site's history was rewritten in the middle of a step (each layer
        follows a rewind in turn). Forgetting the sites too would let the next step's first layer, not seen since,
        read this step's values as its own."""
        self.vals.clear()

    def get(self, key, make):
        if key not in self.vals:  # (a make that only writes state returns None: it must still run once a step)
            self.vals[key] = make()
        return self.vals[key]


def _shared(site, key, make):
    sh = site.step_shared
    return make() if sh is None else sh.get(key, make)


class StaticState(state.StaticDecodeState):
    """One site's fixed-capacity decode state (see the module docstring). Tensors live in ``site.tier`` under ``s_*``
    names, so the device-tier byte count sees them; ``cur`` is the prefetch slot this step reads (two graphs, one per
    parity, capture both)."""

    def __init__(self, policy, site, capacity: int) -> None:
        super().__init__(site.device)
        t = site.tier
        g, w = policy.group, policy.window
        b, h, d, dv = site.batch, site.heads, site.head_dim, site.v_head_dim
        dev, dt = site.device, site.dtype
        self.capacity = capacity
        self.cq = -(-capacity // g) * g  # whole groups covering [0, C)
        self.ring = w + g
        # a top-k over C columns picks at most C; 0 for a policy that fetches nothing (quant: the copy and the ring)
        self.topk = min(policy.topk_of(site), capacity) if policy.topk else 0
        self.issued = [False, False]  # a fetch was launched into that slot
        # (rows stored, speculative, rows fetched, bytes fetched, prefetched) of the last step: see replayed()
        self.step = None
        self.events: list = []
        nq, n = t["nq"], site.length
        rows, groups = self.cq + g, self.cq // g + 1
        z = dict(device=dev)
        t["s_kq"] = torch.zeros((b, h, rows, d * policy.bits // 8), dtype=torch.uint8, **z)
        t["s_ks"] = torch.zeros((b, h, groups, d), dtype=dt, **z)
        t["s_kz"] = torch.zeros((b, h, groups, d), dtype=dt, **z)
        t["s_vq"] = torch.zeros((b, h, rows, dv * policy.bits // 8), dtype=torch.uint8, **z)
        nvg = dv // min(g, dv)
        t["s_vs"] = torch.zeros((b, h, rows, nvg), dtype=dt, **z)
        t["s_vz"] = torch.zeros((b, h, rows, nvg), dtype=dt, **z)
        # the ring, plus row R for a speculative step's speculative token (the fused path's window columns)
        t["s_ring_k"] = torch.zeros((b, h, self.ring + 1, d), dtype=dt, **z)
        t["s_ring_v"] = torch.zeros((b, h, self.ring + 1, dv), dtype=dt, **z)
        self.fused = None  # fused_decode serves this site (decided at its first step, from the shapes)
        if nq:
            t["s_kq"][:, :, :nq] = t["kq"].view()
            t["s_ks"][:, :, : nq // g] = t["ks"].view()
            t["s_kz"][:, :, : nq // g] = t["kz"].view()
            t["s_vq"][:, :, :nq] = t["vq"].view()
            t["s_vs"][:, :, :nq] = t["vs"].view()
            t["s_vz"][:, :, :nq] = t["vz"].view()
        if n > nq:
            slots = torch.arange(nq, n, device=dev) % self.ring
            t["s_ring_k"].index_copy_(2, slots, t["win_k"].view())
            t["s_ring_v"].index_copy_(2, slots, t["win_v"].view())
        for name in ("kq", "ks", "kz", "vq", "vs", "vz", "win_k", "win_v"):
            t.pop(name)  # the dynamic buffers: the static ones replace them for the rest of the sequence
        t["s_nq"] = torch.tensor(nq, dtype=torch.int64, **z)
        t["s_n"] = torch.tensor(n, dtype=torch.int64, **z)
        t["s_bad"] = self.bad  # a write position was not the next one
        # previous-query hit counters (_sample_previous) on the device: what the default path counted before is kept
        t["prev_hits"] = torch.zeros((), dtype=torch.int64, **z) + t.get("prev_hits", 0)
        t["prev_total"] = torch.zeros((), dtype=torch.int64, **z) + t.get("prev_total", 0)
        t["s_slot_idx"] = torch.full((2, b, h, self.topk), -1, dtype=torch.int64, **z)
        # constants, allocated once (a graph replays their addresses)
        t["s_cols"] = torch.arange(capacity, **z)
        t["s_ring_rows"] = torch.arange(self.ring, **z)
        if self.topk:
            policy.fit_slots(site, self.topk)
            pf = t["prefetch"]
            pf.slots_k.zero_()  # a slot row nobody fetched into is attended with weight 0: it must not hold a NaN
            pf.slots_v.zero_()
            if pf.rows < self.topk:
                raise RuntimeError(f"specache: site {site.name}: prefetch slots of {pf.rows} rows for a top-k of "
                                   f"{self.topk}")
        if not site.keep_full:  # a policy without the full-precision store (quant): nothing written to the host
            return
        site.k.reserve(capacity)  # one allocation (and a sync if it grows): the store is written in place from now
        site.v.reserve(capacity)
        if dev.type == "cuda" and site.k.data.device.type == "cpu" and not site.k.data.is_pinned():
            raise RuntimeError(f"specache: site {site.name}: the static decode path writes the host store from the "
                               "GPU, which needs it pinned (Config.kv_home='host' on CUDA pins it)")

    def replayed(self, site, steps: int) -> None:
        """Host-side bookkeeping for ``steps`` decode steps a CUDA graph replayed without running Python: each repeats
        the last step this code ran (same kind, same sizes)."""
        if self.step is None or steps <= 0:
            return
        n_real, speculating, rows, nbytes, prefetching = self.step
        site.count_static_steps(n_real, speculating, steps)
        site.stats.fetched_rows += rows * steps
        site.stats.fetched_bytes += nbytes * steps
        if prefetching:  # (quant's static path fetches nothing and has no prefetch slots)
            pf = site.tier["prefetch"]
            pf.stats.issued += steps
            pf.stats.consumed += steps
        if prefetching and steps % 2:  # a prefetching step fetches into the other slot; an on-demand one its own
            self.cur ^= 1


def decode(policy, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
    """One static decode step of one layer. q [B, Hq, Sq, D]; k_new, v_new [B, Hkv, Sq, D]; pos [Sq] the new tokens'
    cache positions (device); bias [B|1, 1|Hq, Sq, C] additive mask over store positions; n_real: how many leading
    rows are stored (0 for SpeCache's pre-decoding row). Returns [B, Hq, Sq, Dv]."""
    t = site.tier
    st: StaticState = site.static
    g, ring = policy.group, st.ring
    b, hq, sq, d = q.shape
    hkv = site.heads
    dev = q.device
    nq, n = t["s_nq"], t["s_n"]

    # (1) append the real token; the write position must be the next one (checked on the device, raised later: every
    # layer writes at the same position, so the step's first layer checks for all of them)
    def check_position():
        t["s_bad"] |= pos[0] != n

    _shared(site, ("position_checked",), check_position)
    if n_real:
        p = pos[:n_real]
        slots = _shared(site, ("ring_slots", n_real, ring), lambda: p % ring)
        t["s_ring_k"].index_copy_(2, slots, k_new[:, :, :n_real])
        t["s_ring_v"].index_copy_(2, slots, v_new[:, :, :n_real])
        if site.keep_full:
            scatter_rows_static(k_new[:, :, :n_real], p, site.k.data)
            scatter_rows_static(v_new[:, :, :n_real], p, site.v.data)
        n.add_(n_real)

        # (2) quantize the ring's oldest group, kept only if the ring is full (branch-free: same launches every step)
        def group_targets():  # from n (after this step's append) and nq (before): alike in every layer
            # (ring row of the group, row in the copy, key group in the copy): the scratch group unless the ring is full
            full = (n - nq) >= ring
            dst = torch.where(full, nq, st.cq)
            return torch.stack([nq % ring, dst, dst // g]), full.long() * g

        offsets, inc = _shared(site, ("group_targets", ring, g, st.cq), group_targets)
        quantize_group_static(t["s_ring_k"], offsets, t["s_kq"], t["s_ks"], t["s_kz"], policy.bits, g, "keys")
        quantize_group_static(t["s_ring_v"], offsets, t["s_vq"], t["s_vs"], t["s_vz"], policy.bits, g, "values")
        nq.add_(inc)

    def positions():
        # the ring's positions: row s holds nq + ((s - nq) mod R) if that is below n, else nothing (-1); then the
        # speculative token's (attended at its position, never stored)
        ring_pos = nq + (t["s_ring_rows"] - nq) % ring
        ring_pos = torch.where(ring_pos < n, ring_pos, -1)
        if not speculating:
            return ring_pos.expand(b, hkv, ring)
        return torch.cat([ring_pos, pos[-1:]]).expand(b, hkv, ring + 1)

    low = [t[name][:, :, : st.cq // g if name in ("s_ks", "s_kz") else st.cq]
           for name in ("s_kq", "s_ks", "s_kz", "s_vq", "s_vs", "s_vz")]
    if st.fused is None:
        st.fused = st.topk > 0 and (FUSED == "always" or FUSED == "auto" and fused_decode_supported(
            q, low[0], low[1], low[4], t["s_ring_k"], t["s_ring_v"], t["s_ring_k"], policy.bits, g, sq - 1, st.topk))
    if st.fused:
        return _decode_fused(policy, site, st, q, k_new, v_new, pos, bias, scale, n_real, speculating, low)

    pos_cols = _shared(site, ("pos_cols", b, hkv, ring, speculating), positions)
    k_cols, v_cols = t["s_ring_k"][:, :, :ring], t["s_ring_v"][:, :, :ring]
    if speculating:
        k_cols, v_cols = torch.cat([k_cols, k_new[:, :, -1:]], 2), torch.cat([v_cols, v_new[:, :, -1:]], 2)
    if not st.topk:  # nothing fetched (quant): attention over the copy with the ring substituted
        st.step = (n_real, speculating, 0, 0, False)
        return ops.lowbit_decode_attention(q, *low, policy.bits, g, 0, k_cols, v_cols, pos_cols, bias, scale)

    # (3) rank with the speculative row (or the real row of a plain step)
    r = sq - 1 if speculating else 0
    top = _rank_rows(policy, site, st, q[:, :, r : r + 1], bias[..., r : r + 1, :], low, k_cols, pos_cols, scale)

    pf = t["prefetch"]
    prefetching = speculating or policy.prefetch == "previous"
    if prefetching:
        # the rows the previous step's speculative row chose (a slot never filled reads as positions -1)
        idx_now = t["s_slot_idx"][st.cur]
        if st.issued[st.cur]:
            # filled on the side stream: NOTE read-after-write across streams. Under CUDA graph capture the event
            # belongs to an earlier graph (not capturable); generate joins the side stream at the end of every
            # captured step instead, so the replays run in order.
            if st.events and not torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream(dev).wait_event(st.events[st.cur])
            pf.stats.consumed += 1
            if policy.hit_every == 1 and sq > 1:  # a second ranking per step: only when asked for every step
                real = _rank_rows(policy, site, st, q[:, :, :1], bias[..., :1, :], low, k_cols, pos_cols, scale)
                t["hits"] += overlap_count(real, idx_now)
                t["hit_total"] += real.numel()
            if not speculating:  # the real row's choice against the previous step's: the previous-query hit rate
                _sample_previous(policy, t, idx_now, top)
        k_f, v_f = pf.slots_k[st.cur, :, :, : st.topk], pf.slots_v[st.cur, :, :, : st.topk]
        if not speculating and not st.issued[st.cur]:
            # the sequence's first plain step: nothing was prefetched for it, so its own choice is fetched now (a
            # step that builds the state: never captured, so this branch on a host flag is never replayed)
            idx_now.copy_(top)
            gather_rows_static(site.k.data, idx_now, k_f)
            gather_rows_static(site.v.data, idx_now, v_f)
        _issue(site, st, top)
    else:
        # plain step: fetch the real row's choice now, on the main stream, into the current slot
        _sample_previous(policy, t, t["s_slot_idx"][st.cur], top)
        idx_now = t["s_slot_idx"][st.cur].copy_(top)
        k_f, v_f = pf.slots_k[st.cur, :, :, : st.topk], pf.slots_v[st.cur, :, :, : st.topk]
        gather_rows_static(site.k.data, idx_now, k_f)
        gather_rows_static(site.v.data, idx_now, v_f)
    rows, nbytes = idx_now.numel(), k_f.numel() * k_f.element_size() + v_f.numel() * v_f.element_size()
    site.stats.fetched_rows += rows
    site.stats.fetched_bytes += nbytes
    st.step = (n_real, speculating, rows, nbytes, prefetching)  # what replayed() counts for a replayed step

    # (4) attention over the copy, with the fetched rows, the ring and the speculative column substituted
    fp_pos = torch.cat([idx_now, pos_cols], dim=2)
    return ops.lowbit_decode_attention(q, *low, policy.bits, g, 0, torch.cat([k_f, k_cols], 2),
                                       torch.cat([v_f, v_cols], 2), fp_pos, bias, scale)


def _decode_fused(policy, site, st, q, k_new, v_new, pos, bias, scale, n_real, speculating, low):
    """Steps (3) and (4) through ``fused_decode``: see the module docstring. ``low``: the copy without its scratch
    group, [0, Cq) (rows) and [0, Cq / G) (key groups)."""
    t = site.tier
    b, hq, sq, _ = q.shape
    hkv, ring, nq, n = site.heads, st.ring, t["s_nq"], t["s_n"]
    g = policy.group

    def window_positions():
        # ring row s holds nq + ((s - nq) mod R) if that is below n, else nothing (-1); row R the speculative token
        ring_pos = nq + (t["s_ring_rows"] - nq) % ring
        ring_pos = torch.where(ring_pos < n, ring_pos, -1)
        spec = pos[-1:] if speculating else torch.full_like(pos[-1:], -1)
        return torch.cat([ring_pos, spec]).expand(b, hkv, ring + 1)

    win_pos = _shared(site, ("win_pos", b, hkv, ring, speculating), window_positions)
    k_win, v_win = t["s_ring_k"], t["s_ring_v"]
    if speculating:
        k_win[:, :, ring].copy_(k_new[:, :, -1])
        v_win[:, :, ring].copy_(v_new[:, :, -1])
    pf = t["prefetch"]

    def fused(idx, rank_row, k, attend=True):
        return ops.fused_decode(q, *low, policy.bits, g, 0, k_f, v_f, idx, k_win, v_win, win_pos, bias, nq, scale,
                                rank_row, k, attend)

    prefetching = speculating or policy.prefetch == "previous"
    if prefetching:
        # attend with the rows the previous step's speculative row (or real row, prefetch="previous") chose; rank
        # with this step's for the next
        idx_now = t["s_slot_idx"][st.cur]
        if st.issued[st.cur]:
            # filled on the side stream: NOTE read-after-write across streams (see decode)
            if st.events and not torch.cuda.is_current_stream_capturing():
                torch.cuda.current_stream(q.device).wait_event(st.events[st.cur])
            pf.stats.consumed += 1
        k_f, v_f = pf.slots_k[st.cur, :, :, : st.topk], pf.slots_v[st.cur, :, :, : st.topk]
        if st.issued[st.cur] and policy.hit_every == 1 and sq > 1:  # a second ranking: only when asked every step
            real = fused(idx_now, 0, st.topk, attend=False)[1]
            t["hits"] += overlap_count(real, idx_now)
            t["hit_total"] += real.numel()
        first = not speculating and not st.issued[st.cur]
        if first:  # the sequence's first plain step: its own choice fetched now (see decode)
            idx_now.copy_(fused(idx_now, 0, st.topk, attend=False)[1])
            gather_rows_static(site.k.data, idx_now, k_f)
            gather_rows_static(site.v.data, idx_now, v_f)
        out, top = fused(idx_now, sq - 1, st.topk)
        if not speculating and not first:
            _sample_previous(policy, t, idx_now, top)
        _issue(site, st, top)
    else:
        # plain step: rank with the real row (keys only), fetch its choice now on the main stream, then attend
        k_f, v_f = pf.slots_k[st.cur, :, :, : st.topk], pf.slots_v[st.cur, :, :, : st.topk]
        idx_now = t["s_slot_idx"][st.cur]
        top = fused(idx_now, 0, st.topk, attend=False)[1]
        _sample_previous(policy, t, idx_now, top)
        idx_now.copy_(top)
        gather_rows_static(site.k.data, idx_now, k_f)
        gather_rows_static(site.v.data, idx_now, v_f)
        out = fused(idx_now, -1, 0)[0]
    rows, nbytes = idx_now.numel(), k_f.numel() * k_f.element_size() + v_f.numel() * v_f.element_size()
    site.stats.fetched_rows += rows
    site.stats.fetched_bytes += nbytes
    st.step = (n_real, speculating, rows, nbytes, prefetching)  # what replayed() counts for a replayed step
    return out


def _sample_previous(policy, t, prev, top) -> None:
    """How much of a plain step's top-k ``top`` [B, Hkv, k] the previous step's ``prev`` held (-1: nothing): the hit
    rate a previous-query prefetch would have under ``model.generate`` (``previous_query_hit_rate``, as the default
    path samples it). Every step where ``hit_every`` is set: a host step counter would not advance under a graph
    replay; device counters, no sync."""
    if not policy.hit_every:
        return
    # -1 (nothing) in both never counts as a hit: only chosen positions of ``top`` are counted
    t["prev_hits"] += overlap_count(top.masked_fill(top < 0, -2), prev)
    t["prev_total"] += ((top >= 0) & (prev >= 0).any(-1, keepdim=True)).sum()


def _rank_rows(policy, site, st, qr, br, low, k_cols, pos_cols, scale):
    """Top-k positions [B, Hkv, k] for one query row qr [B, Hq, 1, D] with its bias br: scores over the copy
    (positions at or past nq masked) and the full-precision columns, one softmax, GQA mean, top-k over [0, nq)
    (-1 where fewer than k tokens are quantized). Step (3), and the real row's choice for hit sampling."""
    t = site.tier
    b, hq = qr.shape[:2]
    hkv = site.heads
    cap, nq = st.capacity, t["s_nq"]

    def biases():
        # the row's bias over the copy with positions at or past nq masked, and over the columns at their positions
        # (columns holding nothing masked); adding 0 or -inf in another order gives the same sums
        low_b = br + torch.where(t["s_cols"] < nq, 0.0, _NEG)
        col_b = br.expand(b, hq, 1, cap).gather(3, pos_cols.clamp(min=0).repeat_interleave(hq // hkv, 1).unsqueeze(2))
        return low_b, col_b + torch.where(pos_cols >= 0, 0.0, _NEG).repeat_interleave(hq // hkv, 1).unsqueeze(2)

    # br is a view of the step's bias: keyed by that tensor and the row
    low_b, col_b = _shared(site, ("rank_bias", id(br._base if br._base is not None else br), br.storage_offset(),
                                  tuple(br.shape), tuple(pos_cols.shape), cap, hq), biases)
    low_logits = ops.lowbit_scores(qr, *low[:3], policy.bits, policy.group, scale)[..., :cap] + low_b
    col_logits = ops.attention_logits(qr, k_cols, scale) + col_b
    # one softmax over [copy, columns], mean over each GQA group, top-k over the copy: two Triton passes on CUDA
    top = select_topk(low_logits[:, :, 0], col_logits[:, :, 0], hq // hkv, st.topk)
    return torch.where(top < nq, top, -1)


def _issue(site, st: StaticState, top: torch.Tensor) -> None:
    """Fetch rows ``top`` into the other slot (on the side stream where there is one); the next step reads it."""
    t = site.tier
    pf = t["prefetch"]
    nxt = st.cur ^ 1
    t["s_slot_idx"][nxt].copy_(top)
    k_out, v_out = pf.slots_k[nxt, :, :, : st.topk], pf.slots_v[nxt, :, :, : st.topk]
    side = site.streams.side(site.device)
    if side is None:
        gather_rows_static(site.k.data, t["s_slot_idx"][nxt], k_out)
        gather_rows_static(site.v.data, t["s_slot_idx"][nxt], v_out)
    else:
        side.wait_stream(torch.cuda.current_stream(site.device))  # NOTE: positions and host writes ready
        with torch.cuda.stream(side):
            gather_rows_static(site.k.data, t["s_slot_idx"][nxt], k_out)
            gather_rows_static(site.v.data, t["s_slot_idx"][nxt], v_out)
        while len(st.events) < 2:
            st.events.append(torch.cuda.Event())
        st.events[nxt].record(side)
    st.issued[nxt] = True
    pf.stats.issued += 1
    st.cur = nxt
