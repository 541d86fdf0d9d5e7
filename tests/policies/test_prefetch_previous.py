"""SpeCache's previous-query prefetch under model.generate (policy_options prefetch="previous";
policies/specache_static.py): a plain one-token static step attends with the rows the previous step's query chose,
prefetched during that step, and ranks for the next step in the same pass. CPU, decode graphs emulated
(capture=False: tests/runtime/test_decode_graphs.py)."""

from __future__ import annotations

import hf_models
import pytest
import torch

import specache


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _compile(base, topk, **opts):
    m = specache.compile(hf_models.twin(base), topk=topk, window=16, group_size=16,
                         policy_options={"prefetch": "previous", "hit_every": 1, **opts})
    m._specache_graphs.capture = False
    return m


@torch.no_grad()
def test_a_covering_topk_equals_the_unmodified_model_and_two_graphs_alternate():
    """Prompt 100, window 16, groups of 16: 80 tokens in the low-bit copy and no group due in the 9 decode steps, so
    with a top-k covering the copy each step attends every row in full precision, the previous step's choice: the
    unmodified model's tokens. The first step fetches its own choice (nothing was prefetched for it). The slots
    alternate, so a sequence has two graphs: build, prove one parity, prove the other, capture both, then replays."""
    base = hf_models.build("llama", layers=2, seed=0).double()
    ids = _ids(100, 1)
    want = base.generate(ids, max_new_tokens=10, do_sample=False)
    m = _compile(base, topk=128)
    got = m.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)
    g = m._specache_graphs.stats()
    assert g == {"captured": 2, "replayed": 9 - 5, "eager_steps": 3, "kept": 2}, g
    st = specache.stats(m)["store"]
    assert all((s["length"], s["prefetch_issued"], s["prefetch_consumed"]) == (109, 9, 8) for s in st.values()), st


@torch.no_grad()
def test_a_small_topk_prefetches_the_previous_choice_and_samples_its_hits():
    """top-k 8 of a longer decode with groups quantized along the way: the step attends the slot the previous step
    filled (its recorded positions are that step's top-k), and the previous-query hit rate is sampled."""
    base = hf_models.build("llama", layers=2, seed=2).double()
    m = _compile(base, topk=8)
    m.generate(_ids(60, 3), max_new_tokens=30, do_sample=False)
    rt = specache.runtime_of(m)
    for site in rt.sites.values():
        t, st = site.tier, site.static
        assert int(t["prev_total"]) > 0 and 0 <= int(t["prev_hits"]) <= int(t["prev_total"])
        chosen = t["s_slot_idx"][st.cur]  # what the last step chose for the next one: real positions
        assert bool((chosen >= 0).all()) and bool((chosen < int(t["s_nq"])).all())
    rates = [s["previous_query_hit_rate"] for s in specache.stats(m)["store"].values()]
    assert rates and all(0.0 <= r <= 1.0 for r in rates), rates


def test_the_option_is_checked():
    base = hf_models.build("llama", layers=1)
    with pytest.raises(ValueError, match="prefetch"):
        specache.compile(hf_models.twin(base), policy_options={"prefetch": "next"})
