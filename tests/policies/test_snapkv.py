"""SnapKV policy: the observation window's votes pick the kept prefix tokens, per KV head and batch row.

Keys planted so that the window's queries match them strongly must be exactly what is kept; pooling must keep a
hit's neighbours; padding must rank last; decode must attend over the kept rows and the new tokens only.
"""

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
L, W = 40, 4  # prompt, observation window


def planted_prompt(plants, seed=0):
    """q, k, v for an L-token prompt where the window's queries of KV group h in batch row b match the keys planted
    at plants[b][h] (a strong shared direction per planted key), and everything else is small noise."""
    g = torch.Generator().manual_seed(seed)
    q = 0.1 * torch.randn(B, HQ, L, D, generator=g)
    k = 0.1 * torch.randn(B, HKV, L, D, generator=g)
    v = torch.randn(B, HKV, L, D, generator=g)
    rep = HQ // HKV
    for b, per_head in enumerate(plants):
        for h, positions in enumerate(per_head):
            for p in positions:
                d = torch.randn(D, generator=g)
                d = 6 * d / d.norm()
                k[b, h, p] = d
                q[b, h * rep : (h + 1) * rep, L - W :] += d
    return q, k, v


def kept_positions(rt):
    return rt.sites["s"].tier["pos"].view()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@torch.no_grad()
def test_keeps_the_planted_tokens_per_head_and_batch_row(dtype):
    plants = [[[3, 17, 25], [8, 9, 30]], [[0, 22, 31], [5, 14, 35]]]
    rt = Runtime(Config(policy="snapkv", policy_options={"budget": W + 3, "window": W, "kernel": 1}))
    q, k, v = (x.to(dtype) for x in planted_prompt(plants))
    helpers.step(rt, q, k, v, L, causal=True)
    pos = kept_positions(rt)
    for b in range(B):
        for h in range(HKV):
            assert pos[b, h].tolist() == sorted(plants[b][h]) + list(range(L - W, L)), (b, h)
    t = rt.sites["s"].tier
    idx = pos.unsqueeze(-1).expand(-1, -1, -1, D)
    assert torch.equal(t["k"].view(), k.gather(2, idx)) and torch.equal(t["v"].view(), v.gather(2, idx))


@pytest.mark.parametrize("pooling", ["max", "avg"])
@torch.no_grad()
def test_pooling_keeps_the_neighbours_of_a_hit(pooling):
    """One planted key at 20 and a 3-token budget beyond the window: the kernel-3 pool spreads its votes to 19 and 21,
    which outrank every other prefix token."""
    rt = Runtime(Config(policy="snapkv", policy_options={"budget": W + 3, "window": W, "kernel": 3,
                                                         "pooling": pooling}))
    q, k, v = planted_prompt([[[20], [20]], [[20], [20]]])
    helpers.step(rt, q, k, v, L, causal=True)
    assert (kept_positions(rt)[..., :3] == torch.tensor([19, 20, 21])).all()


@torch.no_grad()
def test_padding_ranks_last():
    """Batch row 1 is left-padded by 20 and its real prefix (positions 20..L-W-1) is exactly the budget: every real
    token is kept and no padding column, although max-pooling hands the padding next to the strong key at 20 that
    key's votes (and the strong keys planted inside the padding are masked)."""
    n_pad = 20
    n_keep = L - W - n_pad
    q, k, v = planted_prompt([[[], []], [[2, 5, 20], [7, 11, 20]]])
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    mask[1, :, :, :n_pad] = False
    rt = Runtime(Config(policy="snapkv", policy_options={"budget": W + n_keep, "window": W, "kernel": 7,
                                                         "pooling": "max"}))
    helpers.step(rt, q, k, v, L, mask=mask)
    assert (kept_positions(rt)[1] == torch.arange(n_pad, L)).all()


@torch.no_grad()
def test_decode_attends_kept_rows_and_new_tokens():
    """After the prefill, decode attends the kept rows plus every new token; on a sliding-window layer (lo > 0) only
    those inside [lo, hi)."""
    plants = [[[3, 17, 25], [8, 9, 30]], [[0, 22, 31], [5, 14, 35]]]
    rt = Runtime(Config(policy="snapkv", policy_options={"budget": W + 3, "window": W, "kernel": 1}))
    q, k, v = planted_prompt(plants)
    helpers.step(rt, q, k, v, L, causal=True)
    g = torch.Generator().manual_seed(1)
    ks, vs = [k], [v]
    for i, window in enumerate([None, None, 30, 12]):  # the last two: a sliding window, lo = n - window
        n = L + i + 1
        qn, kn, vn = (torch.randn(B, h, 1, D, generator=g) for h in (HQ, HKV, HKV))
        ks.append(kn)
        vs.append(vn)
        base = n if window is None else window
        out = helpers.step(rt, qn, kn, vn, base)
        lo = n - base
        kk, vv = torch.cat(ks, 2), torch.cat(vs, 2)
        for b in range(B):
            for h in range(HKV):
                kept = [p for p in sorted(plants[b][h]) + list(range(L - W, n)) if p >= lo]
                ref = ops.sparse_attention(qn[b : b + 1, 2 * h : 2 * h + 2], kk[b : b + 1, h : h + 1, kept],
                                           vv[b : b + 1, h : h + 1, kept], None, helpers.SCALE)
                assert (out[b : b + 1, 2 * h : 2 * h + 2] - ref).abs().max() <= 1e-6, (i, b, h)
    assert kept_positions(rt).shape[-1] == W + 3 + 4  # new tokens are always kept


@pytest.mark.parametrize("options,field", [
    ({"budget": 0}, "budget"), ({"budget": 2.0}, "budget"), ({"window": 0}, "window"), ({"kernel": 4}, "kernel"),
    ({"kernel": 0}, "kernel"), ({"pooling": "median"}, "pooling"), ({"sinks": 4}, "sinks"),
])
def test_bad_options_raise(options, field):
    with pytest.raises(ValueError, match=field) as e:
        Runtime(Config(policy="snapkv", policy_options=options))
    msg = str(e.value)
    assert "expected" in msg and "fix" in msg, msg


def test_window_from_config_or_options():
    assert Runtime(Config(policy="snapkv")).policy.window == 32  # the paper's, not Config.window's 64
    assert Runtime(Config(policy="snapkv", window=16)).policy.window == 16
    assert Runtime(Config(policy="snapkv", policy_options={"window": 8})).policy.window == 8


# ----------------------------------------------------------------------------------------------------------------------
# pass level
# ----------------------------------------------------------------------------------------------------------------------


def test_covering_budget_matches_unmodified():
    got, want, _ = helpers.llama_vs_unmodified("snapkv", "mistral",
                                               policy_options={"budget": max(helpers.PROMPT), "window": 4})
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs


def test_small_budget_evicts_and_bounds_device_bytes():
    budget = 12
    g = helpers.GPTFAST
    got, want, st = helpers.gptfast_vs_unmodified("snapkv", policy_options={"budget": budget, "window": 4},
                                          max_seq_len=g["prefill"] + g["steps"])
    helpers.assert_evicted(got, want)
    # the budget after the prompt, then the static decode path's slots for the tokens to come (the module writes its
    # cache by position): 16 at least, more than the 6 steps
    kept = budget + 16
    # K, V and an int64 position per kept row per KV head, per layer, and the static path's token counter (an int64)
    assert st["bytes"]["device"] == (helpers.gptfast_kv_bytes(kept) + g["layers"] * g["batch"] * g["heads"][1] * kept
                                     * 8 + g["layers"] * 8)
    static = helpers.gptfast_vs_unmodified("snapkv", policy_options={"budget": budget, "window": 4, "static": False},
                                           max_seq_len=g["prefill"] + g["steps"])[2]
    # the default path (grown by one row a step, max_seq_len: allocated once, exactly): the budget and the new tokens
    assert static["bytes"]["device"] == (helpers.gptfast_kv_bytes(budget + g["steps"]) + g["layers"] * g["batch"]
                                         * g["heads"][1] * (budget + g["steps"]) * 8)
    assert st["bytes"]["device"] < helpers.gptfast_kv_bytes(g["prefill"] + g["steps"]) and st["bytes"]["host"] == 0
    for s in st["store"].values():
        assert s["length"] == g["prefill"] + g["steps"]
