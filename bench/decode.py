"""End-to-end decode: the full cache on the GPU, transformers' offloaded cache, and specache, side by side.

    python bench/decode.py                                   # GPU: Llama-3-8B shape, 8K/32K/128K, batch 1 (+8)
    python bench/decode.py --tiny --contexts 256 512         # CPU smoke run (a 2-layer model; no figures worth citing)

A Llama-3-8B-shaped model (32 layers, hidden 4096, 32/8 heads, D=128) with random bf16 weights, built once; every
method gets a view of the same weights. Per (method, context, batch): a prefill in chunks, then ``--warmup`` steps
(recompiles land there) and ``--steps`` timed decode steps (CUDA events between consecutive steps, median), then
``--timed-fetch`` steps with the fetch spans recorded (runtime/streams.py FetchTimer) for fetch GB/s and the exposed
fetch time. Methods:

- ``full``: the model with a StaticCache on the GPU, decode compiled with torch.compile (default mode), prefill eager;
- ``full-packed``: the same, with a decode step's GQA query heads packed as rows of their KV head for SDPA instead of
  transformers' ``repeat_kv`` of the cache (which makes SDPA read the KV ``Hq / Hkv`` times: 1467 vs 195 us a layer
  at 128K in bench/kernel_bench.py); its rows in bench/results/decode.jsonl are slower than ``full``'s;
- ``full-flash``: the same, with a decode step's SDPA over the written positions only (``K[:, :, :kv_len]``, no mask,
  ``enable_gqa``), so SDPA may take its flash kernel (kept off cuDNN: see the attention function below); its step
  is host-bound (an eager loop), its GPU time is the flash kernel's;
- ``full-graph``: the full cache at its best, the opponent of ``specache-graph``: every decode step one replay of a
  CUDA graph (captured once over the compiled step), whose attention is the flash kernel over the StaticCache's
  capacity with GQA left to it (no mask, no ``repeat_kv``) and the unwritten rows' share taken out exactly through
  the kernel's log-sum-exp (:func:`_capacity_attention`); the capacity is the written positions plus the steps run;
- ``hf-offloaded``: transformers' DynamicCache(offloading=True) (OffloadedCache), eager;
- ``specache``: ``specache.compile`` defaults, driven by ``specache.generate`` (speculative prefetch);
- ``specache-noprefetch``: the same with speculation off (fetch after the real query, on the main stream);
- ``specache-static`` / ``specache-graph``: the static decode path (``policy_options={"static": True}``, a
  StaticCache), eager / with its steps replayed as CUDA graphs (``specache.generate(cuda_graph=True)``);
- any other registered policy name (``streaming``, ``snapkv``, ``quant``, ``kcache``, ``cake``, ``kvcomp``...), at a
  KV budget of ``--budget-frac`` of the context where the policy takes one;
- ``hf-generate``: the unmodified model's own ``model.generate`` (its default DynamicCache, eager): what a user
  runs without specache; ``hf-generate-<policy spec>`` (``hf-generate-specache``, ``hf-generate-full``,
  ``hf-generate-specache:static=true``): ``specache.compile`` then an unchanged ``model.generate`` (the cache is
  whatever the compiled model's generate picks: specache's bucketed StaticCache for a static policy); the rows add
  ``graphs_compiled`` (Dynamo graphs the row compiled) beside ``compile_s`` and ``prefill_s`` (the first call);
  ``hf-generate-torch.compile``: plain ``torch.compile(model.forward)`` under the same loop, the first-call
  reference (the unmodified model's first call plus plain torch.compile's compile time);
- any of these but ``full`` / ``hf-offloaded`` with overrides after a colon, as in the eval harness:
  ``specache-graph:bits=1`` (Config fields), ``specache-graph:hit_every=1`` (policy options; the static path samples
  prefetch hits only then).

One JSON line per row to bench/results/decode.jsonl; PNG plots next to it (step time and device memory vs context).
A row that runs out of memory is written with ``oom: true``. Profiled CUDA rows also carry the attention kernels'
GPU time per step and their share of the HBM bandwidth measured in the same process (``hbm_peak_gbps``: a 1 GiB
device-to-device copy, read + write bytes): ``attn_kernel_ms``, ``attn_bytes`` (what they must read a step: the KV
they attend for the full caches, the device tier for specache), ``attn_hbm_pct``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specache  # noqa: E402
from bench.common import RESULTS, env_fields, write_rows  # noqa: E402
from specache_compile.evals.harness import parse_policy, prefetch_hit_rate  # noqa: E402
from specache_compile.generate import cache_keyword  # noqa: E402
from specache_compile.runtime.streams import FetchTimer  # noqa: E402


def build(tiny: bool, device: str, layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers or 2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1 << 17)
        dtype = torch.float32
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=layers or 32, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=1 << 18, rope_theta=500000.0)
        dtype = torch.bfloat16
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():  # random weights at a sane scale (init_std 0.02 on every matrix)
        p.requires_grad_(False)
    return model.eval()


def shared_copy(model):
    """A new module tree over the same parameter tensors (no weight memory): each method compiles its own."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _packed_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """transformers' SDPA attention, except a one-token decode step: the query heads of each GQA group become that
    group's query rows ([B, Hq, 1, D] -> [B, Hkv, rep, D]) against the un-repeated K/V, with the [B, 1, 1, S] mask
    broadcast over them. Under torch.compile transformers repeats K/V instead (``repeat_kv``: 4x the cache read for
    Llama-3-8B), so ``full`` reads every KV byte rep times; ``full-packed`` is the full cache without that."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    if q_len != 1 or hq == hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b, hkv, hq // hkv, d), key, value,
                                                           attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, 1, -1).transpose(1, 2).contiguous(), None


_NOT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _exact_len_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         kv_len=None, **kwargs):
    """transformers' SDPA attention, except a one-token decode step given ``kv_len`` (the positions written so far,
    the same for every row: the bench's prompts have no padding): SDPA over K/V[:, :, :kv_len] with no mask and the
    GQA heads left to SDPA (``enable_gqa``), so it may take its flash kernel. A StaticCache hands attention its whole
    capacity and a mask; that mask is what keeps ``full`` and ``full-packed`` off the 195 us-per-layer SDPA the kernel
    bench measures at 128K. ``full-flash`` is the full cache without either."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or kv_len is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1  # a Python bool (the shapes are symbolic under dynamic=True)
    # not cuDNN: SDPA takes it here and builds a new plan for every kv_len, ~10 ms of host time a call
    # (bench/results/decode_3da8322/host_profile_full-flash_8192x1.txt), which makes the step 6-10x its GPU time
    with sdpa_kernel(_NOT_CUDNN):
        out = torch.nn.functional.scaled_dot_product_attention(query, key[:, :, :kv_len], value[:, :, :kv_len],
                                                               scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _flash_lse(query, key, value, scale):
    """(out [B, Hq, Sq, D], logsumexp [B, Hq, Sq]) of softmax attention over all of key/value [B, Hkv, C, D]: the flash
    kernel on CUDA (GQA native: the key/value heads are not repeated); on the CPU (smoke runs) its CPU twin, over
    repeated heads."""
    if query.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False,
                                                                  scale=scale)[:2]
    rep = query.shape[1] // key.shape[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), 0.0, False, scale=scale)[:2]


def _capacity_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        kv_len_t=None, **kwargs):
    """``full-graph``'s attention: transformers' SDPA attention, except a one-token decode step given ``kv_len_t``
    (the written positions, a device tensor: a CUDA graph replays the step at the next length). Flash attention over
    the whole StaticCache, whose rows past ``kv_len_t`` are zeros (the cache is allocated zeroed and written in
    order): each adds exp(0) to the softmax sum and nothing to the numerator, so with Z = exp(lse) the exact output
    over the written rows is ``out * Z / (Z - unwritten) = out / (1 - unwritten * exp(-lse))``. The bytes read are
    the capacity's, which the bench sets to the written positions plus the steps it runs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or kv_len_t is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, lse = _flash_lse(query, key, value, scale)
    unwritten = (key.shape[2] - kv_len_t).to(torch.float32)  # [1]
    out = out.float() / (1.0 - unwritten * torch.exp(-lse.float())).unsqueeze(-1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def check_capacity_attention(device, dtype, n=4099, capacity=4130, b=2, hq=32, hkv=8, d=128) -> float:
    """``_capacity_attention``'s error against SDPA over the written rows, relative (||.|| / ||.||), on ``device``:
    the full-graph rows carry it (``attn_check_rel_err``), so a row whose baseline computed something else shows it."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(b, hkv, capacity, d, device=device, dtype=dtype, generator=g) for _ in range(2))
    k[:, :, n:] = 0
    v[:, :, n:] = 0
    got = _capacity_attention(None, q, k, v, None, scaling=d**-0.5, kv_len_t=torch.tensor([n], device=device))[0]
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k[:, :, :n].float(), v[:, :, :n].float(),
                                                            scale=d**-0.5, enable_gqa=True).transpose(1, 2)
    return ((got.float() - want).norm() / want.norm()).item()


def _use_attention(model, name: str, fn) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)


def _use_packed_gqa(model) -> None:
    _use_attention(model, "sdpa_packed_gqa", _packed_gqa_attention)


def cache_bytes(cache, device_type: str) -> int:
    n = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.device.type == device_type:
                n += t.numel() * t.element_size()
    return n


class StepClock:
    """CUDA events between consecutive decode steps (no sync while running); wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def steps_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


# Kernels that move KV from host memory to the device: specache's zero-copy gather (the fetch) and copy-engine host to
# device copies (transformers' offloaded cache, any staged copy).
FETCH_KERNELS = ("gather_rows", "Memcpy HtoD")


def fetch_overlap(kernels: list[tuple[str, float, float]]) -> dict[str, float]:
    """GPU time of the fetch kernels in a profiled span, and the part of it no other kernel overlapped.

    kernels: (name, start_us, end_us) of every device kernel and copy. "Exposed" is the time some fetch kernel ran
    and no other kernel did, on any stream: the step waited on the fetch, or the fetch filled a gap in the step. It
    needs no host timer, so it also measures CUDA-graph replays, where no Python runs between the kernels.
    """

    def union(iv):
        out = []
        for a, b in sorted(iv):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out

    parts: dict[bool, list] = {True: [], False: []}  # is a fetch -> its intervals
    for n, a, b in kernels:
        parts[any(f in n for f in FETCH_KERNELS)].append((a, b))
    fetch, other = union(parts[True]), union(parts[False])
    busy = sum(b - a for a, b in fetch)
    covered, j = 0.0, 0
    for a, b in fetch:  # both lists are sorted and disjoint: one sweep
        while j < len(other) and other[j][1] <= a:
            j += 1
        k = j
        while k < len(other) and other[k][0] < b:
            covered += min(b, other[k][1]) - max(a, other[k][0])
            k += 1
    return {"fetch_busy_us": busy, "exposed_us": busy - covered}


def top_kernels(events, steps: int, n: int = 8) -> list[dict]:
    """The n device kernels (and copies) with the most GPU time in a profiled span, per step: where a method's GPU
    busy time goes. events: (name, self device us, calls) per distinct kernel name, summed over the span (the
    profiler's key_averages); the shares are of all kernels' time, so a row says at once what dominates."""
    total = sum(us for _, us, _ in events) or 1.0
    rows = sorted((e for e in events if e[1] > 0), key=lambda e: -e[1])[:n]
    return [{"kernel": name[:120], "ms": us / 1e3 / steps, "calls": calls / steps, "share": us / total}
            for name, us, calls in rows]


def prefill(forward, ids, cache, chunk) -> torch.Tensor:
    """The prompt in chunks of ``chunk`` tokens; returns the greedy next token [B, 1]."""
    out = None
    kw = {cache_keyword(forward.__self__): cache}  # (transformers renames past_key_values to cache)
    for a in range(0, ids.shape[1], chunk):
        e = min(ids.shape[1], a + chunk)
        out = forward(input_ids=ids[:, a:e], use_cache=True, cache_position=torch.arange(a, e, device=ids.device),
                      logits_to_keep=1, **kw)
    return out.logits[:, -1:].argmax(-1)


def greedy(forward_prefill, forward_decode, ids, cache, n_steps, chunk, on_step, pass_kv_len=False):
    """Plain greedy loop for the non-specache methods: chunked prefill, then one token per step. pass_kv_len: decode
    calls also get ``kv_len``, the positions written after the step's token (``full-flash``'s attention reads it)."""
    s, dev = ids.shape[1], ids.device
    tok = prefill(forward_prefill, ids, cache, chunk)
    kw = {cache_keyword(forward_prefill.__self__): cache}
    for i in range(n_steps - 1):
        extra = {"kv_len": s + i + 1} if pass_kv_len else {}
        out = forward_decode(input_ids=tok, use_cache=True, cache_position=torch.tensor([s + i], device=dev),
                             logits_to_keep=1, **kw, **extra)
        tok = out.logits[:, -1:].argmax(-1)
        on_step(i)
    return tok


def graph_greedy(forward_prefill, forward_decode, ids, cache, n_steps, chunk, on_step):
    """``full-graph``'s loop: greedy's chunked prefill, then every decode step one replay of a CUDA graph captured
    once over static inputs (the token, its position and the written length, device tensors advanced in place
    between replays). On the CPU (smoke runs) the same steps without a graph."""
    s, dev = ids.shape[1], ids.device
    tok = prefill(forward_prefill, ids, cache, chunk)
    pos = torch.tensor([s], device=dev)
    kv_len = pos + 1
    kw = {cache_keyword(forward_prefill.__self__): cache}

    def step():
        return forward_decode(input_ids=tok, use_cache=True, cache_position=pos, logits_to_keep=1, kv_len_t=kv_len,
                              **kw)

    graph = None
    if dev.type == "cuda":
        # warm-up (the compile) on a side stream, as torch.cuda.graph asks; each call writes position s with the
        # step's own token, which the first replay writes again
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    for i in range(n_steps - 1):
        if graph is not None:
            graph.replay()
        else:
            out = step()
        tok.copy_(out.logits[:, -1:].argmax(-1))
        pos += 1
        kv_len += 1
        on_step(i)
    return tok


# Kernels that read the KV a decode step attends: the flash kernels (full caches), specache's decode kernels.
ATTN_KERNELS = ("flash_fwd", "fused_decode_kernel", "rank_topk_kernel", "rank_probs_kernel",
                "lowbit_decode_split_kernel", "lowbit_scores_kernel", "merge_splits_kernel",
                "substitution_bitmap_kernel", "row_stats_kernel", "block_topk_kernel")


def hbm_peak_gbps(reps: int = 20) -> float:
    """HBM bandwidth of a 1 GiB device-to-device copy (bytes read + written), median over reps, CUDA events."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (statistics.median(times) * 1e-3) / 1e9


def hf_generate(model, ids, n: int, on_step):
    """``model.generate(ids, max_new_tokens=n)`` greedy, exactly n tokens (no end-of-sequence stop), on_step(i) after
    each new token (i = 0 after the prefill's), called by a stopping criterion that never stops. Returns the cache the
    call decoded into (transformers names the output's field ``cache`` where it renamed ``past_key_values``)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Marks(StoppingCriteria):
        i = 0

        def __call__(self, input_ids, scores, **kwargs):
            on_step(self.i)
            self.i += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, stopping_criteria=StoppingCriteriaList([Marks()]), pad_token_id=0,
                         return_dict_in_generate=True)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def run_row(method, base, ctx, batch, args, compiled: dict):
    dev = next(base.parameters()).device
    cuda = dev.type == "cuda"
    ids = torch.randint(3, base.config.vocab_size, (batch, ctx), device=dev)
    total = args.warmup + args.steps + args.timed_fetch + args.profile_steps + 2
    clock = StepClock(cuda)
    runtime = None

    prof = {}

    def on_step(i):
        clock.mark()
        if i == 0:  # the prefill (and the first decode step) is behind us: with its compile time, see compile_s
            prof["prefill_end"] = time.perf_counter()
        if runtime is not None and args.timed_fetch and i == args.warmup + args.steps:
            runtime.streams.timer = FetchTimer()  # the last timed_fetch steps record fetch spans
        if cuda and args.profile_steps:
            # after the fetch-timed steps: a profiler over a few steps gives the GPU busy time per step, i.e. what
            # CUDA graphs could save at most (step time - GPU busy = host-side launch overhead)
            start = args.warmup + args.steps + args.timed_fetch
            if i == start:
                acts = [torch.profiler.ProfilerActivity.CUDA]
                if args.host_profile:  # host time per op as well: where the step's launch overhead goes
                    acts.append(torch.profiler.ProfilerActivity.CPU)
                prof["p"] = torch.profiler.profile(activities=acts)
                prof["p"].start()
                if args.host_profile:  # and the Python functions the host spends the step in
                    import cProfile

                    prof["py"] = cProfile.Profile()
                    prof["py"].enable()
            elif i == start + args.profile_steps:
                if "py" in prof:
                    prof["py"].disable()
                torch.cuda.synchronize()
                prof["p"].stop()

    row = {"bench": "decode", "method": method, "context": ctx, "batch": batch}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    t0 = time.perf_counter()
    compile0 = _compile_seconds()
    kv_dev = host = 0
    hit = None
    with torch.no_grad():
        if method == "full-graph":
            from transformers import StaticCache

            if method not in compiled:
                compiled[method] = shared_copy(base)
                _use_attention(compiled[method], "sdpa_capacity", _capacity_attention)
            m = compiled[method]
            # dynamic=True: one compile for every row (a graph is captured per row, at its shapes)
            fwd = compiled.setdefault(method + "_fwd", torch.compile(m.forward, dynamic=True))
            cache = StaticCache(config=m.config, max_cache_len=ctx + total + 1)
            graph_greedy(m.forward, fwd, ids, cache, total, args.prefill_chunk, on_step)
            kv_dev = cache_bytes(cache, dev.type)
            if cuda:
                row["attn_check_rel_err"] = check_capacity_attention(dev, torch.bfloat16)
        elif method in ("full", "full-packed", "full-flash"):
            from transformers import StaticCache

            if method not in compiled:
                compiled[method] = shared_copy(base)
                if method == "full-packed":
                    _use_packed_gqa(compiled[method])
                if method == "full-flash":
                    _use_attention(compiled[method], "sdpa_exact_len", _exact_len_attention)
            m = compiled[method]
            # dynamic=True: one graph for every cache length (a static-shape graph per context costs a compile each)
            fwd = compiled.setdefault(method + "_fwd", torch.compile(m.forward, dynamic=True))
            cache = StaticCache(config=m.config, max_cache_len=ctx + total + 1)
            greedy(m.forward, fwd, ids, cache, total, args.prefill_chunk, on_step, pass_kv_len=method == "full-flash")
            kv_dev = cache_bytes(cache, dev.type)
        elif method == "hf-offloaded":
            from transformers import DynamicCache

            m = compiled.setdefault("hf", shared_copy(base))
            try:
                cache = DynamicCache(config=m.config, offloading=True)
            except TypeError:
                from transformers import OffloadedCache

                cache = OffloadedCache()
            greedy(m.forward, m.forward, ids, cache, total, args.prefill_chunk, on_step)
            kv_dev = cache_bytes(cache, dev.type)
            host = cache_bytes(cache, "cpu")
        elif method.startswith("hf-generate"):
            key = method
            if key not in compiled:
                m = shared_copy(base)
                if method == "hf-generate-torch.compile":  # the first-call reference: plain torch.compile(model)
                    m.forward = torch.compile(m.forward)
                elif method != "hf-generate":  # hf-generate-<policy spec>: specache.compile, then the same loop
                    name, overrides = parse_policy(method[len("hf-generate-"):])
                    specache.compile(m, policy=name, inner=args.inner, **overrides)
                compiled[key] = m
            m = compiled[key]
            graphs0 = counters["stats"]["unique_graphs"]
            cache = hf_generate(m, ids, total, on_step)
            row["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs0
            if method in ("hf-generate", "hf-generate-torch.compile"):
                kv_dev = cache_bytes(cache, dev.type)
            else:
                mem = specache.memory(m)
                kv_dev, host = mem["device"], mem["host"]
                # decode steps replayed as CUDA graphs / run from Python (specache_compile/decode_graphs.py)
                row["cuda_graphs"] = specache.stats(m)["cuda_graphs"]
                specache.reset(m)
        else:
            key = method
            # "specache-graph:bits=1" -> the method, with Config / policy_options overrides (the eval harness's syntax)
            method, overrides = parse_policy(method)
            if key not in compiled:
                m = shared_copy(base)
                name = "specache" if method.startswith("specache") else method
                opts = {}
                if name not in ("specache", "full", "quant", "kvcomp", "kcache"):
                    opts = {"policy_options": {"budget": args.budget_frac}}
                if method == "specache-cake":  # the composition: CAKE's budgets decide the per-layer top-k
                    opts = {"policy_options": {"layer_budgets": "cake"}}
                if method in ("specache-static", "specache-graph"):  # fixed-capacity state (specache_static.py)
                    opts = {"policy_options": {"static": True}}
                opts = {**opts, **overrides, "policy_options": {**opts.get("policy_options", {}),
                                                                **overrides.get("policy_options", {})}}
                specache.compile(m, policy=name, inner=args.inner, **opts)
                compiled[key] = m
            m = compiled[key]
            runtime = specache.runtime_of(m)  # specache.compile attached it: on_step can start the fetch timer
            spec = method in ("specache", "specache-cake", "specache-static", "specache-graph")
            # the static path decodes into the StaticCache generate makes for it (prompt + new tokens + 2 positions);
            # on CPU the graph row records generate's refusal
            specache.generate(m, ids, total, speculative=spec, prefill_chunk=args.prefill_chunk, on_step=on_step,
                              cuda_graph=method == "specache-graph")
            mem = specache.memory(m)
            kv_dev, host = mem["device"], mem["host"]
            hit = prefetch_hit_rate(m)
            timer, runtime.streams.timer = runtime.streams.timer, None
            if timer is not None and cuda:
                f = timer.summary()
                moved_ms = f.get("prefetch_ms", 0.0) + f.get("demand_ms", 0.0)
                moved = f.get("prefetch_bytes", 0) + f.get("demand_bytes", 0)
                row["fetch_gbps"] = moved / moved_ms / 1e6 if moved_ms else None
                row["exposed_fetch_ms"] = (f.get("wait_ms", 0.0) + f.get("demand_ms", 0.0)) / args.timed_fetch
                row["fetch_spans"] = f
            specache.reset(m)
    wall = time.perf_counter() - t0
    times = clock.steps_ms()
    timed = times[args.warmup : args.warmup + args.steps]
    step = statistics.median(timed)
    row.update({
        "step_ms": step,
        "tok_s": batch * 1e3 / step,
        "kv_device_bytes": kv_dev,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "weights_bytes": weights,
        "host_kv_bytes": host,
        "prefetch_hit_rate": hit,
        "first_steps_ms": times[: args.warmup],
        "row_wall_s": wall,
        # wall seconds from the row's start to the end of the first decode step: the chunked prefill, the first step
        # and the compiles they triggered (compile_s)
        "prefill_s": prof["prefill_end"] - t0 if "prefill_end" in prof else None,
        "compile_s": _compile_seconds() - compile0,  # Dynamo + inner compiler time spent inside this row
        "hbm_peak_gbps": args.hbm_peak,
        "inner": ("inductor" if method.startswith("full") or method == "hf-generate-torch.compile"
                  else "eager" if method in ("hf-offloaded", "hf-generate") else args.inner),
    })
    if "p" in prof:
        # self time only: with --host-profile the CPU ops are recorded too, and an op's device_time_total holds its
        # children's kernels (aten::linear holds aten::mm's), so summing totals would count a kernel once per
        # enclosing op (with CUDA activity alone recorded, the two sums agree)
        busy_us = sum(e.self_device_time_total for e in prof["p"].key_averages() if e.key != "ProfilerStep*")
        row["gpu_busy_ms"] = busy_us / 1e3 / args.profile_steps
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof["p"].events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        # the kernels that take the GPU time, per step (named by kernel; the CPU ops, if recorded, hold no self time)
        avgs = [e for e in prof["p"].key_averages() if e.key != "ProfilerStep*" and e.self_device_time_total > 0]
        on_device = [e for e in avgs if e.device_type == torch.autograd.DeviceType.CUDA] or avgs
        row["gpu_top_kernels"] = top_kernels([(e.key, e.self_device_time_total, e.count) for e in on_device],
                                             args.profile_steps)
        # the attention kernels' GPU time per step, and the bytes they must read a step: the KV attended (full caches:
        # every layer's K and V over the written positions, or the capacity for full-graph), the device tier
        # (specache: the low-bit copy, window and fetched rows, all read each step)
        attn_us = sum(e.self_device_time_total for e in on_device if any(k in e.key for k in ATTN_KERNELS))
        if attn_us:
            cfg = base.config
            kv_len = ctx + total + 1 if method == "full-graph" else ctx + args.warmup + args.steps + args.timed_fetch
            full_bytes = (2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * kv_len
                          * (cfg.hidden_size // cfg.num_attention_heads) * next(base.parameters()).element_size())
            row["attn_kernel_ms"] = attn_us / 1e3 / args.profile_steps
            row["attn_bytes"] = full_bytes if method.startswith("full") else kv_dev
            if args.hbm_peak:
                row["attn_hbm_pct"] = 100.0 * row["attn_bytes"] / (row["attn_kernel_ms"] * 1e-3) / 1e9 / args.hbm_peak
        f = fetch_overlap(kernels)
        row["profiled_fetch_ms"] = f["fetch_busy_us"] / 1e3 / args.profile_steps
        row["profiled_exposed_fetch_ms"] = f["exposed_us"] / 1e3 / args.profile_steps
        if args.host_profile:
            table = prof["p"].key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
            name = f"host_profile_{method}_{ctx}x{batch}.txt"
            for folder in {RESULTS, Path(os.environ.get("OUT", RESULTS))}:
                (folder / name).write_text(f"{args.profile_steps} steps, {method} {ctx}x{batch}\n{table}\n")
        if "py" in prof:
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(prof["py"], stream=text).sort_stats("tottime").print_stats(60)
            name = f"host_pyprofile_{method}_{ctx}x{batch}.txt"
            for folder in {RESULTS, Path(os.environ.get("OUT", RESULTS))}:
                (folder / name).write_text(text.getvalue())
    row.setdefault("fetch_gbps", None)
    if row.get("exposed_fetch_ms") is None and row.get("profiled_exposed_fetch_ms") is not None:
        # graph replays run no host timer: the profiled timeline's measure (see fetch_overlap)
        row["exposed_fetch_ms"] = row["profiled_exposed_fetch_ms"]
        row["exposed_fetch_source"] = "profile"
    row.setdefault("exposed_fetch_ms", None)
    return row


def _compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (Dynamo's own per-frame timer, backend included)."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab20").colors  # more methods than the default cycle's 10 colours
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        style = {"marker": "o", "label": method, "color": colors[i % 20], "linestyle": ("-", "--")[i // 10 % 2]}
        rs = sorted((r for r in rows if r["method"] == method and r["batch"] == 1 and r.get("step_ms")),
                    key=lambda r: r["context"])
        if not rs:
            continue
        x = [r["context"] for r in rs]
        axes[0].plot(x, [r["step_ms"] for r in rs], **style)
        axes[1].plot(x, [r["kv_device_bytes"] / 2**30 for r in rs], **style)
    for ax, title, unit in ((axes[0], "decode step (batch 1)", "ms"), (axes[1], "KV bytes on the device", "GiB")):
        ax.set_xscale("log", base=2)
        if ax is axes[0]:
            ax.set_yscale("log")  # hf-offloaded's ~1 s steps would flatten every other line
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(", ".join(sorted({r.get("device", "?") for r in rows})) + ": newest row per method and context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latest_rows(path: Path, device: str | None = None) -> list[dict]:
    """The newest measured row per (method, context, batch) in a results file (rows are appended run after run), of
    one GPU model: `device` (a substring of the rows' device name), or the newest row's device when None, since rows
    of two GPUs side by side compare the machines, not the methods."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("step_ms")]
    if device is None and rows:
        device = rows[-1].get("device", "")
    latest = {}
    for r in rows:
        if device is None or device in r.get("device", ""):
            latest[(r["method"], r["context"], r["batch"])] = r
    return list(latest.values())


def plot_side_by_side(rows, context: int, path: Path):
    """Bars, one per method at one context: step time (and the GPU-busy part of it), KV bytes on the device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted((r for r in rows if r["context"] == context and r["batch"] == 1), key=lambda r: r["step_ms"])
    if not rs:
        return
    names = [f"{r['method']}\n{r['git_sha'][:7]}" for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    axes[0].bar(names, [r["step_ms"] for r in rs], color="tab:blue", label="decode step")
    axes[0].bar(names, [r.get("gpu_busy_ms") or 0 for r in rs], color="tab:orange", width=0.4,
                label="GPU busy (profiled steps)")
    axes[0].set_ylabel("ms per step (batch 1, log scale)")
    axes[0].set_yscale("log")  # 12 ms to 2.7 s in one chart
    axes[0].legend(fontsize=7)
    axes[1].bar(names, [r["kv_device_bytes"] / 2**30 for r in rs], color="tab:green")
    axes[1].set_ylabel("KV bytes on the device (GiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    devices = ", ".join(sorted({r.get("device", "?") for r in rs}))
    fig.suptitle(f"Llama-3-8B shape, {context // 1024}K context, {devices}: newest row per method "
                 "(commit under each bar)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring as written, and every flag's default."""

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--methods", nargs="+", default=["full", "hf-offloaded", "specache", "specache-noprefetch"],
                    help="methods to time, one row each per shape (see the module docstring for the names)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072],
                    help="prompt lengths in tokens")
    ap.add_argument("--batches", nargs="+", type=int, default=[1], help="batch sizes")
    ap.add_argument("--extra", nargs="*", default=[], metavar="CTXxBATCH",
                    help="extra (context, batch) rows, e.g. 65536x8 (where full runs out of memory)")
    ap.add_argument("--extra-methods", nargs="*", default=["full", "specache"],
                    help="the methods that run the --extra rows")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps (their median is step_ms)")
    ap.add_argument("--warmup", type=int, default=3, help="decode steps before the timed ones (recompiles land there)")
    ap.add_argument("--timed-fetch", type=int, default=4,
                    help="steps after the timed ones with the fetch spans recorded (fetch GB/s, exposed fetch)")
    ap.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler (GPU busy time)")
    ap.add_argument("--host-profile", action="store_true",
                    help="profile host time per op over the --profile-steps steps (a table per row in results/)")
    ap.add_argument("--prefill-chunk", type=int, default=8192, help="prefill in chunks of this many tokens")
    ap.add_argument("--budget-frac", type=float, default=0.15, help="KV budget of eviction policies (fraction)")
    ap.add_argument("--inner", default="auto", help="specache's inner compiler (auto = inductor on CUDA)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the Llama-3-8B-shaped model (default: its 32; fewer for a quick run)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer fp32 model (CPU smoke run)")
    ap.add_argument("--out", default="decode.jsonl", help="rows file under bench/results/ (and $OUT)")
    ap.add_argument("--no-plot", action="store_true", help="write the rows only, no PNG plots")
    ap.add_argument("--plot-only", action="store_true",
                    help="no runs: plot the newest row per method/context of bench/results/<out>")
    ap.add_argument("--plot-device", default=None,
                    help="with --plot-only: the GPU whose rows to plot (a substring of the rows' device; default: the "
                         "newest row's)")
    args = ap.parse_args(argv)
    if args.plot_only:
        rows = latest_rows(RESULTS / args.out, args.plot_device)
        stem = Path(args.out).stem
        plot(rows, RESULTS / f"{stem}.png")
        for ctx in sorted({r["context"] for r in rows}):
            plot_side_by_side(rows, ctx, RESULTS / f"{stem}_methods_{ctx // 1024}k.png")
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # every method's graphs of one model share code objects: room for all of them (the limit is per code object)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    args.hbm_peak = hbm_peak_gbps() if device == "cuda" else None  # the same process's ceiling for attn_hbm_pct
    base = build(args.tiny, device, args.layers)
    shapes = [(c, b) for b in args.batches for c in args.contexts]
    extra = []
    for e in args.extra:
        c, _, b = e.partition("x")
        extra.append((int(c), int(b)))
    env = env_fields()
    rows = []
    for method in args.methods:
        torch._dynamo.reset()  # each method compiles afresh (recompile limits are per code object, process-wide)
        compiled: dict = {}
        for ctx, batch in shapes + (extra if method in args.extra_methods else []):
            try:
                row = run_row(method, base, ctx, batch, args, compiled)
            except torch.cuda.OutOfMemoryError as e:
                row = {"bench": "decode", "method": method, "context": ctx, "batch": batch, "oom": True,
                       "error": str(e).splitlines()[0][:200], "step_ms": None}
            except Exception as e:  # one failing row must not lose the others; its error is the row
                traceback.print_exc()
                row = {"bench": "decode", "method": method, "context": ctx, "batch": batch, "oom": False,
                       "error": f"{type(e).__name__}: {e}"[:400], "step_ms": None}
            row.update(env)
            rows.append(row)
            write_rows(args.out, [row])
            keys = ("step_ms", "gpu_busy_ms", "kv_device_bytes", "peak_device_bytes", "prefetch_hit_rate",
                    "exposed_fetch_ms", "fetch_gbps", "prefill_s", "attn_kernel_ms", "attn_hbm_pct", "error")
            print(method, ctx, batch, {k: row.get(k) for k in keys}, flush=True)
            for t in row.get("gpu_top_kernels") or []:  # where the GPU time goes (the log's table per row)
                print(f"    {t['ms']:8.3f} ms {t['share']:6.1%} {t['calls']:6.0f} calls  {t['kernel']}", flush=True)
            with contextlib.suppress(Exception):
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                    # the pinned host blocks of the last row's store go back to the OS (the next row may need more)
                    getattr(torch._C, "_host_emptyCache", lambda: None)()
        compiled.clear()
    if not args.no_plot:
        name = Path(args.out).with_suffix(".png").name
        plot(rows, RESULTS / name)
        if os.environ.get("OUT"):
            plot(rows, Path(os.environ["OUT"]) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
