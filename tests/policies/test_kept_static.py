"""The eviction policies' static decode path (policies/kept_static.py), CPU: StreamingLLM and SnapKV decoding a
StaticCache through fixed-capacity kept rows, positions on the device, so model.generate's steps replay.

Each static step must compute what the default path computes: same kept rows, same attention. The default path is
the reference (a DynamicCache, or ``static=False``), in float64 so that the two agree token for token."""

from __future__ import annotations

import hf_models
import pytest
import torch
from static_loops import greedy_over_static_cache, site_after_plain_steps

import specache
from specache_compile.runtime.runtime import CacheMismatch

POLICIES = [("streaming", {"budget": 24, "sinks": 4}), ("snapkv", {"budget": 24, "window": 8})]


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, policy, opts, static="auto"):
    m = specache.compile(hf_models.twin(base), policy=policy, policy_options={**opts, "static": static})
    m._specache_graphs.capture = False  # re-run instead of a CUDA graph (tests/runtime/test_decode_graphs.py)
    return m


@pytest.mark.parametrize("policy, opts", POLICIES)
@torch.no_grad()
def test_model_generate_decodes_statically_and_equals_the_default_path(policy, opts):
    base = hf_models.build("llama", layers=2, seed=0).double()
    ids = _ids(50, 1)
    ref_model = _compile(base, policy, opts, static=False)
    ref = ref_model.generate(ids, max_new_tokens=20, do_sample=False)
    m = _compile(base, policy, opts)
    assert specache.runtime_of(m).policy.static  # "auto": these options allow it
    rt = specache.runtime_of(m)
    out = m.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, ref)
    assert rt.plain_static_steps > 0 and all(s.static is not None for s in rt.sites.values())
    g = m._specache_graphs.stats()
    if policy == "streaming":
        assert g["captured"] == 1 and g["replayed"] == 19 - 3  # build, prove, capture, then replays
    else:  # SnapKV's 16 slots past the prompt are full after 16 steps: grown (a new state), proven, captured again
        assert g["captured"] == 2 and g["replayed"] == 19 - 3 - 3
    st = specache.stats(m)["store"]
    assert all(v["length"] == 50 + 19 for v in st.values())
    # the budget holds: the device tier is the kept rows at their capacity, not the whole cache
    cap = next(iter(rt.sites.values())).static.k.shape[2]
    assert cap == 24 if policy == "streaming" else cap == 24 + 32


# two compiles and 24 float64 steps per case (~14 s on 2 cores): in the slow set
@pytest.mark.slow
@pytest.mark.parametrize("policy, opts", POLICIES)
@torch.no_grad()
def test_static_steps_over_a_hand_loop_equal_the_default_paths_logits(policy, opts):
    """A hand-written loop over one StaticCache (positions given by the loop) equals the default path's logits; a
    two-token call after the static steps is refused (no full-precision store to attend the earlier tokens), as the
    default path refuses it."""
    base = hf_models.build("llama", layers=2, seed=2).double()
    ids = _ids(40, 3)
    ref = greedy_over_static_cache(_compile(base, policy, opts, static=False), ids, 12, 96, refuse_more=True)
    m = _compile(base, policy, opts)
    got = greedy_over_static_cache(m, ids, 12, 96, refuse_more=True)
    # the attention accumulates in float32: SnapKV's static rows hold empty slots the default path does not have
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert specache.runtime_of(m).plain_static_steps == 12 * 2  # every step at both layers


@pytest.mark.parametrize("policy, opts", POLICIES)
@torch.no_grad()
def test_a_write_at_a_wrong_position_is_raised(policy, opts):
    """A static step writing anywhere but the next position (positions on the device: no host read to catch it) is
    flagged by the step and raised at the next check, not attended silently."""
    base = hf_models.build("llama", layers=2, seed=4)
    m = _compile(base, policy, opts)
    site = site_after_plain_steps(m, _ids(30, 5), 2)
    st = site.static
    q = torch.zeros(1, 4, 1, site.head_dim)
    kv = torch.zeros(1, site.heads, 1, site.head_dim)
    st.step(q, kv, kv, torch.tensor([40]), torch.zeros(1, 1, 1, 64), 1.0)  # position 40, the next one is 32
    assert bool(st.bad)
    with pytest.raises(CacheMismatch, match="other positions than the next one"):
        specache.stats(m)


def test_static_option_is_checked():
    base = hf_models.build("llama", layers=1)
    for policy, opts in POLICIES:
        with pytest.raises(ValueError, match="static"):
            specache.compile(hf_models.twin(base), policy=policy, policy_options={**opts, "static": "yes"})
        m = specache.compile(hf_models.twin(base), policy=policy, policy_options={**opts, "static": False})
        assert not specache.runtime_of(m).policy.static
        assert specache.runtime_of(m).policy.describe()["static"] is False


@pytest.mark.parametrize("shared_pos", [True, False])
def test_sdpa_over_the_slots_equals_the_reference_attention(shared_pos):
    """The CUDA step's SDPA attention (kept_static._sdpa_over_slots) computes kept_attention: the bias over the
    capacity read at each slot's position, empty slots (-1) masked, GQA groups sharing their KV head."""
    from specache_compile.policies.kept_static import _sdpa_over_slots
    from specache_compile.policies.streaming import kept_attention

    g = torch.Generator().manual_seed(7)
    b, hq, hkv, n, d, cap = 2, 8, 2, 24, 16, 64
    q = torch.randn(b, hq, 1, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    shape = (1, 1, n) if shared_pos else (b, hkv, n)
    pos = torch.randperm(cap, generator=g)[: n].expand(*shape[:2], n).clone() if shared_pos else \
        torch.stack([torch.stack([torch.randperm(cap, generator=g)[:n] for _ in range(hkv)]) for _ in range(b)])
    pos[..., ::5] = -1  # empty slots
    bias = torch.zeros(b, 1, 1, cap, dtype=torch.float64).masked_fill_(torch.rand(b, 1, 1, cap, generator=g) < 0.2,
                                                                        float("-inf"))
    bias[..., pos[..., 1].reshape(-1)] = 0.0  # every row keeps a visible slot
    got = _sdpa_over_slots(q, k, v, pos, bias, 0.25)
    want = kept_attention(q, k, v, pos, bias, 0, cap, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
