"""transformers models built from small configs: the pass must rewrite every attention, and policy="full" (and
specache with topk >= context) must give the unmodified model's logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from hf_models import build, twin
from numerics import FP32_REL, LOWP_FACTOR, norm_err, rel_err
from transformers import DynamicCache, StaticCache

import specache

ARCHS = ["llama", "mistral", "qwen2", "phi3", "gpt2"]
STEPS = 32
MAX_LEN = 128

# slow: each case compiles a model afresh (Dynamo traces prefill and decode, 2-6 s a case on 2 cores), and the sweeps
# below hold 60; the fast set keeps one representative of each test (Llama in every attention x cache variant, GPT-2's
# Conv1D attention, Mistral's sliding-window layer left alone), `-m slow` (CI) runs the rest
slow_sweep = pytest.mark.slow


def _full_matrix():
    fast = {("llama", a, c) for a in ("sdpa", "eager") for c in ("dynamic", "static")}
    fast |= {("gpt2", "sdpa", "dynamic"), ("mistral", "sdpa", "static")}
    return [pytest.param(arch, attn, cache, marks=() if (arch, attn, cache) in fast else slow_sweep,
                         id=f"{arch}-{attn}-{cache}")
            for arch in ARCHS for attn in ("sdpa", "eager") for cache in ("dynamic", "static")]


def make_cache(kind: str, model):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=MAX_LEN)
    return DynamicCache(config=model.config)


def padded_batch(lengths=(24, 17, 9), seed=0):
    """A batch of len(lengths) left-padded prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, s - n:] = torch.randint(2, 128, (n,), generator=g)
        mask[i, s - n:] = 1
    return ids, mask


def decode_loop(model, ids, mask, cache, steps, forced=None):
    """Prefill then ``steps`` single-token steps by hand; returns (last-position logits per step, tokens fed)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    logits, toks = [out.logits[:, -1].float()], []
    for i in range(steps):
        tok = forced[i] if forced is not None else out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits[:, -1].float())
    return logits, toks


def assert_all_rewritten(model, steps_at_least: int):
    st = specache.stats(model)
    assert st["found"] > 0 and st["rewritten"] == st["found"], st["sites"]
    # the op really ran for every site, every step: a silent fallback to eager cannot pass
    assert all(s["decode_steps"] >= steps_at_least for s in st["store"].values()), st["store"]
    return st


# architectures whose tiny configs have sliding-window layers: the tests below rewrite them too (by default they keep
# the model's own window cache: test_sliding_layers_keep_the_models_window_cache_by_default)
SLIDING = {"mistral", "gemma3"}


def rewrite_sliding(arch: str) -> dict:
    return {"sliding_layers": "rewrite"} if arch in SLIDING else {}


@pytest.mark.parametrize("arch, attn, cache", _full_matrix())
def test_full_policy_matches_unmodified(arch, attn, cache):
    model = build(arch, attn)
    ref = twin(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, make_cache(cache, ref), STEPS)
        specache.compile(model, policy="full", **rewrite_sliding(arch))
        got, _ = decode_loop(model, ids, mask, make_cache(cache, model), STEPS, forced=toks)

    if arch == "mistral" and cache == "static":
        # StaticSlidingWindowLayer rolls its buffer in place (roll + copy_): the pass must leave it alone, and say so
        st = specache.stats(model)
        assert st["rewritten"] == 0 and st["skipped"] == st["found"] > 0
        assert all("cannot follow" in s["reason"] for s in st["sites"].values()), st["sites"]
    else:
        assert_all_rewritten(model, STEPS)
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs

    if (attn, cache) == ("sdpa", "dynamic") or (arch == "llama" and (attn, cache) != ("eager", "dynamic")):
        # greedy generate() through the same compiled model (a new sequence: the store restarts at prefill); a
        # subset of the matrix, to keep the CPU suite short: generate() runs the same forward as the loop above
        with torch.no_grad():
            want_ids = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                    past_key_values=make_cache(cache, ref))
            got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                     past_key_values=make_cache(cache, model))
        assert torch.equal(got_ids, want_ids)


# A wider sweep of transformers architectures, one cache and attention implementation each (the matrix above covers
# the cache and mask variants): every attention rewritten, the unmodified model's logits.
MORE_ARCHS = ["qwen3", "gemma", "gemma3", "olmo2", "granite", "cohere", "starcoder2", "mixtral", "qwen2_moe", "phi",
              "stablelm", "gpt_neox", "falcon", "opt"]


def compiled_and_unmodified(arch, attn, steps, **compile_kw):
    """(the model compiled with specache (policy="full" unless compile_kw say otherwise), its logits per step, the
    unmodified twin's) over a padded batch, with a DynamicCache and the twin's greedy tokens fed to both."""
    model = build(arch, attn)
    ref = twin(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, make_cache("dynamic", ref), steps)
        specache.compile(model, **({"policy": "full"} | rewrite_sliding(arch) | compile_kw))
        got, _ = decode_loop(model, ids, mask, make_cache("dynamic", model), steps, forced=toks)
    return model, got, want


@slow_sweep  # 28 compiles of 14 architectures; Llama and GPT-2 stand for them in the fast set
@pytest.mark.parametrize("policy", ["full", "specache"])
@pytest.mark.parametrize("arch", MORE_ARCHS)
def test_more_architectures_match_unmodified(arch, policy):
    """policy="full", and "specache" with a top-k covering the context (everything fetched back, the low-bit copy on
    the device), give the unmodified model's logits."""
    covering = {"topk": MAX_LEN, "window": 4, "group_size": 4, "bits": 2}
    kw = {"policy": policy} | (covering if policy == "specache" else {})
    model, got, want = compiled_and_unmodified(arch, "sdpa", 8, **kw)
    st = assert_all_rewritten(model, 8)
    if policy == "specache":
        assert st["bytes"]["device"] > 0
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a == "llama" else slow_sweep)
                                  for a in ARCHS + MORE_ARCHS])
@torch.no_grad()
def test_model_generate_defaults_rewrite_every_attention(arch):
    """specache.compile with its defaults, then an unchanged model.generate: the cache it picks (the bucketed
    StaticCache and the static path, or the DynamicCache for a sliding-window model) leaves no attention alone, and
    with a covering top-k the greedy tokens are the unmodified model's (sliding-window layers rewritten too)."""
    base = build(arch, "sdpa", seed=0)
    model = specache.compile(twin(base), topk=4096, window=16, group_size=16, **rewrite_sliding(arch))
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, base.generate(ids, max_new_tokens=6, do_sample=False))
    st = specache.stats(model)
    assert st["found"] == st["rewritten"] > 0, st["sites"]


@torch.no_grad()
def test_sliding_layers_keep_the_models_window_cache_by_default():
    """Gemma-3's layout in small: a sliding-window layer (window 16, passed by the 24-token prompt and the decode
    steps) and a global one. By default the sliding layer keeps its code and the model's own window cache, counted as
    skipped with why; the global layer is rewritten and decodes from the store; the logits are the unmodified model's
    (a covering top-k). The store holds the global layer only, so its device bytes are one layer's."""
    model = build("gemma3", "sdpa", layer_types=["sliding_attention", "full_attention"])
    ref = twin(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, make_cache("dynamic", ref), STEPS)
        specache.compile(model, policy="specache", topk=MAX_LEN, window=4, group_size=4, bits=2)
        got, _ = decode_loop(model, ids, mask, make_cache("dynamic", model), STEPS, forced=toks)
    st = specache.stats(model)
    assert (st["found"], st["rewritten"], st["skipped"]) == (2, 1, 1), st["sites"]
    sliding = st["sites"]["model.layers.0.self_attn"]
    assert sliding["status"] == "skipped" and "sliding_layers='model'" in sliding["reason"], sliding
    assert list(st["store"]) == ["model.layers.1.self_attn"] and st["store"]["model.layers.1.self_attn"][
        "decode_steps"] == STEPS, st["store"]
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs
    # the eval harness's device bytes add the sliding layer's own cache: its window of 16 tokens, 2 KV heads of 16,
    # K and V, fp32, per batch row
    from specache_compile.evals.harness import kv_bytes_device

    b, n = ids.shape[0], ids.shape[1] + STEPS
    assert kv_bytes_device(model, n, b) == st["bytes"]["device"] + 2 * 16 * 2 * 16 * 4 * b
    with pytest.raises(ValueError, match="sliding_layers: expected 'model' or 'rewrite', got 'drop'"):
        specache.Config(sliding_layers="drop")


@pytest.mark.parametrize("arch,why", [("gemma2", "torch.tanh"), ("bloom", "baddbmm")])
def test_attention_the_pass_cannot_rewrite_keeps_its_code_and_says_why(arch, why):
    """Gemma-2 soft-caps its scores (tanh between q·kᵀ and the softmax) and Bloom adds ALiBi inside alibi.baddbmm(q,
    kᵀ): each attention is found, left alone with the reason, and the model's output is unchanged."""
    model, got, want = compiled_and_unmodified(arch, "eager", 4)
    st = specache.stats(model)
    assert st["found"] == st["skipped"] == model.config.num_hidden_layers and st["rewritten"] == 0, st["sites"]
    assert all(why in s["reason"] for s in st["sites"].values()), st["sites"]
    # named by module path, whatever frame local the module was traced from (Bloom's forward is called through a
    # decorator: L['args'][0])
    assert not any(name.startswith("L[") for name in st["sites"]), list(st["sites"])
    assert st["store"] == {}
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # specache.generate has no store to decode from: it says why rather than blaming Dynamo's recompile limit
    with pytest.raises(ValueError, match=f"keeps its original code.*{why}"):
        specache.generate(model, torch.randint(2, 128, (1, 9)), 4)


@pytest.mark.slow  # ~20 s warm on 2 cores: flex attention compiles its block mask and kernel with Inductor
def test_flex_attention_keeps_its_code_and_says_why():
    """attn_implementation="flex_attention": a higher-order op with its own score_mod and block mask, which the
    policies' kernels do not apply: found, left alone with the reason, the unmodified model's tokens. (Batch 1 without
    padding: flex attention over a padded batch fails to build with Inductor on some CPUs, the twin included.)"""
    model = build("llama", "flex_attention")
    ref = twin(model)
    ids = torch.randint(2, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, do_sample=False)
        specache.compile(model, policy="full")
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    st = specache.stats(model)
    assert st["found"] == st["skipped"] == model.config.num_hidden_layers and st["rewritten"] == 0, st["sites"]
    assert all(s["reason"].startswith("flex_attention") and s["kind"] == "flex" for s in st["sites"].values())


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), pytest.param("llama", 1, marks=slow_sweep),  # GQA, MQA,
                                            pytest.param("gpt2", 4, marks=slow_sweep)])  # MHA
def test_specache_topk_covering_context_is_exact(arch, kv_heads):
    """policy="specache" with topk >= context length fetches everything: exact, although the low-bit copy exists."""
    model = build(arch, "sdpa", kv_heads=kv_heads)
    ref = twin(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, DynamicCache(config=ref.config), STEPS)
        specache.compile(model, policy="specache", topk=MAX_LEN, window=4, group_size=4, bits=2)
        got, _ = decode_loop(model, ids, mask, DynamicCache(config=model.config), STEPS, forced=toks)
    st = assert_all_rewritten(model, STEPS)
    assert st["bytes"]["device"] > 0  # the low-bit copy and window really live on the device tier
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs


def test_generate_batch_one_no_padding():
    """Batch 1 without a mask: SDPA gets is_causal / mask=None paths."""
    model = build("llama", "sdpa")
    ref = twin(model)
    ids = torch.randint(2, 128, (1, 21))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=STEPS, do_sample=False)
        specache.compile(model, policy="full")
        got = model.generate(ids, max_new_tokens=STEPS, do_sample=False)
    assert_all_rewritten(model, STEPS - 1)
    assert torch.equal(got, want)


BF16_CASES = [(a, "sdpa") for a in ARCHS] + [("llama", "eager"), ("gpt2", "eager")]


@pytest.mark.parametrize("arch,attn", [pytest.param(a, t, marks=() if (a, t) == ("llama", "sdpa") else slow_sweep)
                                       for a, t in BF16_CASES])
def test_bf16_within_eager_error(arch, attn):
    """bf16: our logits err against a float64 reference no more than LOWP_FACTOR x the eager bf16 model's."""
    model = build(arch, attn, dtype=torch.bfloat16)
    oracle = twin(model).double()
    eager = twin(model)
    # no padding: float64 eager attention turns fully masked (padding) rows into NaN (its mask is finfo.min, which
    # overflows to -inf when added), which would leave no reference to compare with
    ids, mask = padded_batch(lengths=(24, 24))
    with torch.no_grad():
        want, toks = decode_loop(oracle, ids, mask, DynamicCache(config=oracle.config), STEPS)
        base, _ = decode_loop(eager, ids, mask, DynamicCache(config=eager.config), STEPS, forced=toks)
        specache.compile(model, policy="full", **rewrite_sliding(arch))
        got, _ = decode_loop(model, ids, mask, DynamicCache(config=model.config), STEPS, forced=toks)
    assert_all_rewritten(model, STEPS)
    # mean over the prefill and the 32 decode steps of each step's ||err|| / ||ref|| over the logits
    ours = sum(norm_err(g, w) for g, w in zip(got, want)) / len(want)
    theirs = sum(norm_err(b, w) for b, w in zip(base, want)) / len(want)
    assert ours <= LOWP_FACTOR[torch.bfloat16] * theirs, (ours, theirs)


def test_store_owns_the_kv():
    """After the rewrite the model's own cache holds zero-stride placeholders and the store holds the tokens, with the
    full KV in the host tier and only the policy's copy in the device tier."""
    model = build("llama", "sdpa")
    ids, mask = padded_batch()
    specache.compile(model, policy="specache", topk=8, window=8, group_size=8, bits=2)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        decode_loop(model, ids, mask, cache, 8)
    for layer in cache.layers:
        # views of the site's cache token: row ids along the batch, nothing else (at most B + 61 elements)
        for t in (layer.keys, layer.values):
            assert t.stride()[1:] == (0, 0, 0) and t.untyped_storage().nbytes() <= (ids.shape[0] + 62) * 4
        assert layer.keys.shape[-2] == ids.shape[1] + 8  # shapes still tell transformers the true length
    st = specache.stats(model)
    cfg = model.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # K+V, fp32
    tokens = (ids.shape[1] + 8) * ids.shape[0]
    for s in st["store"].values():
        assert s["length"] == ids.shape[1] + 8
        assert s["host"] >= tokens * per_token  # the full KV (allocated capacity >= used)
    assert st["bytes"]["host"] >= cfg.num_hidden_layers * tokens * per_token
