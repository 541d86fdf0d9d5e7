"""Faults in the middle of a sequence: a failed host or device allocation and a KeyboardInterrupt inside a step end
in an error, leave nothing half-written that a later call would trust, and the model works after specache.reset."""

from __future__ import annotations

import pytest
import torch
from hf_models import build, twin

import specache
from specache_compile.generate import cache_keyword
from specache_compile.runtime import buffers

ARGS = dict(policy="specache", topk=4096, window=4, group_size=16)


def ids(n=20, seed=0):
    return torch.randint(2, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    ref = build("llama", seed=0)
    return ref, specache.compile(twin(ref), **ARGS)


@pytest.mark.parametrize("where", ["host", "device"])
@torch.no_grad()
def test_failed_allocation_raises_then_reset_recovers(models, monkeypatch, where):
    ref, m = models
    want = ref.generate(ids(), max_new_tokens=6)
    real = buffers.Growable._alloc
    calls = {"n": 0}

    def failing(self, capacity):
        # the store's host buffers are float rows of the KV; the device tier's low-bit codes are uint8
        is_host = self.dtype != torch.uint8
        if capacity and (is_host == (where == "host")):
            calls["n"] += 1
            raise torch.OutOfMemoryError("simulated: cannot allocate")
        return real(self, capacity)

    monkeypatch.setattr(buffers.Growable, "_alloc", failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        m.generate(ids(), max_new_tokens=6)
    assert calls["n"] > 0
    monkeypatch.setattr(buffers.Growable, "_alloc", real)
    specache.reset(m)
    assert torch.equal(m.generate(ids(), max_new_tokens=6), want)


def _pinned_in_use() -> int:
    """Bytes of pinned host memory torch's caching host allocator holds from the driver (cudaHostAlloc'd, its cache
    for reuse included): a leaked store buffer cannot be reused, so every later sequence would allocate anew and this
    would grow. Not ``active_bytes``: torch's count grows across these cycles while the blocks the allocator holds
    stay the same and none goes back to the driver, so it does not measure what is in use."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    stats = torch.cuda.host_memory_stats()
    if "allocated_bytes.current" not in stats:
        raise AssertionError(f"expected allocated_bytes.current in host_memory_stats(), got {list(stats)}")
    return int(stats["allocated_bytes.current"])


def _fault_cycle(m, x, monkeypatch, alloc, after) -> None:
    """A failed host allocation, a failed device allocation and a KeyboardInterrupt inside a step (the second layer
    of the second decode step), each ending in its error, then specache.reset and ``after(where)``. ``alloc``: the
    store's allocation the failing one falls back to, and the one left in place."""
    runtime = specache.runtime_of(m)
    real_attend = runtime.attend
    for where in ("host", "device"):
        def failing(self, capacity, where=where):
            if capacity and ((self.dtype != torch.uint8) == (where == "host")):
                raise torch.OutOfMemoryError("simulated: cannot allocate")
            return alloc(self, capacity)

        monkeypatch.setattr(buffers.Growable, "_alloc", failing)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            m.generate(x, max_new_tokens=6)
        monkeypatch.setattr(buffers.Growable, "_alloc", alloc)
        specache.reset(m)
        after(where)
    calls = {"n": 0}

    def interrupt(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_attend(*a)

    monkeypatch.setattr(runtime, "attend", interrupt)
    with pytest.raises(KeyboardInterrupt):
        m.generate(x, max_new_tokens=6)
    monkeypatch.setattr(runtime, "attend", real_attend)
    specache.reset(m)
    after("interrupt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned host memory)")
@torch.no_grad()
def test_faults_leak_no_pinned_memory_cuda(monkeypatch):
    """On CUDA, where the store's host buffers are pinned: cycles of a failed host allocation, a failed device
    allocation and a KeyboardInterrupt inside a step, each followed by specache.reset, leave no more pinned memory in
    use than the first cycle did, and the model decodes exactly after them."""
    ref = build("llama", seed=0).cuda()
    m = specache.compile(twin(ref), **ARGS)
    x = ids().cuda()
    want = ref.generate(x, max_new_tokens=6)
    levels = []
    for _ in range(4):
        _fault_cycle(m, x, monkeypatch, buffers.Growable._alloc, lambda where: None)
        assert torch.equal(m.generate(x, max_new_tokens=6), want)
        specache.reset(m)
        levels.append(_pinned_in_use())
    assert levels[-1] <= levels[0], levels


@torch.no_grad()
def test_faults_leave_no_store_buffer_alive(monkeypatch):
    """The CPU side of the pinned-memory check above: after each fault and specache.reset, no host or device buffer
    the store allocated is still referenced (a traceback, a retired token or a cache holding one would keep it)."""
    import gc
    import weakref

    ref = build("llama", seed=0)
    m = specache.compile(twin(ref), **ARGS)
    real_alloc = buffers.Growable._alloc
    made = []

    def tracked(self, capacity):
        t = real_alloc(self, capacity)
        made.append(weakref.ref(t))
        return t

    def alive():
        gc.collect()
        return sum(r() is not None for r in made)

    def none_alive(where):
        assert made and alive() == 0, (where, alive(), len(made))

    _fault_cycle(m, ids(), monkeypatch, tracked, none_alive)
    m.generate(ids(), max_new_tokens=6)
    assert alive() > 0  # the check sees live buffers: a sequence's store is alive until reset
    specache.reset(m)
    assert alive() == 0


@torch.no_grad()
def test_keyboard_interrupt_inside_a_step(models, monkeypatch):
    """Interrupted between two layers' attention of a decode step: the cache the model holds is the one from before
    the step, which the store then follows back (one layer had appended); after reset a new sequence is exact too."""
    ref, m = models
    runtime = specache.runtime_of(m)
    real = runtime.attend
    seen = {"n": 0}

    def interrupt(*a):
        seen["n"] += 1
        if seen["n"] == 2 * 2 + 2:  # prefill (2 layers), one decode step (2 layers), then layer 1 of the next step
            raise KeyboardInterrupt
        return real(*a)

    from transformers import DynamicCache

    for model in (ref, m):
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids(), **{cache_keyword(model): cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=tok, **{cache_keyword(model): cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        if model is m:
            seen["n"] = 4
            monkeypatch.setattr(runtime, "attend", interrupt)
            with pytest.raises(KeyboardInterrupt):
                model(input_ids=tok, **{cache_keyword(model): cache}, use_cache=True)
            monkeypatch.setattr(runtime, "attend", real)
            got = model(input_ids=tok, **{cache_keyword(model): cache}, use_cache=True).logits
        else:
            want = model(input_ids=tok, **{cache_keyword(model): cache}, use_cache=True).logits
    torch.testing.assert_close(got, want)
    specache.reset(m)
    assert torch.equal(m.generate(ids(seed=3), max_new_tokens=6), ref.generate(ids(seed=3), max_new_tokens=6))
