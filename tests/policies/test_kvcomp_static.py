"""KVComp's static decode path (policies/kvcomp_static.py), CPU: a StaticCache decoded through the compressed streams
and recent buffers at fixed shapes, lengths on the device, blocks compressed on the steps that run from Python, so
model.generate's other steps replay.

Each static step must compute what the default path computes: the same blocks compressed from the same rows, the
same attention. The default path is the reference (``static=False``: model.generate then decodes a DynamicCache), in
float64 so that the two agree token for token. Small blocks and recent buffers, so that blocks of K and of V are
compressed during the decode, not only at the prefill."""

from __future__ import annotations

import hf_models
import pytest
import torch
from static_loops import greedy_over_static_cache, site_after_plain_steps

import specache
from specache_compile.policies.kvcomp_static import KVCompState, due
from specache_compile.runtime.runtime import CacheMismatch

OPTS = {"k_block": 4, "v_block": 8, "k_recent": 4, "v_recent": 8}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one intra-op thread is faster on a 2-core box
    yield
    torch.set_num_threads(threads)


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, static="auto", **opts):
    m = specache.compile(hf_models.twin(base), policy="kvcomp", policy_options={**OPTS, **opts, "static": static})
    m._specache_graphs.capture = False  # re-run instead of a CUDA graph (tests/runtime/test_decode_graphs.py)
    return m


def _reports(m):
    rt = specache.runtime_of(m)
    keys = ("compressed_tokens_k", "compressed_tokens_v", "compressed_bytes", "recent_bytes")
    return {name: {k: rt.policy.site_report(s)[k] for k in keys} for name, s in rt.sites.items()}


@torch.no_grad()
def test_model_generate_decodes_statically_and_equals_the_default_path():
    base = hf_models.build("llama", layers=2, seed=0).double()
    ids = _ids(22, 1)
    ref_model = _compile(base, static=False)
    ref = ref_model.generate(ids, max_new_tokens=22, do_sample=False)
    m = _compile(base)
    rt = specache.runtime_of(m)
    assert rt.policy.static  # "auto": every option has a static path
    out = m.generate(ids, max_new_tokens=22, do_sample=False)
    assert torch.equal(out, ref)
    assert all(s.static is not None for s in rt.sites.values())
    # the same blocks compressed during the decode (K: 16 -> 36 tokens, V: 8 -> 32), the same streams' bytes
    assert _reports(m) == _reports(ref_model)
    assert all(r["compressed_tokens_k"] == 36 and r["compressed_tokens_v"] == 32 for r in _reports(m).values())
    # 21 decode calls at positions 22..42; blocks are due at 23, 27, ..., 39 (K) and 23, 31, 39 (V): those run from
    # Python. 22 builds the state, 23 (a block step, state unchanged) proves the key, 24 is captured; at 39 the K
    # block passes the views' 32 tokens: a new state with views of 52 and 64 tokens (40 proves it, 41 captures)
    g = m._specache_graphs.stats()
    assert g == {"captured": 2, "replayed": 12, "eager_steps": 7, "kept": 1}, g
    site = next(iter(rt.sites.values()))
    st = site.static
    assert (st.kcap, st.vcap) == (52, 64)
    store = specache.stats(m)["store"]
    assert all(v["length"] == 22 + 21 and v["decode_steps"] == 21 for v in store.values())
    assert site.tier["k_rec"].length == 43 - 36 and site.tier["v_rec"].length == 43 - 32  # replays counted them


def test_block_steps_are_known_on_the_host():
    """fits() is the default path's cut rule, read from host counts: False exactly on a step that compresses."""
    pol = specache.runtime_of(_compile(hf_models.build("llama", layers=1))).policy
    tier = {"nk": 16, "nv": 8}  # after a 22-token prompt
    # the first step whose append completes a block past the recent rows: 16 + 4 + 4 - 1 (K), 8 + 8 + 8 - 1 (V)
    assert next(L for L in range(22, 64) if due(pol, tier, L) != (0, 0)) == 23
    assert due(pol, tier, 23) == (4, 8)
    assert due(pol, {"nk": 20, "nv": 16}, 27) == (4, 0) and due(pol, {"nk": 20, "nv": 16}, 26) == (0, 0)


# two compiles and 20 float64 steps over a hand loop (~10 s on 2 cores): in the slow set
@pytest.mark.slow
@torch.no_grad()
def test_static_steps_over_a_hand_loop_equal_the_default_paths_logits():
    """A hand-written loop over one StaticCache (positions given by the loop: a gpt-fast-style caller) equals the
    default path's logits over the same cache; a two-token call after the static steps is refused (no
    full-precision store to attend the earlier tokens), as the default path refuses it."""
    base = hf_models.build("llama", layers=2, seed=2).double()
    ids = _ids(21, 3)
    ref = greedy_over_static_cache(_compile(base, static=False), ids, 20, 64, refuse_more=True)
    m = _compile(base)
    got = greedy_over_static_cache(m, ids, 20, 64, refuse_more=True)
    # the attention accumulates in float32 over the views' unused (masked, zero-weight) entries too
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    rt = specache.runtime_of(m)
    assert rt.plain_static_steps == 20 * 2  # every step at both layers
    # a 64-position cache: the K views cover (64 - 4) // 4 * 4 = 60 tokens at most, V's 56
    st = next(iter(rt.sites.values())).static
    assert st.kcap <= 60 and st.vcap <= 56 and (st.rk, st.rv) == (8, 16)


@torch.no_grad()
def test_a_write_at_a_wrong_position_is_raised():
    """A static step writing anywhere but the next position (positions on the device: no host read to catch it) is
    flagged by the step and raised at the next check, not attended silently."""
    base = hf_models.build("llama", layers=2, seed=4)
    m = _compile(base)
    site = site_after_plain_steps(m, _ids(30, 5), 2)
    st = site.static
    assert isinstance(st, KVCompState) and st.fits(site)  # position 32 compresses nothing
    q = torch.zeros(1, 4, 1, site.head_dim)
    kv = torch.zeros(1, site.heads, 1, site.head_dim)
    out = st.step(site, q, kv, kv, torch.tensor([40]), torch.zeros(1, 1, 1, 64), 1.0)  # the next one is 32
    assert bool(st.bad) and torch.isfinite(out).all()
    with pytest.raises(CacheMismatch, match="other positions than the next one"):
        specache.stats(m)


def test_static_option_is_checked():
    base = hf_models.build("llama", layers=1)
    with pytest.raises(ValueError, match="static"):
        specache.compile(hf_models.twin(base), policy="kvcomp", policy_options={"static": "yes"})
    for value, static, required in (("auto", True, False), (True, True, True), (False, False, False)):
        pol = specache.runtime_of(specache.compile(hf_models.twin(base), policy="kvcomp",
                                                   policy_options={"static": value})).policy
        assert (pol.static, pol.static_required, pol.describe()["static"]) == (static, required, static)


def _fake_site(b, hkv, d):
    from specache_compile.runtime.store import Site

    cpu = torch.device("cpu")
    return Site("l0", b, hkv, d, d, torch.float32, cpu, cpu, pin=False, capacity=0, keep_full=False)


def static_against_default(steps=40, b=2, hkv=2, rep=4, d=32, n=21, cap=96, seed=6):
    """Fake sites in the runtime's call order: the static path's outputs and the default path's over the same
    tokens (batch 2, GQA 4, a left-padded row in the bias), with the default path's tier counts at each step."""
    from specache_compile.config import Config
    from specache_compile.policies.kvcomp import KVCompPolicy

    g = torch.Generator().manual_seed(seed)
    pols = [KVCompPolicy(Config(policy="kvcomp", policy_options=OPTS)) for _ in range(2)]
    sites = [_fake_site(b, hkv, d) for _ in range(2)]
    k, v = (torch.randn(b, hkv, n + steps, d, generator=g) for _ in range(2))
    for pol, site in zip(pols, sites):
        pol.reset(site)
        pol.append(site, k[:, :, :n], v[:, :, :n], 0)
        site._length = n
    (ps, ss), (pd, sd) = zip(pols, sites)
    pad = torch.zeros(b, 1, 1, cap)
    pad[1, ..., :3] = float("-inf")  # row 1 left-padded by 3 positions
    out, serials = [], set()
    for i in range(steps):
        L = n + i
        q = torch.randn(b, hkv * rep, 1, d, generator=g)
        kn, vn = k[:, :, L : L + 1], v[:, :, L : L + 1]
        bias = pad.masked_fill(torch.arange(cap) > L, float("-inf"))
        got = ps.decode_static(ss, q, kn, vn, torch.tensor([L]), bias, 0.2, 1, False)
        ss.count_static_steps(1, False)
        pd.append(sd, kn, vn, L)
        sd._length = L + 1
        want = pd.decode(sd, q, bias[..., : L + 1], 0, L + 1, 0.2)
        out.append((got, want, (sd.tier["nk"], sd.tier["nv"]), (ss.tier["nk"], ss.tier["nv"])))
        serials.add(ss.static.serial)
    ss.serials = serials  # the states the steps went through (a grown view is a new state)
    return out, ss


def test_static_steps_equal_the_default_decode_over_fake_sites():
    out, site = static_against_default()
    for got, want, counts, static_counts in out:
        assert static_counts == counts
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert out[-1][2][0] > 16 and out[-1][2][1] > 8  # blocks were compressed during the steps
    assert not bool(site.static.bad)
    assert len(site.serials) == 3  # the views grew twice (a new state each), mid-step
