"""On the lent GPU only: the compiled model on CUDA with Inductor, pinned host store."""

import pytest
import torch
from hf_models import build, twin

import specache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "specache"])
def test_cuda_inductor_generate_matches(policy):
    model = build("llama", "sdpa").cuda()
    ref = twin(model)
    ids = torch.randint(2, 128, (2, 40), device="cuda")
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=24, do_sample=False)
        specache.compile(model, policy=policy, topk=512, window=8, group_size=8, inner="inductor")
        got = model.generate(ids, max_new_tokens=24, do_sample=False)
    st = specache.stats(model)
    assert st["rewritten"] == st["found"] == 2
    assert all(s["decode_steps"] >= 23 for s in st["store"].values())
    assert torch.equal(got, want)
    site = next(iter(specache.runtime_of(model).sites.values()))
    assert site.k.data.device.type == "cpu" and site.k.data.is_pinned()


# -- the stream manager and speculative decoding (issue 4) ------------------------------------------------------------


def _bigger(dtype):
    # head_dim 64, 8 query / 2 KV heads: shapes the Triton kernels take (the 16-wide default model falls back)
    return build("llama", "sdpa", dtype=dtype, heads=8, kv_heads=2, head_dim=64, layers=3).cuda()


@pytest.mark.parametrize("speculative", [True, False])
def test_cuda_speculative_generate_exact_when_topk_covers(speculative):
    torch._dynamo.reset()
    model = _bigger(torch.float32)
    ref = twin(model)
    ids = torch.randint(2, 128, (2, 300), device="cuda")
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=16, do_sample=False)[:, 300:]
    specache.compile(model, topk=512, inner="inductor")
    got = specache.generate(model, ids, 16, speculative=speculative)
    assert torch.equal(got, want)


@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cuda_decode_hot_path_has_no_host_sync(speculative, cache):
    """Decode steps under torch.cuda.set_sync_debug_mode("error"): no .item(), no blocking copy, no sync."""
    from transformers import DynamicCache, StaticCache

    torch._dynamo.reset()
    model = _bigger(torch.bfloat16)
    specache.compile(model, topk=32, inner="inductor")
    ids = torch.randint(2, 128, (1, 1500), device="cuda")

    def make():
        return DynamicCache() if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=1600)

    specache.generate(model, ids, 12, speculative=speculative, past_key_values=make())  # compile every graph

    checked = []

    def on_step(i):
        # on_step(i) runs after decode step i; steps 3..10 run in "error" mode. Off after the last step: generate's
        # end-of-sequence check of the deferred write positions (Runtime.check_deferred) is one sync per call, by design
        if i == 2:  # steady state: after the first steps (where Dynamo may still mark shapes dynamic)
            torch.cuda.set_sync_debug_mode("error")
        elif i == 10:
            torch.cuda.set_sync_debug_mode(0)
        if i > 2:
            checked.append(i)

    try:
        specache.generate(model, ids, 12, speculative=speculative, past_key_values=make(), on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert checked == list(range(3, 11))  # eight decode steps ran under "error" mode
    st = next(iter(specache.stats(model)["store"].values()))
    assert st["decode_steps"] == 11
    if speculative:
        assert st["prefetch_consumed"] == 11


def test_cuda_prefetch_overlaps_and_is_timed():
    from specache_compile.runtime.streams import FetchTimer

    torch._dynamo.reset()
    model = _bigger(torch.bfloat16)
    specache.compile(model, topk=32, inner="inductor", policy_options={"hit_every": 1})
    ids = torch.randint(2, 128, (2, 2000), device="cuda")
    specache.generate(model, ids, 8)
    runtime = specache.runtime_of(model)
    runtime.streams.timer = FetchTimer()
    specache.generate(model, ids, 8)
    f = runtime.streams.timer.summary()
    runtime.streams.timer = None
    # 3 layers x 8 prefetches (pre-decoding + 7 steps), each 2 x 2 heads x 32 rows x (K + V) x 64 x 2 bytes
    assert f["prefetch_count"] == 3 * 8
    assert f["prefetch_bytes"] == 3 * 8 * 2 * 2 * 32 * 2 * 64 * 2
    assert "demand_ms" not in f  # speculative steps never fetch on demand
    st = next(iter(specache.stats(model)["store"].values()))
    assert 0.0 <= st["prefetch_hit_rate"] <= 1.0
    side = runtime.streams.side(torch.device("cuda"))
    assert side is not None and side != torch.cuda.current_stream()


# -- the static decode path and CUDA graphs (policies/specache_static.py, generate(cuda_graph=True)) ------------------


def _static_run(model, ids, n, cache_len, **kw):
    from transformers import StaticCache

    return specache.generate(model, ids, n, past_key_values=StaticCache(config=model.config, max_cache_len=cache_len),
                             **kw)


def test_cuda_static_path_equals_the_dynamic_path():
    """Pinned store written by the GPU at device positions, zero-copy static gathers, side-stream prefetch: the same
    tokens as the default path (float64, so the two paths' different reduction orders cannot flip an argmax: the
    attention ops run their references there; the row movers and streams are the CUDA ones)."""
    base = _bigger(torch.float64)
    ids = torch.randint(2, 128, (2, 700), device="cuda")
    outs = []
    for static in (False, True):
        torch._dynamo.reset()
        m = twin(base)
        specache.compile(m, topk=32, window=64, group_size=64, inner="inductor", policy_options={"static": static})
        outs.append(_static_run(m, ids, 80, 800))
    assert torch.equal(outs[0], outs[1])
    site = next(iter(specache.runtime_of(m).sites.values()))
    assert site.k.data.is_pinned() and int(site.tier["s_n"]) == site.length == 700 + 79


def test_cuda_graph_generate_equals_eager_static():
    """generate(cuda_graph=True): two warm-up steps, two captured graphs (one per prefetch slot), then replays; the
    tokens and the store's bookkeeping equal the eager static loop's."""
    base = _bigger(torch.bfloat16)
    ids = torch.randint(2, 128, (1, 1500), device="cuda")
    outs, stats = [], []
    for graphed in (False, True):
        torch._dynamo.reset()
        m = twin(base)
        specache.compile(m, topk=32, inner="inductor", policy_options={"static": True, "hit_every": 1})
        outs.append(_static_run(m, ids, 24, 1600, cuda_graph=graphed))
        stats.append(next(iter(specache.stats(m)["store"].values())))
    assert torch.equal(outs[0], outs[1])
    for key in ("length", "decode_steps", "prefetch_issued", "prefetch_consumed", "fetched_rows"):
        assert stats[0][key] == stats[1][key], key


@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_model_generate_replays_graphs_and_equals_eager(batch):
    """specache.compile then an unchanged model.generate (the bucketed StaticCache it defaults to for the static
    policy): decode steps replayed as CUDA graphs (decode_graphs.py) give the tokens and the store's bookkeeping of the
    same loop run eagerly (cuda_graphs=False), over two calls of different lengths."""
    base = _bigger(torch.bfloat16)
    runs = []
    for graphs in (False, True):
        torch._dynamo.reset()
        m = twin(base)
        specache.compile(m, topk=32, inner="inductor", cuda_graphs=graphs, policy_options={"static": True})
        outs = []
        for i, (s, n) in enumerate(((1500, 20), (1300, 16))):
            ids = torch.randint(2, 128, (batch, s), device="cuda", generator=torch.Generator("cuda").manual_seed(i))
            with torch.no_grad():
                outs.append(m.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n))
        st = specache.stats(m)
        runs.append((outs, next(iter(st["store"].values())), st["cuda_graphs"]))
    (eager, st0, g0), (graphed, st1, g1) = runs
    assert all(torch.equal(a, b) for a, b in zip(eager, graphed))
    for key in ("length", "decode_steps", "fetched_rows", "fetched_bytes"):
        assert st0[key] == st1[key], key
    assert g0["replayed"] == 0 and g1["captured"] == 2 and g1["replayed"] == (20 - 1 - 3) + (16 - 1 - 3), g1


def _default_then_static(policy, new_tokens, statics=(False, "auto"), generate_kw=None, **compile_kw):
    """model.generate's tokens after specache.compile with the policy's default path and then its static path
    (policy_options static in ``statics``), float32, 700-token prompts, batch 2; and the last compiled model."""
    base = _bigger(torch.float32)
    ids = torch.randint(2, 128, (2, 700), device="cuda")
    opts = compile_kw.pop("policy_options", {})
    outs = []
    for static in statics:
        torch._dynamo.reset()
        m = twin(base)
        specache.compile(m, policy=policy, inner="inductor", policy_options={**opts, "static": static}, **compile_kw)
        with torch.no_grad():
            outs.append(m.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                   **(generate_kw or {})))
    return outs, m


def test_cuda_quant_static_path_replays_and_equals_its_default_path():
    """quant with policy_options static=True: SpeCache's static path without the fetch, its decode steps replayed as
    CUDA graphs under model.generate, gives the tokens of quant's default path (float32: both attend through the same
    Triton low-bit kernel, with their columns in another order)."""
    outs, m = _default_then_static("quant", 40, statics=(False, True),
                                   generate_kw={"cache_implementation": "specache"})
    assert torch.equal(outs[0], outs[1])
    assert specache.stats(m)["cuda_graphs"]["replayed"] == 40 - 1 - 3


@pytest.mark.parametrize("policy, opts", [("streaming", {"budget": 256}), ("snapkv", {"budget": 256})])
def test_cuda_eviction_policy_replays_and_equals_its_default_path(policy, opts):
    """StreamingLLM and SnapKV under specache.compile + model.generate: their static path (policies/kept_static.py,
    the default where the cache is a StaticCache) replayed as CUDA graphs gives the tokens of the default path
    (static=False, a DynamicCache), float32, over prompts longer than the budget (SnapKV's slots grow once)."""
    outs, m = _default_then_static(policy, 100, policy_options=opts)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    g = specache.stats(m)["cuda_graphs"]
    assert g["replayed"] >= 100 - 1 - 3 * g["captured"] and g["captured"] >= 1, g


def test_cuda_replayed_steps_have_no_host_sync():
    """A replayed step (input copies, the graph, the bookkeeping, the fresh outputs) never waits for the GPU."""
    base = _bigger(torch.bfloat16)
    torch._dynamo.reset()
    m = twin(base)
    specache.compile(m, topk=32, inner="inductor", policy_options={"static": True})
    from transformers import StaticCache

    cache = StaticCache(config=m.config, max_cache_len=2048)
    ids = torch.randint(2, 128, (1, 1500), device="cuda")
    with torch.no_grad():
        tok = m(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for i, p in enumerate(range(1500, 1512)):
            torch.cuda.set_sync_debug_mode("error" if i >= 4 else 0)
            try:
                pos = torch.full((1, 1), p, device="cuda")
                tok = m(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos,
                        cache_position=pos[0]).logits[:, -1:].argmax(-1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert specache.stats(m)["cuda_graphs"]["replayed"] == 12 - 3


def test_cuda_static_decode_has_no_host_sync():
    base = _bigger(torch.bfloat16)
    torch._dynamo.reset()
    m = twin(base)
    specache.compile(m, topk=32, inner="inductor", policy_options={"static": True})
    ids = torch.randint(2, 128, (1, 1500), device="cuda")
    _static_run(m, ids, 12, 1600)  # compile every graph

    def on_step(i):
        torch.cuda.set_sync_debug_mode("error" if 2 <= i < 10 else 0)

    try:
        _static_run(m, ids, 12, 1600, on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_store_writes_and_reads_do_not_wait_for_the_gpu():
    """A store write from the GPU (one row: the scatter kernel; 600 rows: per-slab copies) and a range read back go
    through pinned memory asynchronously: with a sleep kernel queued first, the calls return while it still runs, and
    the rows are right once the device is done. (copy_ into the non-contiguous range view staged through pageable
    memory and returned only after the device had drained: kernels/quant_ops.py.)"""
    from specache_compile.kernels import quant_ops
    from specache_compile.runtime.buffers import Growable

    g = Growable((2, 8), (128,), torch.bfloat16, "cpu", pin=True, capacity=4096)
    g.append(torch.zeros(2, 8, 1000, 128, dtype=torch.bfloat16, device="cuda"))
    one, many = (torch.randn(2, 8, n, 128, device="cuda").bfloat16() for n in (1, 600))
    g.write(1000, one)  # the scatter kernel's first launch compiles: before the timed part
    g.read(0, 8, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of device time at 1.98 GHz (H100/H200 clocks)
    g.write(1001, one)
    paths = [quant_ops.WRITE_PATH]
    g.write(1002, many)
    paths.append(quant_ops.WRITE_PATH)
    got = g.read(1000, 1602, torch.device("cuda"))
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert paths == ["scatter", "slabs"], (paths, quant_ops.SCATTER_UVA_ERROR)
    assert still_busy, "a store write or read waited for the device"
    want = torch.cat([one, one, many], dim=2)
    assert torch.equal(got, want) and torch.equal(g.view(1000, 1602), want.cpu())


def test_cuda_exact_attention_in_pieces_equals_one_call(monkeypatch):
    """The prefill's SDPA over pieces of the query rows (kernels/attn_ops.exact_attention) on CUDA, bf16, GQA, a boolean
    left-padded causal mask: the same rows as one call (the 128K one-call prefill ran out of memory without it)."""
    from specache_compile.kernels import attn_ops

    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 8, 2, 1000, 128
    dev = "cuda"
    q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(s, s, dtype=torch.bool, device=dev).tril()[None, None].repeat(b, 1, 1, 1)
    mask[1, :, :, :7] = False
    mask[1, :, :7, 0] = True  # no all-masked row
    want = attn_ops.exact_attention(q, k, v, mask, False, d**-0.5)
    monkeypatch.setattr(attn_ops, "EXACT_MASK_ELEMS", b * s * 96)  # pieces of 96 query rows
    got = attn_ops.exact_attention(q, k, v, mask, False, d**-0.5)
    torch.testing.assert_close(got, want)  # bf16 tolerances: a piece may take another split of the keys


# -- issue 18: the fused decode kernel on the static path, and the full-graph baseline's attention -------------------


def test_cuda_static_path_runs_the_fused_kernel_and_equals_the_unfused_path():
    """On CUDA the static path decodes through fused_decode's Triton kernel (st.fused) and, with a top-k covering the
    context (every low-bit row substituted: exact attention either way), gives the unfused path's tokens and
    bookkeeping, speculative and plain, graphed and eager."""
    from specache_compile.policies import specache_static

    base = _bigger(torch.float32)
    ids = torch.randint(2, 128, (2, 700), device="cuda")
    for speculative, graphed in ((True, True), (False, False)):
        outs, stats = [], []
        for fused in ("never", "auto"):
            torch._dynamo.reset()
            specache_static.FUSED = fused
            try:
                m = twin(base)
                specache.compile(m, topk=1024, window=64, group_size=64, inner="inductor",
                                 policy_options={"static": True})
                outs.append(_static_run(m, ids, 24, 800, speculative=speculative, cuda_graph=graphed))
            finally:
                specache_static.FUSED = "auto"
            site = next(iter(specache.runtime_of(m).sites.values()))
            assert site.static.fused == (fused == "auto")
            stats.append(next(iter(specache.stats(m)["store"].values())))
        assert torch.equal(outs[0], outs[1]), (speculative, graphed)
        for key in ("length", "decode_steps", "prefetch_issued", "prefetch_consumed", "fetched_rows"):
            assert stats[0][key] == stats[1][key], key


def test_cuda_capacity_attention_equals_sdpa_over_the_written_rows():
    """bench/decode.py's full-graph attention (flash over the capacity, the unwritten rows' share taken out through
    the log-sum-exp) against SDPA over the written rows, bf16, GQA 4."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.decode import check_capacity_attention

    assert check_capacity_attention(torch.device("cuda"), torch.bfloat16) < 1e-2


@pytest.mark.parametrize("topk", [32, 1024])
def test_cuda_kcache_replays_and_equals_its_default_path(topk):
    """KCache under specache.compile + model.generate: its static path (policies/kcache_static.py, the default where
    the cache is a StaticCache: K at the capacity, V written to the pinned store and fetched by device index) replayed
    as CUDA graphs gives the tokens of the default path (static=False, a DynamicCache), float32, with a top-N below
    the 700..800 written positions (the selection matters) and one covering the cache's 1024."""
    (ref, out), m = _default_then_static("kcache", 100, topk=topk)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    st = specache.stats(m)
    g = st["cuda_graphs"]
    assert g["captured"] == 1 and g["replayed"] == 100 - 1 - 3, g  # build, prove, capture, then replays
    site = next(iter(specache.runtime_of(m).sites.values()))
    assert site.static is not None and site.v.data.is_pinned()
    n = site.static.topn
    for s in st["store"].values():  # the replayed steps counted as the ones run from Python
        assert s["length"] == 700 + 99 and s["decode_steps"] == 99 and s["fetched_rows"] == 99 * 2 * 2 * n, s


def test_cuda_cake_replays_and_equals_its_default_path():
    """CAKE under specache.compile + model.generate: its static path (policies/cake_static.py, the default where the
    cache is a StaticCache: B_l + S_w + 1 slots per site, the decode eviction computed on fixed shapes and applied by a
    device condition) replayed as CUDA graphs gives the tokens of the default path (static=False, a DynamicCache),
    float32, over prompts longer than the budget: the prefill evicts, then every decode step does."""
    outs, m = _default_then_static("cake", 100, policy_options={"budget": 256})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    st = specache.stats(m)
    g = st["cuda_graphs"]
    assert g["captured"] == 1 and g["replayed"] == 100 - 1 - 3, g  # build, prove, capture, then replays
    rt = specache.runtime_of(m)
    for name, site in rt.sites.items():
        rep = rt.policy.site_report(site)
        assert rep["cake_kept"] == rep["cake_budget"] + 32, (name, rep)  # evicted back to B_l + S_w every step
        assert site.static.k.shape[2] == rep["cake_budget"] + 32 + 1
    assert all(s["length"] == 700 + 99 and s["decode_steps"] == 99 for s in st["store"].values())


def test_cuda_kvcomp_replays_and_equals_its_default_path(monkeypatch):
    """KVComp under specache.compile + model.generate: its static path (policies/kvcomp_static.py, the default where
    the cache is a StaticCache: the compressed streams and recent buffers at fixed shapes, lengths on the device,
    the kernels over fixed views) replayed as CUDA graphs gives the tokens of the default path (static=False, a
    DynamicCache), float32, the paper's settings: a K block is compressed at positions 703 and 767 and a V block at
    767, on steps run from Python between the replays."""
    from specache_compile.policies import kvcomp_static

    # the steps at which some site's state was replaced mid-sequence (a stream outgrew its reserved words): each is
    # proven and captured again
    replaced = set()
    init = kvcomp_static.KVCompState.__init__

    def counting(self, policy, site, capacity, prev=None):
        init(self, policy, site, capacity, prev)
        if prev is not None:
            replaced.add(site.length)

    monkeypatch.setattr(kvcomp_static.KVCompState, "__init__", counting)
    outs, m = _default_then_static("kvcomp", 100)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    st = specache.stats(m)
    rt = specache.runtime_of(m)
    state = next(iter(rt.sites.values())).static
    g = st["cuda_graphs"]
    more = len(replaced)
    # build, prove, capture, the two block steps, then replays
    assert g["captured"] == 1 + more and g["replayed"] == 100 - 1 - 3 - 2 - 2 * more, g
    if not more:  # the prefill's blocks (512 K, 384 V tokens) and four more of each, within the capacity's room
        pol = rt.policy
        most_v = (state.cap - pol.v_recent) // pol.v_block * pol.v_block
        assert state.kcap == 512 + 4 * pol.k_block and state.vcap == min(384 + 4 * pol.v_block, most_v), \
            (state.kcap, state.vcap)
    for s in st["store"].values():  # the replayed steps counted as the ones run from Python
        assert s["length"] == 700 + 99 and s["decode_steps"] == 99, s
        assert s["compressed_tokens_k"] == 640 and s["compressed_tokens_v"] == 512, s


@pytest.mark.parametrize("max_seq_len", [None, 4096])
def test_cuda_full_replays_and_equals_the_unmodified_model(max_seq_len):
    """policy="full" under specache.compile + model.generate: its static path (policies/full.py: the new token
    written into the pinned store from the GPU, the store's capacity fetched each step) replayed as CUDA graphs gives
    the unmodified model's tokens (float32). With max_seq_len the store is reserved past the cache's capacity, so
    the fetched range is a non-contiguous view of pinned memory (a capture refused a plain ``.to`` of it)."""
    base = _bigger(torch.float32)
    ids = torch.randint(2, 128, (2, 700), device="cuda")
    with torch.no_grad():
        want = base.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
        m = twin(base)
        specache.compile(m, policy="full", inner="inductor", max_seq_len=max_seq_len)
        got = m.generate(ids, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = specache.stats(m)["cuda_graphs"]
    assert g["captured"] == 1 and g["replayed"] == 40 - 1 - 3, g


def test_cuda_previous_query_prefetch_replays_and_equals_eager():
    """policy_options prefetch="previous" under model.generate: each plain step attends the rows the previous step's
    query chose, fetched on the side stream, through two graphs (the slots alternate); replayed, it gives the tokens
    and the bookkeeping of the same loop run eagerly (cuda_graphs=False)."""
    base = _bigger(torch.bfloat16)
    ids = torch.randint(2, 128, (2, 1500), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs = []
    for graphs in (False, True):
        torch._dynamo.reset()
        m = twin(base)
        specache.compile(m, topk=32, inner="inductor", cuda_graphs=graphs,
                         policy_options={"static": True, "prefetch": "previous", "hit_every": 1})
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=30, do_sample=False, min_new_tokens=30)
        st = specache.stats(m)
        runs.append((out, next(iter(st["store"].values())), st["cuda_graphs"]))
    (eager, st0, _), (graphed, st1, g1) = runs
    assert torch.equal(eager, graphed)
    for key in ("length", "decode_steps", "fetched_rows", "prefetch_issued", "prefetch_consumed"):
        assert st0[key] == st1[key], key
    assert g1["captured"] == 2 and g1["replayed"] == 29 - 5, g1
