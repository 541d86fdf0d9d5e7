"""The full policy's static decode path (policies/full.py FullStatic), CPU: a StaticCache decoded with the new token
written into the store at its device position and the store's whole capacity attended under the capacity's bias, so
model.generate's steps replay (capture=False emulation: tests/runtime/test_decode_graphs.py)."""

from __future__ import annotations

import hf_models
import pytest
import torch
from static_loops import greedy_over_static_cache, site_after_plain_steps

import specache
from specache_compile.runtime.runtime import CacheMismatch


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, static="auto"):
    m = specache.compile(hf_models.twin(base), policy="full", policy_options={"static": static})
    m._specache_graphs.capture = False
    return m


@torch.no_grad()
def test_model_generate_decodes_statically_and_equals_the_unmodified_model():
    base = hf_models.build("llama", layers=2, seed=0).double()
    ids = _ids(40, 1)
    ref = base.generate(ids, max_new_tokens=12, do_sample=False)
    m = _compile(base)
    rt = specache.runtime_of(m)
    assert rt.policy.static and rt.policy.describe() == {"policy": "full", "static": True}
    out = m.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
    g = m._specache_graphs.stats()
    assert g["captured"] == 1 and g["replayed"] == 11 - 3
    for site in rt.sites.values():
        assert site.length == 40 + 11 and site.static is not None
        cap = site.static.capacity
        # every step fetched the capacity: what a replayed step counts too
        assert site.stats.fetched_rows == 11 * site.batch * site.heads * cap


@torch.no_grad()
def test_unwritten_store_rows_never_reach_the_output():
    """The store's rows past the written length are uninitialised memory (NaN here): the static state zeroes them, so
    the masked columns of the capacity contribute 0, never NaN."""
    base = hf_models.build("llama", layers=2, seed=2).double()
    ids = _ids(30, 3)

    def poison(model):
        for site in specache.runtime_of(model).sites.values():
            for buf in (site.k, site.v):
                buf.reserve(64)
                buf.data[:, :, site.length:] = float("nan")

    got = greedy_over_static_cache(_compile(base), ids, 10, 64, after_prefill=poison)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, greedy_over_static_cache(base, ids, 10, 64), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_a_write_at_a_wrong_position_is_raised():
    base = hf_models.build("llama", layers=2, seed=4)
    m = _compile(base)
    site = site_after_plain_steps(m, _ids(30, 5), 1)
    st = site.static
    kv = torch.zeros(1, site.heads, 1, site.head_dim)
    st.step(site, torch.zeros(1, 4, 1, site.head_dim), kv, kv, torch.tensor([40]), torch.zeros(1, 1, 1, 64), 1.0)
    with pytest.raises(CacheMismatch, match="other positions than the next one"):
        specache.stats(m)


def test_options_are_checked():
    base = hf_models.build("llama", layers=1)
    with pytest.raises(ValueError, match="static"):
        specache.compile(hf_models.twin(base), policy="full", policy_options={"static": "yes"})
    with pytest.raises(ValueError, match="unknown policy_options"):
        specache.compile(hf_models.twin(base), policy="full", policy_options={"topn": 3})
    assert not specache.runtime_of(specache.compile(hf_models.twin(base), policy="full",
                                                    policy_options={"static": False})).policy.static
