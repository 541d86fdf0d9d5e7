"""StreamingLLM policy: exactly the sinks and the most recent tokens are kept, and attention sees nothing else.

Mechanism tests drive the runtime's ``specache::attend`` entry (``Runtime.attend``) with constructed K/V and check
the kept positions and the output against attention computed by hand over those tokens; pass-level tests compile a
small Llama (tests/hf_models.py, left-padded batch, GQA) and the gpt-fast module of tests/passes/test_modules.py
and compare them with their unmodified twins. The pass-level helpers here serve every tests/policies/test_*.py.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers and the tolerance table
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))  # test_hf: decode loop, padded batch
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))  # test_modules: the gpt-fast module
from hf_models import build, twin  # noqa: E402
from numerics import FP32_REL, rel_err  # noqa: E402
from test_hf import decode_loop, padded_batch  # noqa: E402
from test_modules import FastTransformer, _tokens, run_fast  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import specache  # noqa: E402
from specache_compile.config import Config  # noqa: E402
from specache_compile.kernels import ops  # noqa: E402
from specache_compile.runtime.runtime import APPEND, Runtime  # noqa: E402

B, HQ, HKV, D = 2, 4, 2, 16
SCALE = D**-0.5
PROMPT, STEPS = (12, 7), 6  # pass level: left-padded prompts of these lengths, then decode steps
SLIDING = 14  # Mistral's window at pass level: < 12 + 6 tokens, so the last steps attend [lo > 0, hi)



def step(rt, q, k, v, base_len, mask=None, causal=False):
    """One specache::attend call of a DynamicCache-style site (APPEND mode): base_len = columns the model attends."""
    return rt.attend(q, k, v, mask, None, None, base_len, None, None, APPEND, SCALE, causal, "s")


def run_sequence(policy_options, prompt, steps, dtype=torch.float32, seed=0, window=None, mask_fn=None):
    """Prefill ``prompt`` tokens then ``steps`` decode steps of random q/k/v; returns (runtime, all K, all V, outputs,
    queries, biases) where decode step i attended base columns [max(0, n - window), n)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)
    rt = Runtime(Config(policy="streaming", policy_options=policy_options))
    ks, vs = [rnd(B, HKV, prompt, D)], [rnd(B, HKV, prompt, D)]
    step(rt, rnd(B, HQ, prompt, D), ks[0], vs[0], prompt, causal=True)
    outs, qs, masks = [], [], []
    for i in range(steps):
        n = prompt + i + 1
        q, k, v = rnd(B, HQ, 1, D), rnd(B, HKV, 1, D), rnd(B, HKV, 1, D)
        ks.append(k)
        vs.append(v)
        base = n if window is None else min(n, window)
        mask = mask_fn(base) if mask_fn else None
        outs.append(step(rt, q, k, v, base, mask))
        qs.append(q)
        masks.append(mask)
    return rt, torch.cat(ks, 2), torch.cat(vs, 2), outs, qs, masks


def exact_over(q, k, v, positions, mask=None, lo=0):
    """Attention of q over the given absolute positions of k, v; mask: bias over base columns starting at lo."""
    idx = torch.tensor(positions)
    bias = None if mask is None else mask[..., idx - lo]
    return ops.sparse_attention(q, k[:, :, idx], v[:, :, idx], bias, SCALE)


# ----------------------------------------------------------------------------------------------------------------------
# mechanism
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_keeps_exactly_sinks_and_recent(dtype):
    sinks, budget, prompt, steps = 3, 8, 20, 9
    rt, k, v, outs, qs, _ = run_sequence({"sinks": sinks, "budget": budget}, prompt, steps, dtype)
    t = rt.sites["s"].tier
    n = prompt + steps
    want = list(range(sinks)) + list(range(n - (budget - sinks), n))
    pos = t["pos"].tolist()
    assert sorted(pos) == want
    for slot, p in enumerate(pos):  # each slot holds that token's K and V, bit for bit
        assert torch.equal(t["k"][:, :, slot], k[:, :, p]) and torch.equal(t["v"][:, :, slot], v[:, :, p])
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for i, (q, out) in enumerate(zip(qs, outs)):
        m = prompt + i + 1
        kept = sorted(set(range(min(sinks, m))) | set(range(max(0, m - (budget - sinks)), m)))
        ref = exact_over(q.float(), k.float(), v.float(), kept)
        assert out.dtype == dtype and (out.float() - ref).abs().max() <= tol, i
    assert rt.sites["s"].tier_bytes() == {"host": 0, "device": 2 * B * HKV * budget * D * dtype.itemsize + budget * 8}


@torch.no_grad()
def test_sliding_window_and_bias_mask_out_of_range_tokens():
    """A sliding-window layer (lo > 0) must not see the sinks once they left its window, and the model's bias (here
    one batch row's columns masked) applies to the kept tokens by position."""
    sinks, budget, prompt, steps, window = 2, 7, 10, 6, 8

    def mask_fn(base):
        m = torch.zeros(B, 1, 1, base)
        m[1, :, :, : base // 2] = float("-inf")
        return m

    rt, k, v, outs, qs, masks = run_sequence({"sinks": sinks, "budget": budget}, prompt, steps, window=window,
                                             mask_fn=mask_fn)
    for i, (q, out, mask) in enumerate(zip(qs, outs, masks)):
        n = prompt + i + 1
        lo = n - mask.shape[-1]
        kept = [p for p in sorted(set(range(sinks)) | set(range(n - (budget - sinks), n))) if p >= lo]
        assert lo >= sinks  # the sinks are out of this layer's window
        ref = exact_over(q, k, v, kept, mask, lo)
        assert (out - ref).abs().max() <= 1e-6, i


@torch.no_grad()
def test_fractional_budget_is_a_share_of_the_prompt():
    rt, *_ = run_sequence({"sinks": 1, "budget": 0.25}, 18, 3)  # ceil(0.25 * 18) = 5 tokens
    t = rt.sites["s"].tier
    assert t["cap"] == 5 and sorted(t["pos"].tolist()) == [0, 17, 18, 19, 20]


@pytest.mark.parametrize("options,field", [
    ({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "all"}, "budget"), ({"budget": True}, "budget"),
    ({"sinks": -1}, "sinks"), ({"sinks": 4, "budget": 4}, "budget"),
])
def test_bad_options_raise(options, field):
    with pytest.raises(ValueError, match=field) as e:
        Runtime(Config(policy="streaming", policy_options=options))
    msg = str(e.value)
    assert "expected" in msg and "got" in msg and "fix" in msg, msg


def test_unknown_option_raises():
    with pytest.raises(ValueError, match=r"unknown policy_options \['window'\].*expected.*fix"):
        Runtime(Config(policy="streaming", policy_options={"window": 8}))


def test_config_sinks_sets_the_sinks_and_conflicts_are_refused():
    assert Runtime(Config(policy="streaming", sinks=8)).policy.sinks == 8
    assert Runtime(Config(policy="streaming", policy_options={"sinks": 0})).policy.sinks == 0
    with pytest.raises(ValueError, match="sinks given twice"):
        Runtime(Config(policy="streaming", sinks=8, policy_options={"sinks": 2}))


# ----------------------------------------------------------------------------------------------------------------------
# pass level (helpers shared by tests/policies/test_*.py)
# ----------------------------------------------------------------------------------------------------------------------


def llama_vs_unmodified(policy, arch="llama", **overrides):
    """Logits of a compiled small Llama (GQA 4/2, head dim 16, 2 layers) and of its unmodified twin over a left-padded
    batch: the prefill, then STEPS teacher-forced decode steps. Checks every attention was rewritten and decoded.
    arch="mistral": the same with a sliding window of SLIDING tokens, which the last decode steps pass (lo > 0), its
    sliding layers rewritten (sliding_layers="rewrite")."""
    model = build(arch, "sdpa", kv_heads=2, **({"sliding_window": SLIDING} if arch == "mistral" else {}))
    ref = twin(model)
    ids, mask = padded_batch(PROMPT)
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, DynamicCache(config=ref.config), STEPS)
        sliding = {"sliding_layers": "rewrite"} if arch == "mistral" else {}
        specache.compile(model, policy=policy, **sliding, **overrides)
        got, _ = decode_loop(model, ids, mask, DynamicCache(config=model.config), STEPS, forced=toks)
    st = specache.stats(model)
    assert st["found"] > 0 and st["rewritten"] == st["found"], st["sites"]
    assert all(s["decode_steps"] == STEPS for s in st["store"].values()), st["store"]
    return got, want, st


GPTFAST = {"heads": (8, 2), "head_dim": 16, "layers": 2, "batch": 2, "prefill": 40, "steps": 6}


@torch.no_grad()
def gptfast_vs_unmodified(policy, prefill=GPTFAST["prefill"], **overrides):
    """The same for the gpt-fast module (preallocated cache written in place, bool mask, INDEX mode), GQA 8/2."""
    g = GPTFAST
    torch.manual_seed(0)
    model = FastTransformer(*g["heads"], head_dim=g["head_dim"], layers=g["layers"], batch=g["batch"]).eval()
    ref = copy.deepcopy(model)
    toks = _tokens(prefill + g["steps"], batch=g["batch"])
    want = list(run_fast(ref, toks, prefill, g["steps"]))
    specache.compile(model, policy=policy, **overrides)
    got = list(run_fast(model, toks, prefill, g["steps"]))
    st = specache.stats(model)
    assert st["rewritten"] == st["found"] == g["layers"], st["sites"]
    assert all(s["decode_steps"] == g["steps"] for s in st["store"].values()), st["store"]
    return got, want, st


def gptfast_kv_bytes(tokens, dtype_bytes=4):
    """Full-precision K+V bytes of the gpt-fast module over ``tokens`` positions, all layers."""
    g = GPTFAST
    return g["layers"] * 2 * g["batch"] * g["heads"][1] * tokens * g["head_dim"] * dtype_bytes


def assert_evicted(got, want):
    """Prefill exact, decode not: the evicted tokens really are gone."""
    assert rel_err(got[0], want[0]) <= FP32_REL
    decode_err = max(rel_err(g, w) for g, w in zip(got[1:], want[1:]))
    assert decode_err > 1e-4, decode_err


def test_covering_budget_matches_unmodified():
    """Mistral's sliding window: the sinks stay kept but must drop out of attention once they leave the window."""
    got, want, st = llama_vs_unmodified("streaming", "mistral", policy_options={"budget": max(PROMPT) + STEPS})
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs
    assert st["bytes"]["host"] == 0  # uses_store=False: nothing written to the host


def test_small_budget_evicts_and_bounds_device_bytes():
    budget = 6
    got, want, st = gptfast_vs_unmodified("streaming", policy_options={"budget": budget, "sinks": 2})
    assert_evicted(got, want)
    g = GPTFAST
    # K, V of budget tokens per KV head + one int64 position per slot, per layer, and the static decode path's token
    # counter (an int64 per layer: the module writes its cache by position): nothing grows while decoding
    assert st["bytes"]["device"] == gptfast_kv_bytes(budget) + g["layers"] * budget * 8 + g["layers"] * 8
    assert st["bytes"]["device"] < gptfast_kv_bytes(g["prefill"] + g["steps"]) and st["bytes"]["host"] == 0
