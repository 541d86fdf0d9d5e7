"""The static decode path (policies/specache_static.py), CPU: fixed-capacity state, positions on the device.

What a CUDA graph needs from a decode step is that the next step launches the same kernels with the same arguments
(shapes, scalars) and reads every length from device memory: ``test_consecutive_steps_dispatch_the_same_ops``
checks exactly that on the ops the static path dispatches, across steps that do and do not quantize a group."""

from __future__ import annotations

import sys

import hf_models
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import specache
from specache_compile.policies import specache_static
from specache_compile.runtime.runtime import CacheMismatch


def _static_cache(model, n):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=n)


def _compile(base, **kw):
    opts = {"static": True, **kw.pop("policy_options", {})}
    return specache.compile(hf_models.twin(base), window=16, group_size=16, policy_options=opts, **kw)


@pytest.mark.parametrize("speculative", [True, False])
def test_static_generate_equals_greedy_when_topk_covers_the_context(speculative):
    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(0))
    ref = base.generate(ids, max_new_tokens=12, do_sample=False)[:, 60:]
    m = _compile(base, topk=128)
    out = specache.generate(m, ids, 12, speculative=speculative, past_key_values=_static_cache(m, 96))
    assert torch.equal(out, ref)
    st = next(iter(specache.stats(m)["store"].values()))
    assert st["length"] == 60 + 11 and st["decode_steps"] == 11
    if speculative:  # pre-decoding issues the first prefetch; each step consumes one and issues the next
        assert (st["prefetch_issued"], st["prefetch_consumed"]) == (12, 11)


# two compiles and 40 float64 steps per case (~5-7 s on 2 cores): the default case stays in the fast set
@pytest.mark.parametrize("speculative, extra", [(True, {}), pytest.param(False, {}, marks=pytest.mark.slow),
                                                pytest.param(True, {"layer_budgets": "cake"}, marks=pytest.mark.slow)])
def test_static_path_equals_the_dynamic_path(speculative, extra):
    """Same policy, same choices: the static path's top-k, ring and substitution reproduce the default path's
    tokens (float64 model, a top-k far below the context, groups quantized during the decode), with CAKE's
    per-layer top-k too."""
    base = hf_models.build("llama", layers=2).double()
    ids = torch.randint(3, base.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1))
    outs = []
    for static in (False, True):
        torch._dynamo.reset()
        m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16,
                             policy_options={"static": static, "hit_every": 1, **extra})
        outs.append(specache.generate(m, ids, 40, speculative=speculative, past_key_values=_static_cache(m, 200)))
        st = next(iter(specache.stats(m)["store"].values()))
        assert st["length"] == 150 + 39
    assert torch.equal(outs[0], outs[1])


def test_static_path_writes_the_store_at_the_device_positions():
    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    m = _compile(base, topk=4)
    specache.generate(m, ids, 10, past_key_values=_static_cache(m, 64))
    rt = specache.runtime_of(m)
    for site in rt.sites.values():
        t = site.tier
        assert int(t["s_n"]) == site.length == 49
        # groups of 16 leave the ring once it holds window + group = 32 tokens: 49 - 32 = 17 -> one more group
        assert int(t["s_nq"]) == 32
        assert not bool(t["s_bad"])
        # one host allocation at the StaticCache's capacity (it used to be allocated at the prompt + new tokens and
        # then grown by a quarter to the capacity: two pinned blocks per store on CUDA)
        assert site.k.data.shape[2] == site.v.data.shape[2] == 64
        # the ring holds positions [32, 49) at rows p mod 32, equal to the store's rows
        for p in range(32, 49):
            assert torch.equal(t["s_ring_k"][:, :, p % 32], site.k.data[:, :, p])


def test_consecutive_steps_dispatch_the_same_ops():
    """Every op the static path dispatches, with its shapes and scalar arguments, is the same at every step of one
    parity (groups quantized or not): what a CUDA graph captured over one step needs to replay another. The two
    parities differ only in the prefetch slot they read and fill."""
    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(3))
    m = _compile(base, topk=8)
    traces: list[list] = []
    real = specache_static.decode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            def sig(x):
                if isinstance(x, torch.Tensor):
                    return ("T", tuple(x.shape), x.dtype, tuple(x.stride()))
                if isinstance(x, (list, tuple)):
                    return tuple(sig(y) for y in x)
                return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)) else repr(x)

            traces[-1].append((str(func), sig(args), sig(kwargs or {})))
            return func(*args, **(kwargs or {}))

    def recording(policy, site, *a, **kw):
        if site.name != next(iter(specache.runtime_of(m).sites)):
            return real(policy, site, *a, **kw)
        traces.append([])
        with Record():
            return real(policy, site, *a, **kw)

    specache_static.decode = recording
    try:
        specache.generate(m, ids, 40, past_key_values=_static_cache(m, 128))
    finally:
        specache_static.decode = real
    # trace 0 is pre-decoding (one row, nothing stored); then 39 [real, speculative] steps, 2 of which quantize a
    # group (the ring of 32 is full at 80 and at 96 stored tokens)
    steps = traces[1:]
    assert len(steps) == 39 and len(steps[0]) > 20
    for i, tr in enumerate(steps[2:], 2):  # the prefetch slots alternate: one graph per parity
        assert tr == steps[i % 2], f"step {i} dispatched other ops than step {i % 2}"
    # the two parities differ only in which slot they read and fill
    diff = [(a, b) for a, b in zip(steps[0], steps[1]) if a != b]
    assert len(steps[0]) == len(steps[1]) and diff
    assert all(a[0] == b[0] == "aten.select.int" for a, b in diff)
    rt = specache.runtime_of(m)
    assert int(next(iter(rt.sites.values())).tier["s_nq"]) == 80  # groups did leave the ring during the decode


def test_static_options_are_checked():
    with pytest.raises(ValueError, match="does not support sinks=4"):
        specache.Config(sinks=4, policy_options={"static": True})
        specache.compile(hf_models.twin(hf_models.build("llama", layers=1)), sinks=4, policy_options={"static": True})
    with pytest.raises(ValueError, match="multiple of group_size"):
        specache.compile(hf_models.twin(hf_models.build("llama", layers=1)), window=24, group_size=16,
                         policy_options={"static": True})
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="expected True, False or 'auto'"):
            specache.compile(hf_models.twin(hf_models.build("llama", layers=1)), policy_options={"static": bad})


def test_static_by_default_where_the_options_allow():
    """policy_options static defaults to "auto": the static path for caches written by position where the options
    allow it, never required (a DynamicCache decodes through the default path)."""
    from specache_compile.policies import registered

    def policy(**kw):
        return registered()["specache"].from_config(specache.Config(**kw))

    assert policy().static and not policy().static_required
    assert policy(policy_options={"static": True}).static_required
    assert not policy(policy_options={"static": False}).static
    for kw in ({"sinks": 4}, {"window": 24, "group_size": 16}, {"policy_options": {"miss_rule": "fetch"}}):
        assert not policy(**kw).static, kw


def test_static_needs_an_index_mode_cache():
    from transformers import DynamicCache

    base = hf_models.build("llama", layers=1)
    m = _compile(base, topk=4)
    ids = torch.randint(3, base.config.vocab_size, (1, 30))
    with pytest.raises(CacheMismatch, match="StaticCache"):
        specache.generate(m, ids, 4, past_key_values=DynamicCache())


@pytest.mark.slow  # two compiles and generates to compare: ~5 s on 2 cores
def test_static_generate_makes_its_static_cache():
    """Without past_key_values a static-path model decodes into a StaticCache of prompt + new tokens + 2 positions,
    and gives the tokens an explicit one gives."""
    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    outs = []
    for cache in (None, "explicit"):
        torch._dynamo.reset()
        m = _compile(base, topk=8)
        pkv = None if cache is None else _static_cache(m, 40 + 12 + 2)
        outs.append(specache.generate(m, ids, 12, past_key_values=pkv))
        site = next(iter(specache.runtime_of(m).sites.values()))
        assert site.static.capacity == 54 and site.k.data.shape[2] == 54
    assert torch.equal(outs[0], outs[1])


def test_fixed_buffer_steps_equal_the_step_by_step_loop(monkeypatch):
    """generate(cuda_graph=True)'s loop: one step over fixed input buffers that it advances on the device itself
    (tokens, cache positions, position ids, output column). Run eagerly on CPU (capture is CUDA's), it must produce
    the tokens and the store state of the ordinary loop."""
    gen = sys.modules["specache_compile.generate"]  # the module (the package exports the function by this name)

    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (2, 90), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    outs, stats = [], []
    for graphed in (False, True):
        torch._dynamo.reset()
        m = _compile(base, topk=8, policy_options={"hit_every": 1})
        if graphed:
            monkeypatch.setattr(gen, "_check_graphable", lambda *a: None)  # CUDA is the only thing missing here
        outs.append(specache.generate(m, ids, 20, attention_mask=mask, past_key_values=_static_cache(m, 128),
                                      cuda_graph=graphed, suppress_tokens=[7]))
        stats.append(next(iter(specache.stats(m)["store"].values())))
    assert torch.equal(outs[0], outs[1])
    assert not (outs[1] == 7).any()
    for key in ("length", "decode_steps", "prefetch_issued", "prefetch_consumed", "prefetch_hits", "fetched_rows"):
        assert stats[0][key] == stats[1][key], key


def test_cuda_graph_refuses_what_it_cannot_capture():
    base = hf_models.build("llama", layers=1)
    ids = torch.randint(3, base.config.vocab_size, (1, 20))
    m = specache.compile(hf_models.twin(base), topk=4, policy_options={"static": False})
    with pytest.raises(ValueError, match="CUDA graphs need CUDA") as e:
        specache.generate(m, ids, 4, cuda_graph=True)
    msg = str(e.value)
    assert "expected a StaticCache" in msg and "without policy_options['static']=True" in msg


@pytest.mark.slow  # two compiles of a 3-layer model, 30 steps under a dispatch mode: ~8 s on 2 cores
def test_layers_share_the_step_values_and_nothing_changes():
    """The positions, masks and bias every layer of a step would compute alike are computed by the first layer and
    reused (StepShared): later layers dispatch fewer ops, and the tokens, the copy and the ring are those of a run
    that shares nothing."""
    base = hf_models.build("llama", layers=3)
    ids = torch.randint(3, base.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(4))
    counts: dict[str, list[int]] = {}
    real = specache_static.decode

    class Count(TorchDispatchMode):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[self.name][-1] += 1
            return func(*args, **(kwargs or {}))

    def counting(policy, site, *a, **kw):
        counts.setdefault(site.name, []).append(0)
        with Count(site.name):
            return real(policy, site, *a, **kw)

    runs = []
    for share in (True, False):
        torch._dynamo.reset()
        m = _compile(base, topk=8)
        orig_get = specache_static.StepShared.get
        specache_static.decode = counting if share else real
        if not share:
            specache_static.StepShared.get = lambda self, key, make: make()
        try:
            out = specache.generate(m, ids, 30, past_key_values=_static_cache(m, 128))
        finally:
            specache_static.decode, specache_static.StepShared.get = real, orig_get
        sites = list(specache.runtime_of(m).sites.values())
        runs.append((out, [{k: s.tier[k].clone() for k in ("s_kq", "s_vq", "s_ring_k", "s_nq")} for s in sites]))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    first, *later = counts.values()
    assert len(first) == 30 and all(len(c) == 30 for c in later)
    for step in range(1, 30):  # every [real, speculative] step (step 0 is pre-decoding)
        assert all(c[step] < first[step] for c in later), (step, first[step], [c[step] for c in later])


def test_hf_generate_with_a_static_cache_takes_the_static_path():
    """transformers' own generate with cache_implementation="static" decodes through the static path (one token per
    step, no speculation) and gives greedy's tokens when the top-k covers the context."""
    base = hf_models.build("llama", layers=2)
    ids = torch.randint(3, base.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(6))
    ref = base.generate(ids, max_new_tokens=10, do_sample=False)
    m = _compile(base, topk=128)
    out = m.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)
    site = next(iter(specache.runtime_of(m).sites.values()))
    assert site.static is not None and int(site.tier["s_n"]) == site.length == 60 + 9


def test_hf_generate_static_calls_of_new_lengths():
    """Calls of other prompt lengths and max_new_tokens grow transformers' StaticCache and make Dynamo retrace with
    dynamic sizes: the pass must still place the op's length input before the cache's placeholder (it read its own
    placeholder, and the graph failed to compile), and every call equals the unmodified model."""
    base = hf_models.build("llama", layers=2)
    m = _compile(base, topk=128)
    for s, n in ((40, 6), (50, 8), (45, 12), (33, 5)):
        ids = torch.randint(3, base.config.vocab_size, (1, s), generator=torch.Generator().manual_seed(s))
        ref = base.generate(ids, max_new_tokens=n, do_sample=False)
        out = m.generate(ids, max_new_tokens=n, do_sample=False, cache_implementation="static")
        assert torch.equal(out, ref), (s, n)



@pytest.mark.slow  # two compiles, float64, exact attention beside every step: ~5 s on 2 cores
def test_static_path_measures_the_same_attention_error():
    """measure_error=True on the static path: per layer, the relative error against exact attention over the stored
    tokens equals the default path's (same choices; the low-bit products run in fp32 over columns in another order, so
    to 1e-6); generate(cuda_graph=True) refuses it."""
    base = hf_models.build("llama", layers=2).double()
    ids = torch.randint(3, base.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(8))
    errs = []
    for static in (False, True):
        torch._dynamo.reset()
        m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16, measure_error=True,
                             policy_options={"static": static, "hit_every": 1})
        specache.generate(m, ids, 20, past_key_values=_static_cache(m, 200))
        errs.append(specache.attention_error(m))
    assert errs[0].keys() == errs[1].keys() and len(errs[0]) == 2
    for name, e in errs[0].items():
        assert e["steps"] == errs[1][name]["steps"] == 19 and 0 < e["mean"] < 1
        assert e["mean"] == pytest.approx(errs[1][name]["mean"], rel=1e-6)
    with pytest.raises(ValueError, match="measure_error=True"):
        specache.generate(m, ids, 4, cuda_graph=True)
