"""KCache policy: keys on the device, values in the host store; each step fetches exactly the top-N value rows of the
exact softmax (GQA: by the group's mean probability) and weights them by their own probabilities."""

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
L = 30


def prefilled(topk, renormalize=True, dtype=torch.float32, seed=0):
    """A runtime whose site "s" holds an L-token prompt; its fetch() records the indices it is asked for."""
    rt = Runtime(Config(policy="kcache", topk=topk, policy_options={"renormalize": renormalize}))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    helpers.step(rt, q, k, v, L, causal=True)
    site = rt.sites["s"]
    asked = []
    fetch = site.fetch

    def recording_fetch(idx, *args, **kw):
        asked.append(idx.clone())
        return fetch(idx, *args, **kw)

    site.fetch = recording_fetch
    return rt, site, k, v, asked


def expected(q, k, v, bias, lo, n, renormalize):
    """(top-n positions [B, Hkv, n], output) computed from scratch: exact softmax over [lo, hi), GQA mean, top-n."""
    rep = HQ // HKV
    logits = torch.einsum("bhd,bhsd->bhs", q[:, :, 0].float(), k.float().repeat_interleave(rep, 1)) * helpers.SCALE
    p = torch.softmax(logits + bias[:, :, 0], dim=-1)  # [B, Hq, hi - lo]
    top = torch.topk(p.reshape(B, HKV, rep, -1).mean(2), n, dim=-1).indices.sort(-1).values  # [B, Hkv, n]
    w = p.gather(-1, top.repeat_interleave(rep, 1))
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    out = torch.einsum("bhn,bhnd->bhd", w, v.float().repeat_interleave(rep, 1).gather(
        2, top.repeat_interleave(rep, 1).unsqueeze(-1).expand(-1, -1, -1, D)))
    return top + lo, out.unsqueeze(2)


@pytest.mark.parametrize("renormalize", [True, False])
@torch.no_grad()
def test_fetches_exactly_the_topn_value_rows(renormalize):
    """Top-5 of 31..34 positions, with a padding bias on one batch row and, at the last step, a sliding window."""
    n = 5
    rt, site, k, v, asked = prefilled(n, renormalize)
    g = torch.Generator().manual_seed(1)
    ks, vs = [k], [v]
    for i, window in enumerate([None, None, 20]):
        total = L + i + 1
        qn, kn, vn = (torch.randn(B, h, 1, D, generator=g) for h in (HQ, HKV, HKV))
        ks.append(kn)
        vs.append(vn)
        base = total if window is None else window
        mask = torch.zeros(B, 1, 1, base)
        mask[1, ..., :4] = float("-inf")
        rows = site.stats.fetched_rows
        out = helpers.step(rt, qn, kn, vn, base, mask=mask)
        lo = total - base
        want_idx, want_out = expected(qn, torch.cat(ks, 2)[:, :, lo:], torch.cat(vs, 2)[:, :, lo:], mask, lo, n,
                                      renormalize)
        assert torch.equal(asked[-1], want_idx), (i, asked[-1], want_idx)
        assert site.stats.fetched_rows - rows == B * HKV * n  # the top-n values only, once per KV head
        assert (out - want_out).abs().max() <= 1e-5, i
    assert (asked[-1] >= L + 3 - 20).all()  # the sliding window's range only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
@torch.no_grad()
def test_exact_when_n_covers_the_context(dtype, renormalize):
    rt, site, k, v, asked = prefilled(L + 1, renormalize, dtype)
    g = torch.Generator().manual_seed(2)
    qn, kn, vn = (torch.randn(B, h, 1, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    out = helpers.step(rt, qn, kn, vn, L + 1)
    kk, vv = torch.cat([k, kn], 2).float(), torch.cat([v, vn], 2).float()
    ref = ops.sparse_attention(qn.float(), kk, vv, None, helpers.SCALE)
    assert out.dtype == dtype and (out.float() - ref).abs().max() <= (1e-6 if dtype == torch.float32 else 2e-2)
    assert asked[-1].shape[-1] == L + 1
    t = site.tier
    assert sorted(t) == ["fetch_v", "k"] and tuple(t["fetch_v"].shape) == (B, HKV, L + 1, D)  # no V on the device
    assert torch.equal(t["k"].view(), torch.cat([k, kn], 2))
    assert site.tier_bytes()["host"] >= 2 * B * HKV * (L + 1) * D * dtype.itemsize  # the full K and V


@pytest.mark.parametrize("overrides,field", [
    ({"policy_options": {"topn": 32}}, "topn"), ({"policy_options": {"renormalize": "yes"}}, "renormalize"),
    ({"policy_options": {"window": 8}}, "window"), ({"topk": 0}, "topk"),
])
def test_bad_options_raise(overrides, field):
    with pytest.raises(ValueError, match=field) as e:
        Runtime(Config(policy="kcache", **overrides))
    msg = str(e.value)
    assert "expected" in msg and "fix" in msg, msg


# ----------------------------------------------------------------------------------------------------------------------
# pass level
# ----------------------------------------------------------------------------------------------------------------------


def test_n_covering_context_matches_unmodified():
    got, want, st = helpers.llama_vs_unmodified("kcache", topk=64)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs
    assert st["bytes"]["host"] > 0  # the values (and keys) live in the host store


def test_small_n_fetches_n_rows_and_bounds_device_bytes():
    g = helpers.GPTFAST
    n, cap = 4, g["prefill"] + g["steps"]
    got, want, st = helpers.gptfast_vs_unmodified("kcache", topk=n, max_seq_len=cap)
    helpers.assert_evicted(got, want)
    heads = g["batch"] * g["heads"][1]
    for s in st["store"].values():
        assert s["fetched_rows"] == g["steps"] * heads * n  # N rows per KV head per step, nothing in the prefill
        # the module writes its cache by position (max_len 128): the static decode path's K at that cache's
        # capacity, fixed for the sequence, the N-row value buffer, a token counter and the columns 0..127 (int64)
        assert s["device"] == heads * (128 + n) * g["head_dim"] * 4 + 8 + 128 * 8
    # about half the full K and V at the same capacity (the store is reserved at the cache's)
    assert st["bytes"]["device"] < helpers.gptfast_kv_bytes(128) <= st["bytes"]["host"]
