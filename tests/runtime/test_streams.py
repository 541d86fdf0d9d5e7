"""The stream manager and speculative decoding, with CUDA absent: the bookkeeping is the same code as on the GPU
(the side stream and its events are the only parts skipped), so these tests cover the protocol itself."""

from __future__ import annotations

import hf_models
import pytest
import torch

import specache
from specache_compile.runtime.runtime import SPECULATIVE, CacheMismatch
from specache_compile.runtime.store import Site
from specache_compile.runtime.streams import Prefetch, Streams, overlap_count


def _site(length=40, b=2, h=2, d=8):
    site = Site("s", b, h, d, d, torch.float32, torch.device("cpu"), torch.device("cpu"), pin=False)
    k = torch.randn(b, h, length, d)
    site.write(0, k, k + 1000)
    return site, k


def test_prefetch_alternates_slots_and_returns_what_was_issued():
    site, k = _site()
    pf = Prefetch.allocate(Streams(), 2, 2, 4, 8, 8, torch.float32, torch.device("cpu"))
    idx = torch.tensor([3, 7, 11, 20]).expand(2, 2, 4)
    pf.issue(site, idx)
    assert pf.pending[0] == 0 and pf.next_slot == 1
    got_idx, gk, gv = pf.take()
    assert torch.equal(got_idx, idx)
    assert torch.equal(gk, k[:, :, [3, 7, 11, 20]]) and torch.equal(gv, k[:, :, [3, 7, 11, 20]] + 1000)
    assert gk.data_ptr() == pf.slots_k[0].data_ptr()  # slot 0 was filled
    assert pf.take() is None  # consumed once
    # the next issue goes to the other slot: the one attention may still be reading is never a target
    pf.issue(site, idx[..., :2])
    assert pf.pending[0] == 1
    # an on-demand fetch takes the slot no fetch in flight targets, and drops the pending one
    free_k, _ = pf.free_slot()
    assert free_k.data_ptr() == pf.slots_k[0].data_ptr()
    assert pf.pending is None
    assert (pf.stats.issued, pf.stats.consumed, pf.stats.dropped) == (2, 1, 1)


def test_prefetch_replaced_before_use_counts_as_dropped():
    site, _ = _site()
    pf = Prefetch.allocate(Streams(), 2, 2, 4, 8, 8, torch.float32, torch.device("cpu"))
    pf.issue(site, torch.zeros(2, 2, 4, dtype=torch.long))
    pf.issue(site, torch.ones(2, 2, 4, dtype=torch.long))
    idx, _, _ = pf.take()
    assert bool((idx == 1).all()) and pf.stats.dropped == 1


def test_overlap_count():
    real = torch.tensor([[[1, 2, 3, 4]], [[5, 6, 7, 8]]])
    pred = torch.tensor([[[4, 3, 9, 10]], [[8, 0, 1, 2]]])
    assert int(overlap_count(real, pred)) == 3


def _prompt(b=2, s=150, pad=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, hf_models.VOCAB, (b, s), generator=g)
    mask = torch.ones_like(ids)
    mask[b - 1, :pad] = 0 if b > 1 else 1
    return ids, mask


@pytest.mark.parametrize("speculative", [True, False])
def test_generate_equals_greedy_when_topk_covers_the_context(speculative):
    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt()
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    m = specache.compile(hf_models.twin(base), topk=512, window=16, group_size=16)
    out = specache.generate(m, ids, 12, attention_mask=mask, speculative=speculative)
    assert torch.equal(out, ref)
    st = next(iter(specache.stats(m)["store"].values()))
    # every real token but the last is stored; the speculative ones never are
    assert st["length"] == ids.shape[1] + 11
    assert st["decode_steps"] == 11


def test_generate_speculative_prefetches_every_step_and_reports_hits():
    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt(s=300)
    m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16,
                         policy_options={"hit_every": 1})
    specache.generate(m, ids, 10, attention_mask=mask)
    for st in specache.stats(m)["store"].values():
        # pre-decoding issues the first prefetch; each of the 9 steps consumes one and issues the next
        assert (st["prefetch_issued"], st["prefetch_consumed"], st["prefetch_dropped"]) == (10, 9, 0)
        assert st["prefetch_sampled"] == 9 * 2 * 2 * 8  # steps x batch x KV heads x topk
        assert 0 <= st["prefetch_hits"] <= st["prefetch_sampled"]
        assert st["fetched_rows"] == 10 * 2 * 2 * 8  # only prefetches: no on-demand fetch in speculative mode


@pytest.mark.slow  # two compiles and a chunked prefill of a batch of 200-token prompts: ~10 s on 2 cores
def test_generate_chunked_prefill_equals_one_call():
    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt(s=200)
    outs = []
    for chunk in (None, 64):
        torch._dynamo.reset()
        m = specache.compile(hf_models.twin(base), topk=16, window=16, group_size=16)
        outs.append(specache.generate(m, ids, 8, attention_mask=mask, prefill_chunk=chunk))
    assert torch.equal(outs[0], outs[1])


def test_generate_with_static_cache_checks_the_positions():
    from transformers import StaticCache

    base = hf_models.build("llama", layers=2)
    ids, _ = _prompt(b=1, s=60)
    ref = base.generate(ids, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    m = specache.compile(hf_models.twin(base), topk=512, window=16, group_size=16)
    cache = StaticCache(config=m.config, max_cache_len=128)
    out = specache.generate(m, ids, 8, past_key_values=cache)
    assert torch.equal(out, ref)
    # a decode step written past the next position: positions on the host are read at once (no sync to avoid);
    # on CUDA the check runs on the device and raises at the next sync point (check_deferred)
    tok = out[:, -1:]
    for layer in cache.layers:  # transformers 5.2x writes at its own counter, 5.1x at cache_position: move both
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.add_(5)
    n = ids.shape[1] + 8 + 5
    with torch.no_grad(), pytest.raises(CacheMismatch, match="expected at most the next position"):
        m(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=torch.tensor([n]),
          position_ids=torch.tensor([[n]]))


def test_speculative_step_refused_for_a_policy_without_it():
    base = hf_models.build("llama", layers=2)
    ids, _ = _prompt(b=1, s=40)
    m = specache.compile(hf_models.twin(base), policy="full")
    out = m(input_ids=ids, use_cache=True)
    runtime = specache.runtime_of(m)
    with runtime.stepping(SPECULATIVE), pytest.raises(CacheMismatch, match="does not decode speculatively"):
        m(input_ids=ids[:, :2], past_key_values=out.past_key_values, use_cache=True)
    # specache.generate simply decodes without speculation for such a policy
    torch._dynamo.reset()
    m2 = specache.compile(hf_models.twin(base), policy="full")
    assert specache.generate(m2, ids, 4).shape == (1, 4)
    with pytest.raises(ValueError, match="step mode"):
        with runtime.stepping("sideways"):
            pass


@pytest.mark.slow  # the trained model, a 500-token prompt, compiled twice: ~15 s on 2 cores
def test_miss_rule_fetch_brings_what_the_prefetch_missed(tiny_model):
    """On the trained model the speculative row predicts part of the real top-k; miss_rule='fetch' adds the rest on
    demand, so the real rows attend over a superset of their own top-k: less attention error than the paper's
    low-bit rule, and on-demand fetches appear in the accounting."""
    import copy

    base = tiny_model  # tests/conftest.py: loaded once per process; compiled below only as deep copies
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 2000, (1, 500), generator=g)
    errs, rows = {}, {}
    for rule in ("lowbit", "fetch"):
        torch._dynamo.reset()
        m = specache.compile(copy.deepcopy(base), measure_error=True, policy_options={"miss_rule": rule})
        specache.generate(m, ids, 8)
        e = specache.attention_error(m)
        errs[rule] = sum(v["mean"] for v in e.values()) / len(e)
        rows[rule] = sum(s["fetched_rows"] for s in specache.stats(m)["store"].values())
    assert errs["fetch"] < errs["lowbit"]
    assert rows["fetch"] > rows["lowbit"]  # the misses (and the -1 placeholders' clamped rows) came on demand
    with pytest.raises(ValueError, match="miss_rule"):
        specache.compile(copy.deepcopy(base), policy_options={"miss_rule": "guess"})


def test_generate_suppress_tokens_never_emits_them():
    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt(s=60)
    m = specache.compile(hf_models.twin(base), topk=512, window=16, group_size=16)
    free = specache.generate(m, ids, 10, attention_mask=mask)
    banned = sorted(set(free[:, :3].flatten().tolist()))  # tokens it did pick, to make the mask bite
    out = specache.generate(m, ids, 10, attention_mask=mask, suppress_tokens=banned)
    assert not any(t in banned for t in out.flatten().tolist())


# three compiles per case (~12 s on 2 cores): the speculative one (the harness's) stays in the fast set
@pytest.mark.parametrize("speculative", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_generate_forced_tokens_predicts_each_next_token_of_the_forced_history(speculative):
    """Teacher forcing: step i feeds forced[:, i] and returns the model's prediction of the token after it. With top-k
    covering the context the predictions are the unmodified model's on the same history; fed its own free-running
    output, a top-8 model returns that output unchanged (the forcing adds nothing of its own)."""
    from transformers import DynamicCache

    from specache_compile.generate import _positions

    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt()
    forced = torch.randint(2, hf_models.VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    want, cache, m_ = [], DynamicCache(), mask
    with torch.no_grad():
        x = ids
        for i in range(10):
            out = base(input_ids=x, attention_mask=m_, position_ids=_positions(m_)[:, -x.shape[1] :],
                       past_key_values=cache, use_cache=True)
            want.append(out.logits[:, -1].argmax(-1, keepdim=True))
            x, m_ = forced[:, i : i + 1], torch.cat([m_, torch.ones_like(mask[:, :1])], dim=1)
    want = torch.cat(want, dim=1)
    assert not torch.equal(want, forced)  # the forced tokens are not the model's own
    m = specache.compile(hf_models.twin(base), topk=512, window=16, group_size=16)
    got = specache.generate(m, ids, 10, attention_mask=mask, speculative=speculative, forced_tokens=forced)
    assert torch.equal(got, want)

    torch._dynamo.reset()
    m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16)
    free = specache.generate(m, ids, 10, attention_mask=mask, speculative=speculative)
    torch._dynamo.reset()
    m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16)
    assert torch.equal(specache.generate(m, ids, 10, attention_mask=mask, speculative=speculative,
                                         forced_tokens=free), free)


def test_generate_forced_tokens_bad_input():
    base = hf_models.build("llama", layers=1)
    ids, mask = _prompt(s=40)
    m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16)
    with pytest.raises(ValueError, match=r"forced_tokens expected shape \(2, 5\)"):
        specache.generate(m, ids, 5, attention_mask=mask, forced_tokens=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="got list"):
        specache.generate(m, ids, 5, attention_mask=mask, forced_tokens=[[1] * 5] * 2)
    with pytest.raises(ValueError, match="forced_tokens expected with cuda_graph=False"):
        specache.generate(m, ids, 5, attention_mask=mask, cuda_graph=True, forced_tokens=torch.zeros(2, 5).long())


def test_attention_error_covers_the_current_sequence():
    """The accuracy harness's attn_rel_error row of a context reads the errors after that context's agreement run:
    they must be that sequence's alone, not a running mean over the runner's earlier sequences."""
    base = hf_models.build("llama", layers=2)
    ids, mask = _prompt(s=120)
    m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16, measure_error=True)
    specache.generate(m, ids, 6, attention_mask=mask, speculative=False)
    first = specache.attention_error(m)
    assert first and all(e["steps"] == 5 for e in first.values())  # 5 decode steps after the prefill's token
    specache.generate(m, ids[:, :80], 4, attention_mask=mask[:, :80], speculative=False)
    assert all(e["steps"] == 3 for e in specache.attention_error(m).values())
    specache.generate(m, ids, 6, attention_mask=mask, speculative=False)
    again = specache.attention_error(m)
    assert all(again[n]["steps"] == 5 and abs(again[n]["mean"] - first[n]["mean"]) < 1e-9 for n in first)
