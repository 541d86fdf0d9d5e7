"""CAKE's static decode path (policies/cake_static.py), CPU: the kept rows at a fixed number of slots, the decode
eviction computed on fixed shapes and applied by a device condition, so model.generate's steps replay.

Each static step must compute what the default path computes: same kept rows in the same order, same attention. The
default path is the reference (``static=False``), driven through the same calls; under model.generate the models
are float64, so that the two agree token for token."""

from __future__ import annotations

import math

import hf_models
import pytest
import torch
from static_loops import greedy_over_static_cache
from test_cake import kept, layer_inputs, make_policy, make_site, prefill
from test_kept_static import test_a_write_at_a_wrong_position_is_raised as wrong_position_is_raised

import specache


def _step_both(ref, static, ref_sites, st_sites, q, k, v, capacity):
    """One decode step of both paths at every site: the default path's append + decode, and the static path's
    decode_static with the causal bias over the capacity (the runtime's, without a mask). Returns both outputs."""
    outs = []
    scale = 1 / math.sqrt(q.shape[-1])
    for a, b in zip(ref_sites, st_sites):
        p = a.length
        a.write(p, k, v)
        ref.append(a, k, v, p)
        want = ref.decode(a, q, None, 0, p + 1, scale)
        bias = torch.where(torch.arange(capacity) <= p, 0.0, float("-inf")).reshape(1, 1, 1, capacity)
        got = static.decode_static(b, q, k, v, torch.tensor([p]), bias, scale, 1, False)
        b.count_static_steps(1, False)
        outs.append((want, got))
    return outs


def _static_kept(site) -> torch.Tensor:
    st = site.static
    return st.pos[:, :, : int(st.used)]


@pytest.mark.parametrize("opts", [{"budget": 16, "window": 4},  # the prefill evicts, then every step does
                                  {"budget": 56, "window": 4},  # the prompt fits: rows grow to 56, then evict
                                  {"budget": 16, "window": 4, "decode_evict": False}])  # rows grow, slots double
def test_static_steps_equal_the_default_path(opts):
    """Driven through the runtime's calls on fake sites, two layers, GQA: after every step the static rows hold the
    default path's kept positions in the same (ascending) order, and the outputs agree."""
    ref, static = make_policy(**opts, static=False), make_policy(**opts)
    assert static.static and not ref.static
    ref_sites = [make_site(f"l{i}", 2, 2, 16) for i in range(2)]
    st_sites = [make_site(f"l{i}", 2, 2, 16) for i in range(2)]
    layers = [layer_inputs("dispersed", seed=i) for i in range(2)]
    prefill(ref, ref_sites, layers)
    prefill(static, st_sites, layers)
    capacity = 48 + 40
    g = torch.Generator().manual_seed(3)
    states = []  # the state objects themselves: an id() of a freed state can be reused by its successor
    for _ in range(40):
        q, k, v = (torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g),
                   torch.randn(2, 2, 1, 16, generator=g))
        for want, got in _step_both(ref, static, ref_sites, st_sites, q, k, v, capacity):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(ref_sites, st_sites):
            assert torch.equal(_static_kept(b), kept(a))
        if not any(s is st_sites[0].static for s in states):
            states.append(st_sites[0].static)
    assert static.budgets() == ref.budgets()
    st = st_sites[0].static
    if opts.get("decode_evict", True):
        # one state for the sequence, its slots B_l + S_w + 1 (capped by what the capacity can still bring)
        assert len(states) == 1 and st.keep is not None
        assert st.slots == min(st_sites[0].tier["budget"] + 4 + 1, st.rows0 + capacity - 48)
    else:  # 16 slots past the prompt, then 32, then the 40 the capacity leaves: two growths (new states)
        assert len(states) == 3 and st.slots == st.rows0 + 40
    assert static.site_report(st_sites[0])["cake_kept"] == ref.site_report(ref_sites[0])["cake_kept"]


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, opts, static="auto"):
    m = specache.compile(hf_models.twin(base), policy="cake", policy_options={**opts, "static": static})
    m._specache_graphs.capture = False  # re-run instead of a CUDA graph (tests/runtime/test_decode_graphs.py)
    return m


OPTS = {"budget": 24, "window": 8}  # a prompt of 50: the prefill evicts (C = 24 < 50), then every decode step


@torch.no_grad()
def test_static_steps_over_a_hand_loop_equal_the_default_paths_logits():
    """A hand-written loop over one StaticCache (positions given by the loop), through the compiled call
    model.generate uses: the default path (decoding the same cache by host counts) and the static path give the same
    logits, and the static path's steps replay (capture=False emulation)."""
    base = hf_models.build("llama", layers=2, seed=2).double()
    ids = _ids(40, 3)

    def loop(model):
        return greedy_over_static_cache(model, ids, 12, 64)

    m = _compile(base, OPTS)
    rt = specache.runtime_of(m)
    rt.policy.static = False  # the runtime reads the declared path per call: one compile serves both (a sequence each)
    ref = loop(m)
    assert rt.plain_static_steps == 0 and m._specache_graphs.stats()["captured"] == 0
    rt.policy.static = True
    got = loop(m)
    # every step evicts with every slot used: the same rows through the same ops as the default path, bit for bit
    # (the second sequence cascades during its prefill, the first evicted one-shot: the same kept sets, Theorem 1)
    assert torch.equal(got, ref)
    assert rt.plain_static_steps == 12 * 2  # every step at both layers
    g = m._specache_graphs.stats()
    assert g["captured"] == 1 and g["replayed"] == 12 - 3, g  # build, prove, capture, then replays
    assert all(r["cake_kept"] == r["cake_budget"] + 8
               for r in (rt.policy.site_report(s) for s in rt.sites.values()))


# two compiles and two sequences of 20 float64 steps each (~11 s on 2 cores): in the slow set
@pytest.mark.slow
@torch.no_grad()
def test_model_generate_decodes_statically_and_equals_the_default_path():
    """Two sequences: the first evicts one-shot at its first decode step (L not known yet), the second cascades
    during its prefill; both replay their steps and give the default path's tokens."""
    base = hf_models.build("llama", layers=2, seed=0).double()
    ref_model = _compile(base, OPTS, static=False)
    m = _compile(base, OPTS)
    rt = specache.runtime_of(m)
    assert rt.policy.static and rt.policy.describe()["static"] is True  # "auto": a StaticCache under generate
    for seq, seed in enumerate((1, 2)):
        ids = _ids(50, seed)
        ref = ref_model.generate(ids, max_new_tokens=20, do_sample=False)
        out = m.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, ref), seq
        assert all(s.static is not None for s in rt.sites.values())
        assert rt.policy.budgets() == specache.runtime_of(ref_model).policy.budgets()
        g = m._specache_graphs.stats()
        # per sequence: build, prove, capture, then replays (one state per sequence: decode_evict never grows it)
        assert g["captured"] == seq + 1 and g["replayed"] == (seq + 1) * (19 - 3), g
    report = {name: rt.policy.site_report(s) for name, s in rt.sites.items()}
    assert all(r["cake_kept"] == r["cake_budget"] + 8 for r in report.values())  # evicted at every step
    st = specache.stats(m)
    assert all(v["length"] == 50 + 19 for v in st["store"].values())
    # the device tier is the kept rows at B_l + S_w + 1 slots (+ the step's counters), not the whole cache
    for s in rt.sites.values():
        assert s.static.k.shape[2] == s.tier["budget"] + 8 + 1
    b, hkv, d = 1, 2, 16
    want = sum((s.tier["budget"] + 9) * b * hkv * (2 * d * 8 + 8) + 2 * 8 for s in rt.sites.values())
    assert st["bytes"]["device"] == want and st["bytes"]["host"] == 0


def test_a_write_at_a_wrong_position_is_raised():
    """A static step writing anywhere but the next position (positions on the device: no host read to catch it) is
    flagged by the step and raised at the next check, not attended silently: StreamingLLM and SnapKV's case, run on
    CAKE's rows."""
    wrong_position_is_raised("cake", OPTS)


def test_static_option_is_checked():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="static") as err:
            make_policy(budget=24, window=8, static=bad)
        assert "fix" in str(err.value)
    for value, want in ((False, False), (True, True), ("auto", True)):
        pol = make_policy(budget=24, window=8, static=value)
        assert pol.static is want and pol.static_required is (value is True)
        assert pol.describe()["static"] is want
