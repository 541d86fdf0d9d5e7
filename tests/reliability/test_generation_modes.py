"""transformers' generation modes after specache.compile: each equals the unmodified model, or raises a clear error.

Every mode runs under policy "full" and under "specache" with a top-k covering the context and a small window (so
the low-bit copy and the fetch path really run). Beam search reorders the cache, assisted and prompt-lookup decoding
crop it, a returned cache is continued: the store must follow each (runtime.Runtime.follow_cache).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import build, twin
from transformers import DynamicCache

import specache
from specache_compile.generate import cache_keyword
from specache_compile.runtime import CacheMismatch

POLICIES = {
    "full": {"policy": "full"},
    "specache": {"policy": "specache", "topk": 4096, "window": 4, "group_size": 16},
}
NEW = 10


@pytest.fixture(scope="module")
def pair():
    """(unmodified, compiled) per policy, built once: compiling costs more than generating."""
    out = {}

    def get(policy: str):
        if policy not in out:
            ref = build("llama", seed=0)
            out[policy] = (ref, specache.compile(twin(ref), **POLICIES[policy]))
        return out[policy]

    return get


def prompt(n=20, batch=1, seed=0):
    return torch.randint(2, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def same(a, b):
    assert torch.equal(a, b), (a.tolist(), b.tolist())


MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(num_beams=3, num_return_sequences=3, do_sample=False),
    "prompt_lookup": dict(prompt_lookup_num_tokens=3, do_sample=False),
}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("mode", list(MODES))
@torch.no_grad()
def test_generate_modes_equal_unmodified(pair, policy, mode):
    ref, m = pair(policy)
    # a repetitive prompt gives prompt lookup drafts to accept and reject (crops of the cache)
    ids = prompt(24, seed=1) if mode != "prompt_lookup" else prompt(8, seed=2).repeat(1, 3)
    same(ref.generate(ids, max_new_tokens=NEW, **MODES[mode]), m.generate(ids, max_new_tokens=NEW, **MODES[mode]))
    if mode != "greedy":
        assert sum(s["rewrites"] for s in specache.stats(m)["store"].values()) > 0, "the store followed nothing"


@pytest.mark.parametrize("policy", list(POLICIES))
@torch.no_grad()
def test_sampling_with_seed(pair, policy):
    ref, m = pair(policy)
    ids = prompt(16, seed=3)
    torch.manual_seed(7)
    a = ref.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20)
    torch.manual_seed(7)
    same(a, m.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20))


@torch.no_grad()
def test_assisted_decoding_with_small_assistant(pair):
    ref, m = pair("specache")
    assistant = build("llama", seed=5, layers=1)
    ids = prompt(20, seed=4)
    want = ref.generate(ids, max_new_tokens=NEW, assistant_model=assistant, do_sample=False)
    same(want, m.generate(ids, max_new_tokens=NEW, assistant_model=assistant, do_sample=False))
    # the assistant compiled too: its own cache is cropped after every rejected draft
    asst = specache.compile(twin(assistant), policy="full")
    same(want, m.generate(ids, max_new_tokens=NEW, assistant_model=asst, do_sample=False))


@pytest.mark.parametrize("policy", list(POLICIES))
@torch.no_grad()
def test_continue_from_returned_cache_and_repeated_calls(pair, policy):
    ref, m = pair(policy)
    for n in (12, 30, 7):  # repeated generate calls with different prompt lengths
        ids = prompt(n, seed=n)
        same(ref.generate(ids, max_new_tokens=6), m.generate(ids, max_new_tokens=6))
    ids = prompt(18, seed=9)
    kw = dict(max_new_tokens=5, return_dict_in_generate=True, do_sample=False)
    a, b = ref.generate(ids, **kw), m.generate(ids, **kw)
    same(a.sequences, b.sequences)
    more = torch.cat([a.sequences, prompt(3, seed=10)], dim=1)
    kw = cache_keyword(ref)  # transformers is renaming past_key_values to cache: both work

    def returned(o):
        return getattr(o, "cache", None) or o.past_key_values

    same(ref.generate(more, **{kw: returned(a)}, max_new_tokens=5), m.generate(more, **{kw: returned(b)},
                                                                                max_new_tokens=5))


@torch.no_grad()
def test_left_padded_batch(pair):
    ref, m = pair("specache")
    ids = prompt(20, batch=3, seed=11)
    mask = torch.ones_like(ids)
    mask[0, :7], mask[1, :3] = 0, 0
    ids[mask == 0] = 0
    same(ref.generate(ids, attention_mask=mask, max_new_tokens=NEW),
         m.generate(ids, attention_mask=mask, max_new_tokens=NEW))


@torch.no_grad()
def test_static_cache_implementation(pair):
    ref, m = pair("full")
    ids = prompt(16, seed=12)
    same(ref.generate(ids, max_new_tokens=8, cache_implementation="static"),
         m.generate(ids, max_new_tokens=8, cache_implementation="static"))


def _step(model, tok, cache):
    return model(input_ids=tok, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("policy", list(POLICIES))
@torch.no_grad()
def test_prefix_reuse_through_a_copied_cache(pair, policy):
    """Two branches from copy.deepcopy of one prefilled cache, one after the other: each equals the unmodified
    model's; interleaving them (the store keeps one history per site) raises instead of mixing them."""
    ref, m = pair(policy)
    ids = prompt(20, seed=13)
    outs = []
    for model in (ref, m):
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)
        fork = copy.deepcopy(cache)
        branch = []
        for c, tok in ((cache, first), (fork, (first + 1) % 128)):
            for _ in range(4):
                tok = _step(model, tok, c)
                branch.append(tok)
        outs.append(torch.cat(branch, 1))
    same(*outs)
    cache = DynamicCache(config=m.config)
    tok = m(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)
    fork = copy.deepcopy(cache)
    _step(m, tok, cache)
    _step(m, tok, fork)  # the store follows the fork back to the prefix...
    with pytest.raises(CacheMismatch, match="cropped, reordered or continued elsewhere"):
        _step(m, tok, cache)  # ...so the first branch's next step cannot be served


@torch.no_grad()
def test_cache_reorder_refused_by_a_policy_without_full_kv():
    ref = build("llama", seed=0)
    m = specache.compile(twin(ref), policy="quant", group_size=16, window=4)
    with pytest.raises(CacheMismatch, match="keeps no full-precision copy"):
        m.generate(prompt(20, seed=14), max_new_tokens=6, num_beams=2, do_sample=False)


@torch.no_grad()
def test_specache_generate_takes_either_cache_keyword(pair):
    from transformers import DynamicCache

    ref, m = pair("full")
    ids = prompt(12, seed=15)
    want = ref.generate(ids, max_new_tokens=4, do_sample=False)[:, 12:]
    same(specache.generate(m, ids, 4, cache=DynamicCache(config=m.config)), want)
    same(specache.generate(m, ids, 4, past_key_values=DynamicCache(config=m.config)), want)
    with pytest.raises(ValueError, match="got both"):
        specache.generate(m, ids, 4, cache=DynamicCache(), past_key_values=DynamicCache())


@torch.no_grad()
def test_copy_from_an_earlier_sequence_is_refused(pair):
    _, m = pair("full")
    kw = cache_keyword(m)
    cache = DynamicCache(config=m.config)
    tok = m(input_ids=prompt(20, seed=16), **{kw: cache}, use_cache=True).logits[:, -1:].argmax(-1)
    old = copy.deepcopy(cache)
    m(input_ids=prompt(20, seed=17), **{kw: DynamicCache(config=m.config)}, use_cache=True)  # a new sequence
    with pytest.raises(CacheMismatch, match="did not produce last"):
        _step(m, tok, old)
