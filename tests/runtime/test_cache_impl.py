"""cache_implementation="specache" (specache_compile/cache.py): model.generate after specache.compile decodes into a
StaticCache whose capacity is a bucket, so calls of other lengths within a bucket compile nothing new."""

from __future__ import annotations

import pytest
import torch
from hf_models import build, twin
from torch._dynamo.utils import counters
from transformers import DynamicCache

import specache
from specache_compile import cache as sc


def test_bucket():
    assert [sc.bucket(n) for n in (1, 1024, 1025, 2115, 5000, 8206, 131086)] == [
        sc.MIN_BUCKET, 1024, 2048, 3072, 5120, 10240, 163840]
    for n in range(1, 300_000, 997):  # room for n, at most a quarter more above 4K, four buckets per doubling
        b = sc.bucket(n)
        assert b >= n and (n <= 4096 or b <= 1.25 * n), (n, b)
    assert len({sc.bucket(n) for n in range(32769, 65537)}) == 4
    with pytest.raises(ValueError, match="expected a positive number"):
        sc.bucket(0)


def _prompt(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _graphs():
    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_static_policy_generates_into_a_bucketed_cache_by_default():
    """policy_options static=True with a plain model.generate (no cache argument): the static path over a cache of
    one bucket; calls of new prompt lengths and max_new_tokens inside the bucket compile no new graph once the prefill
    has been traced with a dynamic length (Dynamo's second distinct length), and each equals the unmodified model."""
    base = build("llama", seed=0)
    m = specache.compile(twin(base), topk=4096, window=16, group_size=16, policy_options={"static": True})
    compiled = []
    for i, (s, n) in enumerate(((40, 6), (50, 8), (45, 12), (33, 20), (61, 3))):
        ids = _prompt(s, i)
        before = _graphs()
        out = m.generate(ids, max_new_tokens=n, do_sample=False)
        compiled.append(_graphs() - before)
        assert torch.equal(out, base.generate(ids, max_new_tokens=n, do_sample=False)), (s, n)
        site = next(iter(specache.runtime_of(m).sites.values()))
        assert site.static is not None and site.length == s + n - 1
    assert compiled[0] > 0 and compiled[2:] == [0, 0, 0], compiled


@torch.no_grad()
def test_cache_implementation_specache_for_any_policy():
    """Asked for by name, the bucketed cache serves a policy without a static path too (index-mode sites); passing a
    cache object beside the name is refused before anything runs."""
    base = build("llama", seed=1)
    m = specache.compile(twin(base), policy="full")
    ids = _prompt(20, 7)
    out = m.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="specache")
    assert torch.equal(out, base.generate(ids, max_new_tokens=5, do_sample=False))
    assert specache.stats(m)["sites"]["model.layers.0.self_attn"]["mode"] == "index"
    with pytest.raises(ValueError, match="either cache_implementation='specache' or a cache object"):
        m.generate(ids, max_new_tokens=2, cache_implementation="specache", past_key_values=DynamicCache())


def test_generate_kwargs_leaves_other_choices_alone():
    base = build("llama", seed=2)
    ids = _prompt(10, 3)
    for kw in ({"cache_implementation": "static"}, {"use_cache": False, "cache_implementation": None}):
        assert sc.generate_kwargs(base, (ids,), kw, True, "cache").get("cache") is None
    assert sc.generate_kwargs(base, (ids,), {"max_new_tokens": 4}, False, "cache").get("cache") is None
    for kw, cap in (({"max_new_tokens": 4}, sc.MIN_BUCKET), ({"max_length": 3000}, 3072)):
        got = sc.generate_kwargs(base, (ids,), kw, True, "cache")["cache"]
        assert {layer.max_cache_len for layer in got.layers} == {cap}


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
@torch.no_grad()
def test_sliding_window_models_keep_the_dynamic_cache_by_default(arch):
    """A StaticCache's sliding-window layers roll their buffer in place, which the pass cannot follow (the site would
    keep its original attention and its full KV on the device): by default model.generate keeps transformers'
    DynamicCache for such a model, whose sliding layers are rewritten (sliding_layers="rewrite"); every site is
    rewritten and the tokens equal the unmodified model's."""
    base = build(arch, seed=3)
    m = specache.compile(twin(base), topk=4096, window=16, group_size=16, sliding_layers="rewrite")
    ids = _prompt(60, 9)
    assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False),
                       base.generate(ids, max_new_tokens=8, do_sample=False))
    st = specache.stats(m)
    assert st["found"] == st["rewritten"] > 0, st["sites"]
