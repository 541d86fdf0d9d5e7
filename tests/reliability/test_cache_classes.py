"""The classes of silently wrong outputs found by trying specache as a user would: each now equals the unmodified
model or raises a clear error (graph breaks inside an attention, a cache rewritten in one graph and read raw in
another, masks broadcast along the keys, scores concatenated with extra logits, rewound positions, huge top-k)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import build, twin
from transformers import StaticCache

import specache
from specache_compile.generate import cache_keyword
from specache_compile.runtime import CacheMismatch

D, H = 32, 2


class Attn(torch.nn.Module):
    """DynamicCache-style attention over a (k, v) tuple cache; optional graph break, broadcast mask or sink logits."""

    def __init__(self, brk=False, bcast_mask=False, sinks=False):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(D, D) for _ in range(3))
        self.brk, self.bcast_mask, self.sinks = brk, bcast_mask, sinks
        self.sink = torch.nn.Parameter(torch.zeros(H))

    def forward(self, x, past):
        if self.brk and x.abs().sum().item() < 0:  # a data-dependent check: Dynamo breaks the graph here
            x = x * 0
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, H, D // H).transpose(1, 2) for f in (self.q, self.k, self.v))
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if self.sinks:
            scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5
            extra = self.sink.view(1, H, 1, 1).expand(b, H, s, 1)
            p = torch.softmax(torch.cat([scores, extra], dim=-1), dim=-1)[..., :-1]
            o = p @ v
        elif self.bcast_mask:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(b, 1, 1, 1, dtype=torch.bool) | True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        return o.transpose(1, 2).reshape(b, s, D), (k, v)


class Stack(torch.nn.Module):
    def __init__(self, n=3, **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList(Attn(**kw) for _ in range(n))

    def forward(self, x, cache):
        new = []
        for layer, past in zip(self.layers, cache):
            y, kv = layer(x, past)
            x = x + y
            new.append(kv)
        return x, new


def empty_cache(n=3, b=1):
    return [(torch.zeros(b, H, 0, D // H), torch.zeros(b, H, 0, D // H)) for _ in range(n)]


def run(model, steps=4, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    cache, outs = empty_cache(b=b), []
    y, cache = model(torch.randn(b, 6, D, generator=g), cache)
    outs.append(y)
    for _ in range(steps):
        y, cache = model(torch.randn(b, 1, D, generator=g), cache)
        outs.append(y)
    return torch.cat(outs, dim=1)


def build_pair(**kw):
    torch.manual_seed(0)
    ref = Stack(**kw).eval()
    m = twin(ref)
    return ref, m


@torch.no_grad()
def test_graph_break_inside_attention_keeps_one_store_per_layer():
    ref, m = build_pair(brk=True)
    specache.compile(m, policy="full")
    torch.testing.assert_close(run(m), run(ref))
    st = specache.stats(m)
    assert st["rewritten"] == 3 and len(st["store"]) == 3, (st["sites"], list(st["store"]))


@torch.no_grad()
def test_broadcast_mask_attends_every_key():
    ref, m = build_pair(bcast_mask=True)
    specache.compile(m, policy="specache", topk=4096, window=2, group_size=4)
    torch.testing.assert_close(run(m), run(ref))
    assert specache.stats(m)["rewritten"] == 3


@torch.no_grad()
def test_scores_concatenated_with_sink_logits_are_counted():
    ref, m = build_pair(sinks=True)
    specache.compile(m, policy="full")
    torch.testing.assert_close(run(m), run(ref))
    st = specache.stats(m)
    assert st["found"] == 3 and st["skipped"] == 3, st["sites"]
    assert all("cat" in s["reason"] for s in st["sites"].values()), st["sites"]


@torch.no_grad()
def test_encoder_decoder_cross_attention_equal_or_refused():
    """BART: the first decoder call writes the cross-attention cache (rewritten), later calls read it raw. Either
    every call is served by the store, or the raw read raises: never zeros read silently."""
    import transformers as tf

    cfg = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                        forced_eos_token_id=None)
    torch.manual_seed(0)
    ref = tf.BartForConditionalGeneration(cfg).eval()
    m = specache.compile(twin(ref), policy="full")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    want = ref.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    try:
        got = m.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    except CacheMismatch as e:
        assert "another compiled graph" in str(e)
    else:
        assert torch.equal(want, got), (want, got)


@torch.no_grad()
def test_static_cache_rewound_positions_follow():
    """A draft model re-decoding positions it already wrote (StaticCache crop, then the same positions again)."""
    ref = build("llama", seed=0)
    m = specache.compile(twin(ref), policy="specache", topk=4096, window=4, group_size=16)
    ids = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (ref, m):
        cache = StaticCache(config=model.config, max_cache_len=64)
        logits = [model(input_ids=ids, **{cache_keyword(model): cache}).logits[:, -1]]
        tok = logits[0].argmax(-1, keepdim=True)
        for step in range(6):
            if step == 3:
                cache.crop(-2)  # rewind two positions and decode them again with other tokens
                tok = (tok + 5) % 128
            pos = torch.tensor([cache.get_seq_length()])
            logits.append(model(input_ids=tok, **{cache_keyword(model): cache}, cache_position=pos).logits[:, -1])
            tok = logits[-1].argmax(-1, keepdim=True)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_huge_topk_allocates_slots_for_the_context_only():
    ref, m = build_pair()
    specache.compile(m, policy="specache", topk=10**6, window=2, group_size=4)
    torch.testing.assert_close(run(m, b=2), run(ref, b=2))
    dev = specache.memory(m)["device"]
    # two slots of 10**6 rows x 2 KV heads x 16 dims x (K + V) x fp32 per layer would be 1 GB: bounded by the context
    assert dev < 3 * 2 * 2 * 2 * 2 * 1024 * 16 * 4 * 2, dev


@torch.no_grad()
def test_generate_raises_a_deferred_position_error_before_returning(monkeypatch):
    """On CUDA, decode steps of an index-mode cache check their positions on the device; model.generate raises what
    they found before it returns the tokens (here the device check is forced to fail). The default path's check
    (the static path's is tested with each policy's static path: tests/policies/test_*_static.py)."""
    m = specache.compile(build("llama", seed=0), policy="full", policy_options={"static": False})
    runtime = m._specache_runtime  # specache.runtime_of needs a first call

    def always_bad(site_name, write_pos, start, n):
        runtime._pos_bad, runtime._pos_site = torch.tensor(True), (site_name, start)

    monkeypatch.setattr(runtime, "_defer_position_check", always_bad)
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CacheMismatch, match="other positions than the next one"):
        m.generate(ids, max_new_tokens=4, cache_implementation="static")
