"""The exact multi-query attention (kernels/attn_ops.exact_attention) over pieces of the query rows when an explicit
mask is large: a GPU runs out of memory in the one-call 128K prefill of the policies that keep no full-precision KV
(SDPA took the [1, 1, S, S] boolean mask as a 32 GiB bf16 bias)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import test_streaming as helpers  # noqa: E402
from numerics import FP32_REL, rel_err  # noqa: E402

from specache_compile.kernels import attn_ops, ops  # noqa: E402


def _inputs(mask_kind):
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 4, 2, 37, 16
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[1, :5] = False  # a left-padded row
    mask = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, S, S]
    mask[1, 0, :5, 0] = True  # padded query rows attend one token (no all-masked row)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return q, k, v, mask


def _sdpa_query_rows(monkeypatch) -> list[int]:
    """The query rows of every SDPA call from now on, in order."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(a[0].shape[2])
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_pieces_of_query_rows_equal_one_sdpa_call(monkeypatch, mask_kind):
    q, k, v, mask = _inputs(mask_kind)
    want = attn_ops.exact_attention(q, k, v, mask, False, 0.25)
    calls = _sdpa_query_rows(monkeypatch)
    monkeypatch.setattr(attn_ops, "EXACT_MASK_ELEMS", 2 * 37 * 8)  # 8 query rows of both batch rows a piece
    got = attn_ops.exact_attention(q, k, v, mask, False, 0.25)
    assert calls == [8, 8, 8, 8, 5]
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_small_or_broadcast_masks_take_one_call(monkeypatch):
    q, k, v, mask = _inputs("bool")
    calls = _sdpa_query_rows(monkeypatch)
    attn_ops.exact_attention(q, k, v, mask, False, 0.25)  # under the limit
    monkeypatch.setattr(attn_ops, "EXACT_MASK_ELEMS", 16)
    attn_ops.exact_attention(q, k, v, None, True, 0.25)  # no mask
    attn_ops.exact_attention(q, k, v, mask[:, :, -1:], False, 0.25)  # one mask row for every query row
    assert calls == [37, 37, 37]


@pytest.mark.parametrize("policy", ["streaming", "quant"])
def test_one_call_prefill_in_pieces_matches_the_unmodified_model(monkeypatch, policy):
    """The policies that prefill in one call, with pieces of a few rows: the prefill's logits stay exact, and with a
    budget covering the context the decode steps too (streaming); quant's decode is lossy, so its prefill only."""
    monkeypatch.setattr(attn_ops, "EXACT_MASK_ELEMS", 64)
    pieces, inside = [], []
    real_sdpa, real_exact = torch.nn.functional.scaled_dot_product_attention, ops.exact_attention

    def sdpa(*a, **kw):
        if inside:
            pieces.append(a[0].shape[2])
        return real_sdpa(*a, **kw)

    def exact(q, *a):
        inside.append(q.shape[2])
        try:
            return real_exact(q, *a)
        finally:
            inside.pop()

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(ops, "exact_attention", exact)  # the runtime's call (ops.exact_attention) goes through it
    options = {"budget": max(helpers.PROMPT) + helpers.STEPS} if policy == "streaming" else {}
    got, want, _ = helpers.llama_vs_unmodified(policy, policy_options=options)
    assert pieces and max(pieces) < max(helpers.PROMPT)  # the prefill really ran in pieces of a few query rows
    assert rel_err(got[0], want[0]) <= FP32_REL
    if policy == "streaming":
        errs = [rel_err(g, w) for g, w in zip(got, want)]
        assert max(errs) <= FP32_REL, errs
