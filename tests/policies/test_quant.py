"""quant policy (KIVI low-bit cache on the device): the stored copy is within the quantizer's bound of the real KV,
and decode is exactly attention over the dequantized copy with the full-precision window (and sinks) substituted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers and the tolerance table
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/policies: the pass-level helpers
import test_streaming as helpers  # noqa: E402
from numerics import FP32_REL, rel_err  # noqa: E402

from specache_compile.config import Config  # noqa: E402
from specache_compile.kernels import ops  # noqa: E402
from specache_compile.runtime.runtime import Runtime  # noqa: E402

B, HQ, HKV, D = 2, 4, 2, 16
L, GROUP, WINDOW = 37, 8, 8


def prompt(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to(dtype) for h in (HQ, HKV, HKV)]


def levels_step(x, bits, dim):
    """The quantizer's step s over each group of x (groups reduced along dim): its error bound is s / 2."""
    span = x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)
    return span / 2 if bits == 1 else span / (2**bits - 1)


@pytest.mark.parametrize("bits", [1, 2, 4])
@torch.no_grad()
def test_roundtrip_within_the_quantizer_bound(bits):
    rt = Runtime(Config(policy="quant", bits=bits, group_size=GROUP, window=WINDOW))
    q, k, v = prompt()
    helpers.step(rt, q, k, v, L, causal=True)
    site = rt.sites["s"]
    nq = site.tier["nq"]
    assert nq == (L - WINDOW) // GROUP * GROUP > 0  # whole groups past the window are low-bit, the rest is not
    k_hat, v_hat = rt.policy._dequant_range(site, 0, nq, torch.float32)
    kg = k[:, :, :nq].reshape(B, HKV, nq // GROUP, GROUP, D)  # keys: per channel over GROUP tokens
    k_bound = levels_step(kg, bits, dim=3).expand_as(kg).reshape(B, HKV, nq, D) / 2
    vg = v[:, :, :nq].reshape(B, HKV, nq, D // GROUP, GROUP)  # values: per token over GROUP channels
    v_bound = levels_step(vg, bits, dim=4).expand_as(vg).reshape(B, HKV, nq, D) / 2
    k_err, v_err = (k_hat - k[:, :, :nq]).abs(), (v_hat - v[:, :, :nq]).abs()
    assert (k_err <= k_bound * (1 + 1e-5) + 1e-6).all() and (v_err <= v_bound * (1 + 1e-5) + 1e-6).all()
    assert k_err.max() > 0  # really quantized
    t = site.tier
    assert torch.equal(t["win_k"].view(), k[:, :, nq:]) and torch.equal(t["win_v"].view(), v[:, :, nq:])
    assert site.tier_bytes()["host"] == 0 and "prefetch" not in t  # no host copy, no fetch slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_decode_equals_attention_over_the_dequantized_copy(dtype):
    """Sinks and window in full precision, [sinks, nq) through the dequantized copy; on a sliding-window layer
    (lo > 0) and under a bias that masks one batch row's first columns."""
    sinks = 2
    rt = Runtime(Config(policy="quant", bits=2, group_size=GROUP, window=WINDOW, sinks=sinks))
    q, k, v = prompt(dtype=dtype)
    helpers.step(rt, q, k, v, L, causal=True)
    site = rt.sites["s"]
    g = torch.Generator().manual_seed(1)
    ks, vs = [k], [v]
    for i, window in enumerate([None, None, 30, 20]):
        n = L + i + 1
        qn, kn, vn = (torch.randn(B, h, 1, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
        ks.append(kn)
        vs.append(vn)
        base = n if window is None else window
        mask = torch.zeros(B, 1, 1, base)
        mask[1, ..., :3] = float("-inf")
        out = helpers.step(rt, qn, kn, vn, base, mask=mask)
        lo, nq = n - base, site.tier["nq"]
        k_hat, v_hat = rt.policy._dequant_range(site, 0, nq, torch.float32)
        kk, vv = torch.cat(ks, 2).float(), torch.cat(vs, 2).float()
        k_mix = torch.cat([kk[:, :, :sinks], k_hat[:, :, sinks:], kk[:, :, nq:]], dim=2)
        v_mix = torch.cat([vv[:, :, :sinks], v_hat[:, :, sinks:], vv[:, :, nq:]], dim=2)
        ref = ops.sparse_attention(qn.float(), k_mix[:, :, lo:], v_mix[:, :, lo:], mask, helpers.SCALE)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert out.dtype == dtype and (out.float() - ref).abs().max() <= tol, (i, lo)


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"unknown policy_options \['budget'\].*expected.*fix"):
        Runtime(Config(policy="quant", policy_options={"budget": 64}))
    with pytest.raises(ValueError, match="bits"):
        Config(policy="quant", bits=3)


# ----------------------------------------------------------------------------------------------------------------------
# pass level
# ----------------------------------------------------------------------------------------------------------------------


def test_window_covering_context_matches_unmodified():
    """Nothing leaves the full-precision window: exact."""
    window = max(helpers.PROMPT) + helpers.STEPS
    got, want, st = helpers.llama_vs_unmodified("quant", window=window, group_size=4, bits=2)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs
    assert st["bytes"]["host"] == 0


def test_small_window_quantizes_and_bounds_device_bytes():
    g = helpers.GPTFAST
    bits, group, window, prefill = 2, 16, 4, 120  # a longer prompt: KIVI's per-group overhead amortised
    cap = prefill + g["steps"]
    got, want, st = helpers.gptfast_vs_unmodified("quant", prefill=prefill, bits=bits, group_size=group, window=window,
                                          max_seq_len=cap)
    helpers.assert_evicted(got, want)  # the low-bit copy really is used
    heads, d = g["layers"] * g["batch"] * g["heads"][1], g["head_dim"]
    rows = lambda n: max(n, 64)  # Growable.reserve allocates at least 64 rows the first time
    low = rows(cap) * 2 * d * bits // 8  # K and V codes
    low += rows(-(-cap // group)) * 2 * d * 4 + rows(cap) * 2 * (d // group) * 4  # scale and zero, fp32
    win = (window + group) * 2 * d * 4  # the full-precision window (K, V), allocated once
    assert st["bytes"]["device"] == heads * (low + win)
    assert st["bytes"]["device"] < helpers.gptfast_kv_bytes(cap) and st["bytes"]["host"] == 0


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_static_path_equals_the_default_path(batch):
    """policy_options static=True: SpeCache's static path without the fetch (the copy and the ring at the cache's
    capacity, lengths on the device) gives the default path's tokens over 40 steps that quantize groups; nothing is
    written to the host; the decode steps replay (capture=False stands in for a CUDA graph on the CPU)."""
    import hf_models

    import specache

    base = hf_models.build("llama", seed=0, layers=2).double()
    ids = torch.randint(3, 128, (batch, 150), generator=torch.Generator().manual_seed(1))
    outs, graphs = [], None
    for static in (False, True):
        torch._dynamo.reset()
        m = specache.compile(hf_models.twin(base), policy="quant", window=16, group_size=16,
                             policy_options={"static": static})
        graphs = m._specache_graphs
        graphs.capture = False
        outs.append(m.generate(ids, max_new_tokens=40, do_sample=False, cache_implementation="specache"))
        sites = specache.runtime_of(m).sites.values()
        assert all((s.static is not None) == static for s in sites)
        assert specache.memory(m)["host"] == 0
    assert torch.equal(outs[0], outs[1])
    assert graphs.stats()["replayed"] == 40 - 1 - 3


def test_static_is_auto_by_default():
    from specache_compile.policies import registered

    def quant(**opts):
        return registered()["quant"].from_config(Config(policy="quant", group_size=16, window=16,
                                                        policy_options=opts))

    assert quant().static and not quant().static_required and quant(static=True).static_required
    assert not quant(static=False).static
    # "auto" steps aside where the options need what the static path does not do (sinks)
    assert not registered()["quant"].from_config(Config(policy="quant", sinks=4, group_size=16, window=16)).static
    with pytest.raises(ValueError, match="quant policy: policy_options\\['static'\\]=True does not support sinks"):
        registered()["quant"].from_config(Config(policy="quant", sinks=4, group_size=16, window=16,
                                                 policy_options={"static": True}))
    with pytest.raises(ValueError, match="expected True, False or 'auto'"):
        quant(static="yes")
