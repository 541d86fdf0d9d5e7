"""bench/decode.py's profile-based fetch measure (what the decode rows report as exposed fetch for graph replays)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.decode import fetch_overlap  # noqa: E402


def test_fetch_alone_is_exposed_and_overlapped_fetch_is_not():
    kernels = [
        ("attention", 0.0, 10.0),
        ("gather_rows_kernel", 5.0, 15.0),  # 5 us under the attention, 5 us alone
        ("mlp", 20.0, 30.0),
        ("gather_rows_kernel", 22.0, 28.0),  # entirely under the mlp
        ("Memcpy HtoD (Pinned -> Device)", 40.0, 43.0),  # alone
    ]
    got = fetch_overlap(kernels)
    assert got == {"fetch_busy_us": 10.0 + 6.0 + 3.0, "exposed_us": 5.0 + 0.0 + 3.0}


def test_overlapping_kernels_are_counted_once():
    # two fetches on two streams over one span, covered by two compute kernels that touch: no double counting
    kernels = [
        ("gather_rows_kernel", 0.0, 8.0),
        ("gather_rows_kernel", 2.0, 10.0),
        ("scores", 1.0, 4.0),
        ("select", 4.0, 6.0),
        ("attention", 5.0, 7.0),
    ]
    got = fetch_overlap(kernels)
    assert got["fetch_busy_us"] == pytest.approx(10.0)
    assert got["exposed_us"] == pytest.approx(10.0 - 6.0)  # compute covers [1, 7]


def test_no_fetch_and_no_compute():
    assert fetch_overlap([("mlp", 0.0, 4.0)]) == {"fetch_busy_us": 0, "exposed_us": 0}
    assert fetch_overlap([("gather_rows_kernel", 1.0, 4.0)]) == {"fetch_busy_us": 3.0, "exposed_us": 3.0}


def test_one_compute_kernel_covers_several_fetches():
    kernels = [("attention", 0.0, 100.0), ("gather_rows_kernel", 10.0, 20.0), ("gather_rows_kernel", 30.0, 40.0),
               ("gather_rows_kernel", 95.0, 110.0)]
    assert fetch_overlap(kernels) == {"fetch_busy_us": 35.0, "exposed_us": 10.0}


def test_full_flash_decodes_the_same_tokens_as_full():
    """bench/decode.py's full-flash baseline: SDPA over the written positions only, no mask, GQA left to SDPA. Its
    greedy tokens and logits equal transformers' SDPA attention over the whole StaticCache with its mask."""
    import torch
    from transformers import StaticCache

    from bench.decode import _exact_len_attention, _use_attention, build, greedy, shared_copy

    torch.manual_seed(0)
    base = build(tiny=True, device="cpu", layers=2)
    flash = shared_copy(base)
    kv_lens = []

    def attention(*args, **kwargs):  # the exact-length path must really run: record what reaches it
        kv_lens.append(kwargs.get("kv_len"))
        return _exact_len_attention(*args, **kwargs)

    _use_attention(flash, "sdpa_exact_len_test", attention)
    ids = torch.randint(3, base.config.vocab_size, (2, 40))
    logits = {}
    for name, m in (("full", base), ("flash", flash)):
        cache = StaticCache(config=m.config, max_cache_len=64)
        seen = []

        def fwd(m=m, seen=seen, **kw):
            out = m(**kw)
            seen.append(out.logits)
            return out

        greedy(m.forward, fwd, ids, cache, 8, 16, lambda i: None, pass_kv_len=name == "flash")
        logits[name] = torch.cat(seen, 1)
    assert logits["full"].shape == (2, 7, base.config.vocab_size)
    assert torch.allclose(logits["flash"], logits["full"], atol=1e-5, rtol=1e-5)
    assert torch.equal(logits["flash"].argmax(-1), logits["full"].argmax(-1))
    # 3 prefill chunks without kv_len, then 7 decode steps with the written length, in each of the 2 layers
    assert kv_lens == [None] * 6 + [n for n in range(41, 48) for _ in range(2)]


def test_top_kernels_ranks_by_time_per_step():
    from bench.decode import top_kernels

    events = [("copy", 300.0, 6), ("gemv", 1200.0, 64), ("idle", 0.0, 3), ("softmax", 500.0, 32)]
    top = top_kernels(events, steps=2, n=2)
    assert [t["kernel"] for t in top] == ["gemv", "softmax"]
    assert top[0]["ms"] == 0.6 and top[0]["calls"] == 32 and top[0]["share"] == 1200.0 / 2000.0
    assert top_kernels([], steps=1) == []
