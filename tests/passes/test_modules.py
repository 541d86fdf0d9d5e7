"""The attention pass on hand-written modules (no transformers): where it must fire, and where it must not.

Two cache styles, each a 2-layer causal LM driven by a hand-written prefill + decode loop:

- gpt-fast / nanoGPT: a ``KVCache`` submodule with preallocated ``k_cache``/``v_cache`` buffers written in place
  (``k_out[:, :, input_pos] = k_val``), GQA by ``repeat_interleave``, ``F.scaled_dot_product_attention`` with a bool
  mask sliced from a causal-mask buffer (INDEX mode).
- HF-legacy tuples: the past (k, v) comes in as a forward argument, is extended with ``torch.cat([past, new], 2)`` and
  returned; GQA by HF's ``repeat_kv``; attention spelled ``softmax(q @ kᵀ * scale + mask) @ v`` (APPEND mode).

Every positive test checks, besides the logits, that ``specache.stats`` saw every attention rewritten and the store
saw every decode step, so a silent fallback to eager attention cannot pass. Negative tests check that the pass leaves
alone what it must not touch, says why, and that the output is bit-identical to eager.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tolerance table
from numerics import FP32_REL, rel_err  # noqa: E402

import specache  # noqa: E402

VOCAB = 64
DIM_HEAD = 16
LAYERS = 2
PREFILL = 24
STEPS = 32
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1)}  # name -> (Hq, Hkv)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A fresh Dynamo and fresh specache counters per test: recompile limits hit by an earlier test would make this
    one run eagerly, and the counters are process-wide."""
    threads = torch.get_num_threads()
    # One intra-op thread: the per-step tensors are tiny and two OpenMP threads on a 2-core CI box spend 10x more
    # time spinning than computing.
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters["specache"].clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# gpt-fast style: preallocated buffers written in place, SDPA with a bool mask
# ----------------------------------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos, k_val, v_val):
        # input_pos: [S]; k_val, v_val: [B, Hkv, S, D]
        k_out = self.k_cache
        v_out = self.v_cache
        k_out[:, :, input_pos] = k_val
        v_out[:, :, input_pos] = v_val
        return k_out, v_out


class FastAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv, head_dim, batch, max_len, dropout=0.0, leak_cache=False):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.dropout, self.leak_cache = dropout, leak_cache
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)
        self.kv_cache = KVCache(batch, n_kv, max_len, head_dim)

    def forward(self, x, mask, input_pos):
        b, s, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)
        k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
        v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.wo(y.transpose(1, 2).contiguous().view(b, s, q_size))
        if self.leak_cache:
            # reads the cache buffer's values outside the attention: after a rewrite it would hold nothing
            out = out + self.kv_cache.k_cache.sum()
        return out


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class FastBlock(nn.Module):
    def __init__(self, dim, attention):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention, self.mlp = attention, MLP(dim)

    def forward(self, x, mask, input_pos):
        x = x + self.attention(self.n1(x), mask, input_pos)
        return x + self.mlp(self.n2(x))


class FastTransformer(nn.Module):
    """gpt-fast's Transformer, shrunk: learned positions instead of RoPE, LayerNorm instead of RMSNorm."""

    def __init__(self, n_head, n_kv, head_dim=DIM_HEAD, layers=LAYERS, batch=1, max_len=128, **attn):
        super().__init__()
        dim = n_head * head_dim
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(
            FastBlock(dim, FastAttention(dim, n_head, n_kv, head_dim, batch, max_len, **attn)) for _ in range(layers)
        )
        self.norm, self.output = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)
        self.register_buffer("causal_mask", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, idx, input_pos):
        # idx: [B, S]; input_pos: [S]; mask: [1, 1, S, max_len] bool, True = attend
        mask = self.causal_mask[None, None, input_pos]
        x = self.tok(idx) + self.pos(input_pos)
        for layer in self.layers:
            x = layer(x, mask, input_pos)
        return self.output(self.norm(x))


def run_fast(model, toks, prefill, steps):
    """Prefill toks[:, :prefill], then decode toks[:, prefill + i] one at a time (teacher-forced, so the compiled
    model and its twin see the same tokens even where a greedy choice would tie). Yields the logits of every call."""
    yield model(toks[:, :prefill], torch.arange(prefill))
    for i in range(steps):
        p = prefill + i
        yield model(toks[:, p : p + 1], torch.tensor([p]))


# ----------------------------------------------------------------------------------------------------------------------
# HF-legacy style: past (k, v) in, torch.cat, present (k, v) out; matmul -> softmax -> matmul
# ----------------------------------------------------------------------------------------------------------------------


def repeat_kv(x, n_rep):
    # HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class CatAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv, head_dim, dropout=0.0, return_probs=False, reuse_cache=False,
                 scores="matmul"):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = n_head, n_kv, head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.dropout, self.return_probs, self.reuse_cache = dropout, return_probs, reuse_cache
        self.scores = scores  # matmul: q @ kᵀ; bmm / baddbmm: Bloom's spelling over [B·H, S, D] and a transposed k
        self.q, self.o = nn.Linear(dim, n_head * head_dim), nn.Linear(n_head * head_dim, dim)
        self.k, self.v = nn.Linear(dim, n_kv * head_dim), nn.Linear(dim, n_kv * head_dim)

    def forward(self, x, mask, past_k, past_v):
        # x: [B, S, dim]; mask: [1, 1, S, past + S] additive; past_k, past_v: [B, Hkv, past, D]
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        kr, vr = repeat_kv(k, self.n_head // self.n_kv), repeat_kv(v, self.n_head // self.n_kv)
        if self.scores == "matmul":
            scores = q @ kr.transpose(-2, -1) * self.scale
        else:  # Bloom: 3-D products over the heads flattened into the batch, the key already transposed
            q3 = q.reshape(b * self.n_head, s, -1)
            kt3 = kr.transpose(-2, -1).reshape(b * self.n_head, self.head_dim, -1)
            if self.scores == "bmm":
                scores = torch.bmm(q3, kt3) * self.scale
            else:
                scores = torch.zeros(1, 1, kt3.shape[-1]).baddbmm(q3, kt3, beta=1.0, alpha=self.scale)
            scores = scores.view(b, self.n_head, s, -1)
        scores = scores + mask
        p = scores.softmax(-1)
        p = F.dropout(p, self.dropout, training=self.training)
        out = p @ vr
        out = self.o(out.transpose(1, 2).reshape(b, s, -1))
        if self.reuse_cache:
            # the cat result feeds another computation than the attention
            out = out + k.pow(2).mean()
        if self.return_probs:
            return out, k, v, p
        return out, k, v


class CatBlock(nn.Module):
    def __init__(self, dim, attention):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention, self.mlp = attention, MLP(dim)

    def forward(self, x, mask, past_k, past_v):
        a, k, v = self.attention(self.n1(x), mask, past_k, past_v)[:3]
        x = x + a
        return x + self.mlp(self.n2(x)), k, v


class CatTransformer(nn.Module):
    def __init__(self, n_head, n_kv, head_dim=DIM_HEAD, layers=LAYERS, max_len=128, **attn):
        super().__init__()
        dim = n_head * head_dim
        self.n_kv, self.head_dim = n_kv, head_dim
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(
            CatBlock(dim, CatAttention(dim, n_head, n_kv, head_dim, **attn)) for _ in range(layers)
        )
        self.norm, self.output = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)

    def empty_past(self, batch=1):
        z = torch.zeros(batch, self.n_kv, 0, self.head_dim)
        return tuple((z, z) for _ in self.layers)

    def forward(self, idx, past):
        # idx: [B, S]; past: one (k, v) [B, Hkv, past_len, D] per layer -> (logits, present)
        s, start = idx.shape[1], past[0][0].shape[2]
        mask = torch.full((s, start + s), float("-inf")).triu(start + 1)[None, None]
        x = self.tok(idx) + self.pos(torch.arange(start, start + s))
        present = []
        for layer, (pk, pv) in zip(self.layers, past):
            x, k, v = layer(x, mask, pk, pv)
            present.append((k, v))
        return self.output(self.norm(x)), tuple(present)


def run_cat(model, toks, prefill, steps):
    """run_fast for the tuple cache: the present the model returns goes back in as the next call's past."""
    logits, past = model(toks[:, :prefill], model.empty_past(toks.shape[0]))
    yield logits
    for i in range(steps):
        p = prefill + i
        logits, past = model(toks[:, p : p + 1], past)
        yield logits


FAMILIES = {
    # name -> (model class, driver, site kind, site mode)
    "gptfast_sdpa_index": (FastTransformer, run_fast, "sdpa", "index"),
    "hflegacy_matmul_cat": (CatTransformer, run_cat, "matmul", "append"),
}


def _pair(family, heads, seed=0, **attn):
    cls = FAMILIES[family][0]
    torch.manual_seed(seed)
    model = cls(*HEADS[heads], **attn).eval()
    return model, copy.deepcopy(model)


def _tokens(n, seed=1, batch=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_every_attention_rewritten(model, family, prefill, steps):
    _, _, kind, mode = FAMILIES[family]
    st = specache.stats(model)
    assert (st["found"], st["rewritten"], st["skipped"]) == (LAYERS, LAYERS, 0), st["sites"]
    assert sorted(st["sites"]) == [f"layers.{i}.attention" for i in range(LAYERS)], st["sites"]
    for name, site in st["sites"].items():
        assert (site["status"], site["kind"], site["mode"]) == ("rewritten", kind, mode), (name, site)
    # the store saw every token: a graph that fell back to eager attention would leave these short
    assert sorted(st["store"]) == sorted(st["sites"])
    for name, s in st["store"].items():
        got = (s["prefill_tokens"], s["decode_steps"], s["length"])
        assert got == (prefill, steps, prefill + steps), (name, s)
        assert s["fetched_rows"] > 0 and s["host"] > 0, (name, s)
    # one rewrite per layer in each compiled graph (prefill, decode, maybe a dynamic-shape decode), none skipped
    assert counters["specache"]["attention_rewritten"] >= 2 * LAYERS
    assert counters["specache"]["attention_rewritten"] % LAYERS == 0
    assert counters["specache"]["attention_skipped"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# positive: exact policies equal eager, every step
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("policy", ["full", "specache"])
@torch.no_grad()
def test_exact_policies_match_eager(family, heads, policy):
    model, twin = _pair(family, heads)
    run = FAMILIES[family][1]
    # specache with topk >= the context fetches every low-bit candidate back in full precision: exact attention.
    # window/group small so that the low-bit tier really holds most of the tokens (the path under test).
    opts = {"topk": 64, "window": 4, "group_size": 4} if policy == "specache" else {}
    specache.compile(model, policy=policy, **opts)
    toks = _tokens(PREFILL + STEPS)
    ours, ref = list(run(model, toks, PREFILL, STEPS)), list(run(twin, toks, PREFILL, STEPS))
    assert len(ours) == len(ref) == STEPS + 1
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errs) < FP32_REL, f"step {errs.index(max(errs))}: rel err {max(errs):.3g}"
    assert_every_attention_rewritten(model, family, PREFILL, STEPS)
    if policy == "specache":
        st = specache.stats(model)
        assert st["bytes"]["device"] > 0, "the specache policy keeps its low-bit copy on the device tier"


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_specache_small_topk_selects(family):
    """topk well below the context: the output must move away from exact attention (selection really happens), the
    low-bit remainder keeps it close (attention error < 1 per site), and only top-k rows come back per step."""
    prefill, steps, topk = 48, 16, 4
    model, twin = _pair(family, "gqa")
    run = FAMILIES[family][1]
    specache.compile(model, policy="specache", topk=topk, window=4, group_size=4, bits=2, measure_error=True)
    toks = _tokens(prefill + steps)
    ours, fetched_in_prefill, running = [], {}, []
    for i, logits in enumerate(run(model, toks, prefill, steps)):
        ours.append(logits)
        if i == 0:
            fetched_in_prefill = {n: s["fetched_rows"] for n, s in specache.stats(model)["store"].items()}
        else:
            running.append(specache.attention_error(model))  # the running figures after decode step i
    ref = list(run(twin, toks, prefill, steps))
    assert rel_err(ours[0], ref[0]) < FP32_REL  # prefill attention is exact under every policy
    decode_err = max(rel_err(a, b) for a, b in zip(ours[1:], ref[1:]))
    assert decode_err > 1e-4, f"top-{topk} of ~{prefill} tokens at 2 bits matched exact attention ({decode_err:.3g})"
    assert_every_attention_rewritten(model, family, prefill, steps)

    err = specache.attention_error(model)
    assert sorted(err) == [f"layers.{i}.attention" for i in range(LAYERS)], err
    for name, e in err.items():
        assert e["steps"] == steps, (name, e)
        assert math.isfinite(e["mean"]) and 0.0 < e["mean"] < 1.0, (name, e)
        # each step's own error, from the running means after it (step i: i * mean_i - (i - 1) * mean_{i-1}); the
        # reported max must be the largest of them, and not merely at least the mean, which any max is
        means = [r[name]["mean"] for r in running]
        per_step = [means[0]] + [(i + 1) * means[i] - i * means[i - 1] for i in range(1, steps)]
        assert [r[name]["steps"] for r in running] == list(range(1, steps + 1)), (name, running)
        assert e["max"] == pytest.approx(max(per_step), rel=1e-6, abs=1e-9), (name, e, per_step)
        assert e["max"] > e["mean"], (name, e, per_step)  # the steps' errors differ: the max is not the mean
    b, hkv = 1, HEADS["gqa"][1]
    for name, s in specache.stats(model)["store"].items():
        # topk rows per KV head per step (2x leaves room for a speculative row), where a full fetch is prefill + i
        fetched = s["fetched_rows"] - fetched_in_prefill[name]
        assert 0 < fetched <= 2 * steps * b * hkv * topk, (name, fetched, s)


# ----------------------------------------------------------------------------------------------------------------------
# negative: the pattern must not fire
# ----------------------------------------------------------------------------------------------------------------------


def assert_left_alone(model, why: tuple[str, ...], found=1):
    st = specache.stats(model)
    assert st["rewritten"] == 0 and counters["specache"]["attention_rewritten"] == 0, st["sites"]
    assert st["found"] == st["skipped"] == found, st["sites"]
    assert counters["specache"]["attention_skipped"] >= found
    for name, site in st["sites"].items():
        assert site["status"] == "skipped", (name, site)
        reason = site["reason"]
        assert any(w in reason.lower() for w in why), f"{name}: reason {reason!r} mentions none of {why}"
    assert st["store"] == {}


class PlainSelfAttention(nn.Module):
    """Causal self-attention over the input, no cache at all."""

    def __init__(self, kind, n_head=4, head_dim=DIM_HEAD):
        super().__init__()
        self.kind, self.n_head, self.head_dim = kind, n_head, head_dim
        dim = n_head * head_dim
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = (t.view(b, s, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(dim, -1))
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.full((s, s), float("-inf")).triu(1)
            y = (q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, dim))


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
@torch.no_grad()
def test_no_cache_is_left_alone(kind):
    torch.manual_seed(0)
    model = PlainSelfAttention(kind).eval()
    twin = copy.deepcopy(model)
    specache.compile(model, policy="full")
    for s in (8, 8, 5):
        x = torch.randn(2, s, model.n_head * model.head_dim)
        assert torch.equal(model(x), twin(x))
    assert_left_alone(model, ("no kv-cache write",))


@torch.no_grad()
def test_returned_probabilities_are_left_alone():
    torch.manual_seed(0)
    layer = CatAttention(32, 2, 2, DIM_HEAD, return_probs=True).eval()
    twin = copy.deepcopy(layer)
    specache.compile(layer, policy="full")
    past = (torch.zeros(1, 2, 0, DIM_HEAD),) * 2
    past_twin = past
    for s in (6, 1, 1):
        x = torch.randn(1, s, 32)
        start = past[0].shape[2]
        mask = torch.full((s, start + s), float("-inf")).triu(start + 1)[None, None]
        out, k, v, p = layer(x, mask, *past)
        out_t, k_t, v_t, p_t = twin(x, mask, *past_twin)
        assert torch.equal(out, out_t) and torch.equal(p, p_t) and torch.equal(k, k_t) and torch.equal(v, v_t)
        past, past_twin = (k, v), (k_t, v_t)
    assert_left_alone(layer, ("probabilities",))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_dropout_is_left_alone(family):
    model, twin = _pair(family, "gqa", dropout=0.25)
    model.train()
    twin.train()
    specache.compile(model, policy="full")
    toks = _tokens(8 + 2)
    run = FAMILIES[family][1]
    # the same dropout masks in both: the same seed, and each run drawn whole before the other starts
    torch.manual_seed(123)
    ours = list(run(model, toks, 8, 2))
    torch.manual_seed(123)
    ref = list(run(twin, toks, 8, 2))
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert_left_alone(model, ("dropout",), found=LAYERS)


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_cache_read_elsewhere_is_left_alone(family):
    flag = {"gptfast_sdpa_index": "leak_cache", "hflegacy_matmul_cat": "reuse_cache"}[family]
    model, twin = _pair(family, "gqa", **{flag: True})
    specache.compile(model, policy="full")
    toks = _tokens(8 + 3)
    run = FAMILIES[family][1]
    ours, ref = list(run(model, toks, 8, 3)), list(run(twin, toks, 8, 3))
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert_left_alone(model, ("also read by",), found=LAYERS)


class Router(nn.Module):
    """A mixture-of-experts MLP: a softmax over a linear layer's logits, not attention."""

    def __init__(self, dim=32, experts=4):
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(MLP(dim) for _ in range(experts))

    def forward(self, x):
        w = self.gate(x).softmax(-1)  # [B, S, E]
        return sum(w[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


class MatmulRouter(Router):
    """A router spelled as a product with its weight (x @ Wᵀ), not through nn.Linear: still not attention."""

    def __init__(self, dim=32, experts=4):
        super().__init__(dim, experts)
        self.w = nn.Parameter(torch.randn(experts, dim) / dim**0.5)

    def forward(self, x):
        w = (x @ self.w.T).softmax(-1)
        return sum(w[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


@pytest.mark.parametrize("scores", ["bmm", "baddbmm"])
@torch.no_grad()
def test_scores_spelled_with_bmm_are_counted_and_left_alone(scores):
    """Bloom spells q·kᵀ as alibi.baddbmm(q, kᵀ) over a transposed key: an attention the pass does not rewrite, so it
    keeps its code, and is counted as skipped with the reason (before, it was not counted at all)."""
    model, twin = _pair("hflegacy_matmul_cat", "gqa", scores=scores)
    specache.compile(model, policy="full")
    toks = _tokens(8 + 3)
    for a, b in zip(run_cat(model, toks, 8, 3), run_cat(twin, toks, 8, 3)):
        assert torch.equal(a, b)
    assert_left_alone(model, (f"{scores}", "rewrites q @ k.transpose"), found=LAYERS)
    assert all(scores in site["reason"] for site in specache.stats(model)["sites"].values())


@pytest.mark.parametrize("cls", [Router, MatmulRouter])
@torch.no_grad()
def test_router_softmax_is_not_attention(cls):
    torch.manual_seed(0)
    model = cls().eval()
    twin = copy.deepcopy(model)
    specache.compile(model, policy="full")
    for s in (7, 1, 1):
        x = torch.randn(2, s, 32)
        assert torch.equal(model(x), twin(x))
    st = specache.stats(model)
    assert (st["found"], st["rewritten"], st["skipped"]) == (0, 0, 0), st["sites"]
    assert counters["specache"]["attention_skipped"] == counters["specache"]["attention_rewritten"] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_router_next_to_cached_attention_counts_only_the_attention(family):
    """A router as every layer's MLP: its gate reads the attention's output a few ops back (through the residual and
    the layer norm), and its softmax is over the gate's logits, not attention, however near the attention's q·kᵀ is
    upstream (the matmul family): only the attentions count."""
    model, _ = _pair(family, "gqa")
    for layer in model.layers:
        layer.mlp = Router(model.layers[0].n1.normalized_shape[0])
    twin = copy.deepcopy(model)
    specache.compile(model, policy="full")
    toks = _tokens(16 + 4)
    run = FAMILIES[family][1]
    errs = [rel_err(a, b) for a, b in zip(run(model, toks, 16, 4), run(twin, toks, 16, 4))]
    assert len(errs) == 5 and max(errs) < FP32_REL
    st = specache.stats(model)
    assert (st["found"], st["rewritten"], st["skipped"]) == (LAYERS, LAYERS, 0), st["sites"]
    assert all(site["decode_steps"] == 4 for site in st["store"].values()), st["store"]


# ----------------------------------------------------------------------------------------------------------------------
# Inductor as the inner compiler
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.slow  # Inductor's C++ codegen on CPU: ~25 s with a cold cache on 2 cores (two graphs), ~12 s warm
def test_inductor_inner_compiler_keeps_the_op():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = FastTransformer(4, 2, layers=LAYERS).eval()
    twin = copy.deepcopy(model)
    specache.compile(model, policy="full", inner="inductor")
    prefill, steps = 16, 4
    toks = _tokens(prefill + steps)
    out, prefill_code = run_and_get_code(model, toks[:, :prefill], torch.arange(prefill))
    assert rel_err(out, twin(toks[:, :prefill], torch.arange(prefill))) < FP32_REL
    codes = list(prefill_code)
    for i in range(steps):
        p = prefill + i
        args = (toks[:, p : p + 1], torch.tensor([p]))
        if i == 0:
            out, decode_code = run_and_get_code(model, *args)
            codes += decode_code
        else:
            out = model(*args)
        assert rel_err(out, twin(*args)) < FP32_REL, f"decode step {i}"
    assert len(codes) >= 2, "expected Inductor code for the prefill and the decode graph"
    for code in codes:
        assert code.count("torch.ops.specache.attend.default(") == LAYERS, code[:2000]
        assert "scaled_dot_product" not in code
    assert_every_attention_rewritten(model, "gptfast_sdpa_index", prefill, steps)


@pytest.mark.parametrize("topk", [64, 4])
@torch.no_grad()
def test_static_path_on_a_gptfast_module(topk):
    """The static decode path (policy_options static=True) on a gpt-fast-style module: index-mode writes, a bool mask
    over the whole buffer, one-token steps driven by hand. topk 64 covers the context: equal to eager; topk 4: equal
    to the default path's output (the same selection, through fixed-capacity state)."""
    prefill, steps = 40, 12
    model, twin = _pair("gptfast_sdpa_index", "gqa")
    dynamic = copy.deepcopy(twin)
    opts = {"topk": topk, "window": 4, "group_size": 4}
    specache.compile(model, policy="specache", policy_options={"static": True}, **opts)
    toks = _tokens(prefill + steps)
    ours = list(run_fast(model, toks, prefill, steps))
    if topk >= prefill + steps:
        want = list(run_fast(twin, toks, prefill, steps))
    else:
        torch._dynamo.reset()
        specache.compile(dynamic, policy="specache", **opts)
        want = list(run_fast(dynamic, toks, prefill, steps))
    errs = [rel_err(a, b) for a, b in zip(ours, want)]
    assert max(errs) < FP32_REL, f"step {errs.index(max(errs))}: rel err {max(errs):.3g}"
    site = next(iter(specache.runtime_of(model).sites.values()))
    assert site.static is not None and int(site.tier["s_n"]) == site.length == prefill + steps
