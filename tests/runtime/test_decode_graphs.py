"""The decode steps of any loop replayed as CUDA graphs (specache_compile/decode_graphs.py), CPU.

There is no CUDA here: ``capture=False`` replays a step by re-running the compiled call on the staged inputs, so
these tests check what decides a replay (keys, the eager proof, the cache checks), that every input reaches the
staged copies and that outputs come back fresh. tests/test_gpu.py replays real graphs."""

from __future__ import annotations

import hf_models
import pytest
import torch

import specache
from specache_compile.runtime.runtime import CacheMismatch


def _compiled(base, **kw):
    m = specache.compile(hf_models.twin(base), topk=4096, window=16, group_size=16, policy_options={"static": True},
                         **kw)
    graphs = m._specache_graphs
    graphs.capture = False  # re-run instead of a CUDA graph: see the module docstring
    return m, graphs


def _ids(n, seed, vocab=128):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_model_generate_replays_its_decode_steps_and_equals_the_unmodified_model():
    base = hf_models.build("llama", seed=0)
    m, graphs = _compiled(base)
    for i, (s, n) in enumerate(((40, 10), (47, 7))):
        ids = _ids(s, i)
        before = dict(graphs.stats())
        out = m.generate(ids, max_new_tokens=n, do_sample=False)
        assert torch.equal(out, base.generate(ids, max_new_tokens=n, do_sample=False)), (s, n)
        got = graphs.stats()
        # decode calls: n - 1; the first builds the static state, the second proves the key, the third captures
        assert got["captured"] - before["captured"] == 1
        assert got["replayed"] - before["replayed"] == n - 1 - 3
        assert got["kept"] == 1  # the earlier sequence's graph went with its state
        st = specache.stats(m)
        assert st["cuda_graphs"] == got
        assert all(v["length"] == s + n - 1 for v in st["store"].values())


@torch.no_grad()
def test_a_hand_loop_keeps_each_steps_logits():
    """Outputs are clones: a loop that keeps every step's logits keeps what each step computed, not the last."""
    from transformers import StaticCache

    base = hf_models.build("llama", seed=1)
    m, graphs = _compiled(base)
    ids = _ids(30, 3)

    def loop(model, cache):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        kept, tok = [], out.logits[:, -1:].argmax(-1)
        for p in range(30, 38):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]))
            kept.append(out.logits)
            tok = out.logits[:, -1:].argmax(-1)
        return torch.cat(kept, 1)

    got = loop(m, StaticCache(config=m.config, max_cache_len=64))
    ref = loop(base, StaticCache(config=base.config, max_cache_len=64))
    assert graphs.stats()["replayed"] == 8 - 3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_replaced_cache_is_refused_not_replayed():
    """A reorder (beam search) or copy gives the cache new tensors: no replay of the old addresses; the eager call
    raises the store's refusal."""
    from transformers import StaticCache

    base = hf_models.build("llama", seed=2)
    m, graphs = _compiled(base)
    cache = StaticCache(config=m.config, max_cache_len=64)
    ids = torch.cat([_ids(20, 4), _ids(20, 5)])

    def step(tok, p):
        return m(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[p], [p]]),
                 cache_position=torch.tensor([p])).logits[:, -1:].argmax(-1)

    tok = m(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    for p in range(20, 25):
        tok = step(tok, p)
    assert graphs.stats()["replayed"] == 2
    cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(CacheMismatch, match="buffers were replaced"):
        step(tok, 25)
    assert graphs.stats()["replayed"] == 2


@torch.no_grad()
def test_beam_search_decodes_through_a_dynamic_cache_or_is_refused():
    """Beam search reorders the cache outside the graph. By default model.generate keeps transformers' DynamicCache
    for it (the store follows the reorder): equal to the unmodified model. Asked for specache's StaticCache, the
    reorder is refused (the prefill allocates that cache's buffer; its placeholder is what the check compares);
    with the static path required, the DynamicCache decode is refused."""
    base = hf_models.build("llama", seed=6)
    ids = _ids(20, 8)
    m = specache.compile(hf_models.twin(base), topk=4096, window=16, group_size=16)
    want = base.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(m.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False), want)
    specache.reset(m)
    with pytest.raises(CacheMismatch, match="buffers were replaced"):
        m.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, cache_implementation="specache")
    m, _ = _compiled(base)
    with pytest.raises(CacheMismatch, match="decodes index-mode caches only"):
        m.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)


@torch.no_grad()
def test_a_rewound_hand_loop_is_followed():
    """A hand loop that rewinds its write position (a draft model re-decoding): on the CPU the positions are read at
    once and the store follows (the static state is rebuilt from the full-precision rows, then proven and captured
    again); the logits equal the unmodified model's over the same loop. (On CUDA the positions stay on the device:
    the captured step flags the rewind and the next check raises, tests/test_gpu.py.)"""
    from transformers import StaticCache

    base = hf_models.build("llama", seed=3)
    m, graphs = _compiled(base)

    def loop(model):
        cache = StaticCache(config=model.config, max_cache_len=64)
        tok = model(input_ids=_ids(20, 5), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        kept = []
        for p in (20, 21, 22, 23, 24, 21, 22, 23, 24, 25, 26):  # rewinds to 21 by hand
            for layer in cache.layers:  # transformers that write at the layer's own counter
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) and layer.is_initialized:
                    layer.cumulative_length.fill_(p)
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[p]]),
                        cache_position=torch.tensor([p]))
            kept.append(out.logits)
            tok = out.logits[:, -1:].argmax(-1)
        return torch.cat(kept, 1)

    torch.testing.assert_close(loop(m), loop(base), rtol=1e-4, atol=1e-4)
    assert graphs.stats()["captured"] == 2 and graphs.stats()["replayed"] >= 3
    assert all(s["rewrites"] == 1 for s in specache.stats(m)["store"].values())


@torch.no_grad()
def test_off_when_asked_or_when_measuring_error():
    base = hf_models.build("llama", seed=4)
    ids = _ids(30, 6)
    for kw in ({"cuda_graphs": False}, {"measure_error": True}):
        m, graphs = _compiled(base, **kw)
        m.generate(ids, max_new_tokens=8, do_sample=False)
        assert graphs.stats()["captured"] == 0 and graphs.stats()["replayed"] == 0, kw
    with pytest.raises(ValueError, match="cuda_graphs: expected True or False"):
        specache.Config(cuda_graphs="yes")


@torch.no_grad()
def test_a_policy_decoding_without_its_static_path_is_never_replayed():
    base = hf_models.build("llama", seed=5)
    m = specache.compile(hf_models.twin(base), policy="full", policy_options={"static": False})
    m._specache_graphs.capture = False
    ids = _ids(30, 7)
    out = m.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="specache")
    assert torch.equal(out, base.generate(ids, max_new_tokens=8, do_sample=False))
    assert specache.stats(m)["cuda_graphs"]["replayed"] == 0


def test_calls_with_unknown_objects_are_never_replayed():
    """An argument the key cannot see into (a dict, an object other than a cache) may carry tensors a replay would
    not stage: its calls never share a key, so they run eagerly."""
    from specache_compile.decode_graphs import _arg_key

    extra = {"x": torch.zeros(1)}
    assert _arg_key(extra) != _arg_key(extra)
    assert _arg_key(torch.zeros(2, 3)) == _arg_key(torch.ones(2, 3)) != _arg_key(torch.zeros(3, 2))

    class Cache:
        layers = ()

    c = Cache()
    assert _arg_key(c) == _arg_key(c) != _arg_key(Cache())
