"""KCache's static decode path (policies/kcache_static.py), CPU: a StaticCache decoded through K at the cache's
capacity, V written to and fetched from the host store by device positions, so model.generate's steps replay.

Each static step must compute what the default path computes: the same top-N value rows, the same weights. The
default path is the reference (``static=False``), in float64 so that the two agree token for token."""

from __future__ import annotations

import hf_models
import pytest
import torch

import specache
from specache_compile.runtime.runtime import CacheMismatch


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, topk, static="auto", **opts):
    m = specache.compile(hf_models.twin(base), policy="kcache", topk=topk, policy_options={**opts, "static": static})
    m._specache_graphs.capture = False  # re-run instead of a CUDA graph (tests/runtime/test_decode_graphs.py)
    return m


# topk 8 < the 50..69 written positions (the selection matters); 128 covers them (exact: the unmodified model's)
@pytest.mark.parametrize("topk", [8, 128])
@torch.no_grad()
def test_model_generate_decodes_statically_and_equals_the_default_path(topk):
    base = hf_models.build("llama", layers=2, seed=0).double()
    ids = _ids(50, 1)
    ref = _compile(base, topk, static=False).generate(ids, max_new_tokens=20, do_sample=False)
    if topk == 128:
        assert torch.equal(ref, base.generate(ids, max_new_tokens=20, do_sample=False))
    m = _compile(base, topk)
    rt = specache.runtime_of(m)
    assert rt.policy.static and rt.policy.describe()["static"] is True  # "auto": the default
    out = m.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)
    assert rt.plain_static_steps > 0 and all(s.static is not None for s in rt.sites.values())
    g = m._specache_graphs.stats()
    assert g["captured"] == 1 and g["replayed"] == 19 - 3  # build, prove, capture, then replays
    site = next(iter(rt.sites.values()))
    st = site.static
    cap = st.k.shape[2]  # the cache's capacity (a bucket): K for every position, fixed for the sequence
    assert cap >= 1024 and st.topn == topk and "k" not in site.tier and "fetch_v" not in site.tier
    heads = site.batch * site.heads
    stats = specache.stats(m)["store"]
    for s in stats.values():
        assert s["length"] == 50 + 19 and s["decode_steps"] == 19
        assert s["fetched_rows"] == 19 * heads * topk  # N rows per KV head per step (-1 slots included)
    # a step a CUDA graph replays (no Python) advances the host counters as a step run from Python does
    before = dict(stats[site.name])
    st.replayed(site, 3)
    after = specache.stats(m)["store"][site.name]
    assert after["length"] == before["length"] + 3 and after["decode_steps"] == before["decode_steps"] + 3
    assert after["fetched_rows"] - before["fetched_rows"] == 3 * heads * topk
    assert after["fetched_bytes"] - before["fetched_bytes"] == 3 * heads * topk * site.v_head_dim * 8


@torch.no_grad()
def test_masked_columns_are_never_read_even_when_the_store_holds_nan():
    """Unwritten host rows (pinned memory holds whatever was there) never reach the output: a top-N wider than the
    written columns chooses no masked column, and the rows it would have read hold NaN here. A left-padded batch: the
    model's mask hides the padding's columns (written, never chosen either)."""
    base = hf_models.build("llama", layers=1, seed=6).double()
    ids = torch.cat([_ids(20, 7), _ids(20, 8)])
    attn = torch.ones_like(ids)
    attn[1, :5] = 0
    kw = dict(attention_mask=attn, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = _compile(base, 64, static=False).generate(ids, **kw)
    m = _compile(base, 64)
    rt = specache.runtime_of(m)
    from specache_compile.runtime.buffers import Growable

    reserve = Growable.reserve

    def poisoned(self, capacity):  # every row of the store not written yet holds NaN
        reserve(self, capacity)
        if self.data.dtype.is_floating_point:
            self.data.narrow(self.seq_dim, self.length, self.data.shape[self.seq_dim] - self.length).fill_(float("nan"))

    Growable.reserve = poisoned
    try:
        out = m.generate(ids, **kw)
    finally:
        Growable.reserve = reserve
    assert torch.equal(out, ref)
    site = next(iter(rt.sites.values()))
    assert torch.isnan(site.v.data[:, :, 24:]).all()  # the poison was there, past the 24 rows written


# two compiles, 2 x 12 float64 steps over hand loops and the recompile for the 2-token call (~7-9 s on 2 cores)
@pytest.mark.slow
@torch.no_grad()
def test_a_two_token_call_after_static_steps_rebuilds_from_the_store():
    """A hand-written loop over one StaticCache: static steps, a 2-token call (the runtime rebuilds the default state
    from the store and drops the static one), static steps again; every logit equals the default path's."""
    from transformers import StaticCache

    base = hf_models.build("llama", layers=2, seed=2).double()
    ids = _ids(40, 3)

    def loop(model, seen):
        cache = StaticCache(config=model.config, max_cache_len=96)
        kw = dict(past_key_values=cache, use_cache=True)
        out = model(input_ids=ids, **kw)
        logits, tok, p = [], out.logits[:, -1:].argmax(-1), 40
        for i in range(12):
            n = 2 if i == 6 else 1
            x = torch.cat([tok, (tok + 1) % 128], 1) if n == 2 else tok
            out = model(input_ids=x, position_ids=torch.arange(p, p + n)[None], cache_position=torch.arange(p, p + n),
                        **kw)
            p += n
            logits.append(out.logits[:, -1:])
            tok = out.logits[:, -1:].argmax(-1)
            seen(i)
        return torch.cat(logits, 1)

    ref = loop(_compile(base, 8, static=False), lambda i: None)
    m = _compile(base, 8)
    rt = specache.runtime_of(m)
    states = []

    def seen(i):
        site = next(iter(rt.sites.values()))
        states.append(site.static)
        if i == 6:  # the 2-token call: the default path's state rebuilt from the store, the static state dropped
            assert states[-1] is None and site.tier["k"].length == 40 + 6 + 2 and site.stats.rewrites == 1

    got = loop(m, seen)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)  # the attention accumulates in float32
    assert states[0] is states[5] and states[7] is states[11] and states[7] is not states[0]  # rebuilt once
    assert rt.plain_static_steps == 11 * 2  # every one-token step at both layers
    assert all(s["length"] == 40 + 13 for s in specache.stats(m)["store"].values())


@torch.no_grad()
def test_a_write_at_a_wrong_position_is_raised():
    """A static step writing anywhere but the next position (positions on the device: no host read to catch it, as
    in a replayed graph) is flagged by the step and raised at the next check, not attended silently."""
    base = hf_models.build("llama", layers=2, seed=4)
    m = _compile(base, 8)
    m.generate(_ids(30, 5), max_new_tokens=3, do_sample=False)
    specache.stats(m)  # nothing flagged so far
    site = next(iter(specache.runtime_of(m).sites.values()))
    st = site.static
    q = torch.zeros(1, 4, 1, site.head_dim)
    kv = torch.zeros(1, site.heads, 1, site.head_dim)
    wrong = torch.tensor([site.length + 5])  # the next position is site.length
    st.step(site, q, kv, kv, wrong, torch.zeros(1, 1, 1, st.k.shape[2]), 1.0)
    assert bool(st.bad)
    with pytest.raises(CacheMismatch, match="other positions than the next one"):
        specache.stats(m)


def test_static_option_is_checked():
    base = hf_models.build("llama", layers=1)
    with pytest.raises(ValueError, match="static") as e:
        specache.compile(hf_models.twin(base), policy="kcache", policy_options={"static": "yes"})
    assert "expected" in str(e.value) and "fix" in str(e.value)
    for static in (False, True):
        m = specache.compile(hf_models.twin(base), policy="kcache", policy_options={"static": static})
        policy = specache.runtime_of(m).policy
        assert policy.static is static and policy.static_required is static
        assert policy.describe()["static"] is static
