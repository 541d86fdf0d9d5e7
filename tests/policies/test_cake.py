"""CAKE (policies/cake.py): the pure functions (preference, allocation, indicator), cascading against one-shot
eviction (Theorem 1), the decode rule, driven through fake sites in the runtime's call order; then the whole pass on
a small transformers Llama."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tolerance table, tiny models
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))  # test_hf's decode loop and padded batch
from numerics import FP32_REL, rel_err  # noqa: E402

import specache  # noqa: E402
from specache_compile.config import Config  # noqa: E402
from specache_compile.kernels import ops  # noqa: E402
from specache_compile.policies import PrefillView  # noqa: E402
from specache_compile.policies.cake import (  # noqa: E402
    CakePolicy,
    allocate_budgets,
    eviction_indicator,
    layer_preference,
    window_attention,
)
from specache_compile.runtime.store import Site  # noqa: E402

# -- fake runtime: the calls runtime.attend makes, in its order ------------------------------------------------------


def make_policy(**opts) -> CakePolicy:
    return CakePolicy(Config(policy="cake", policy_options=opts))


def make_site(name, b, hkv, d, dtype=torch.float32) -> Site:
    cpu = torch.device("cpu")
    return Site(name, b, hkv, d, d, dtype, cpu, cpu, pin=False, keep_full=False)


def prefill(policy, sites, layers, mask=None):
    """layers: per site (q [B, Hq, S, D], k, v [B, Hkv, S, D]); one prefill forward, site by site."""
    for site, (q, k, v) in zip(sites, layers):
        s = q.shape[2]
        policy.reset(site)
        site.write(0, k, v)
        policy.append(site, k, v, 0)
        view = PrefillView(q, k, v, mask, mask is None, 0, s, 0, 1 / math.sqrt(q.shape[-1]))
        policy.prefill(site, view)


def decode_step(policy, sites, steps, bias=None, lo=0):
    """steps: per site (q [B, Hq, 1, D], k, v [B, Hkv, 1, D]); returns the outputs."""
    outs = []
    for site, (q, k, v) in zip(sites, steps):
        start = site.length
        site.write(start, k, v)
        policy.append(site, k, v, start)
        b = None if bias is None else bias[..., lo : start + 1]
        outs.append(policy.decode(site, q, b, lo, start + 1, 1 / math.sqrt(q.shape[-1])))
    return outs


def kept(site) -> torch.Tensor:
    t = site.tier
    return t["pos"][:, :, : t["n"]].clone()


def layer_inputs(kind, b=2, hq=4, hkv=2, s=48, d=16, seed=0, dtype=torch.float32, planted=()):
    """q, k, v of one layer whose window attention is 'dispersed' (moves between queries), 'sharp' (every query on
    key 0) or 'planted' (the window queries look at the given positions)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    if kind == "sharp":
        q = q * 0.01 + 0.0
        q[..., 0] = 50.0
        k = k * 0.01
        k[:, :, 0, 0] = 50.0
    elif kind == "planted":
        # the window queries share one direction u; the planted keys lie along it, every other key is small noise
        u = torch.randn(d, generator=g)
        q, k = q * 0.1, k * 0.1
        q[:, :, -8:] += 2 * u
        k[:, :, list(planted)] += 3 * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


# -- pure functions ---------------------------------------------------------------------------------------------------


def test_dispersed_layer_gets_more_budget_than_sharp():
    pw = {}
    for kind in ("dispersed", "sharp"):
        q, k, _ = layer_inputs(kind)
        bias = PrefillView(q, k, k, None, True, 0, 48, 0, 0.25).bias(8)
        pw[kind] = window_attention(q, k, 0.25, bias, 8)  # [B, Hq, 8, 48]
        assert pw[kind].shape == (2, 4, 8, 48)
        torch.testing.assert_close(pw[kind].sum(-1), torch.ones(2, 4, 8))
    p_disp = float(layer_preference(pw["dispersed"], 1.0, 1.0))
    p_sharp = float(layer_preference(pw["sharp"], 1.0, 1.0))
    assert p_disp > 100 * p_sharp >= 0
    budgets = allocate_budgets([p_disp, p_sharp], 60, [40, 40])
    assert budgets[0] > budgets[1] and sum(budgets) == 60

    # the equation, by hand: H^(1/t1) * V^(1/t2) over the prefix columns
    a = pw["dispersed"][..., :40].double()
    h = -(a * torch.log(a + 1e-10)).sum()
    var = a.var(dim=-2).sum()
    got = float(layer_preference(pw["dispersed"], 2.0, 0.5))
    assert got == pytest.approx(float(h**0.5 * var**2.0), rel=1e-4)

    # the same through the policy: per-layer budgets follow the preferences
    pol = make_policy(budget=20, window=8)
    sites = [make_site(f"l{i}", 2, 2, 16) for i in range(2)]
    prefill(pol, sites, [layer_inputs("dispersed"), layer_inputs("sharp")])
    decode_step(pol, sites, [layer_inputs("dispersed", s=1, seed=5)] * 2)
    bud = pol.budgets()
    assert bud["l0"] > bud["l1"] and bud["l0"] + bud["l1"] == 2 * (20 - 8)


def test_allocate_budgets_clamps_redistributes_and_sums():
    assert allocate_budgets([1, 3], 40, [100, 100]) == [10, 30]  # proportional
    assert allocate_budgets([1, 1, 6], 80, [100, 100, 20]) == [30, 30, 20]  # clamped, excess in proportion
    assert allocate_budgets([0, 2, 0], 60, [100, 10, 100]) == [25, 10, 25]  # zero prefs: only once others are full
    assert allocate_budgets([1, 2], 500, [40, 40]) == [40, 40]  # the prompt fits: everything
    assert allocate_budgets([float("nan"), 1.0], 10, [10, 10]) == [0, 10]
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        prefs = [rng.choice([0.0, rng.random(), 1e6 * rng.random(), 1.0]) for _ in range(n)]
        caps = [rng.randint(0, 40) for _ in range(n)]
        total = rng.randint(0, sum(caps) + 5)
        out = allocate_budgets(prefs, total, caps)
        assert sum(out) == min(total, sum(caps))
        assert all(0 <= b <= c for b, c in zip(out, caps)), (prefs, caps, total, out)
        # Proposition 1: appending a layer never grows an earlier layer's budget
        prev = None
        for m in range(1, n + 1):
            cur = allocate_budgets(prefs[:m], total, caps[:m])
            assert prev is None or all(c <= p for c, p in zip(cur, prev)), (prefs, caps, total, m)
            prev = cur
    with pytest.raises(ValueError, match="one cap per pref"):
        allocate_budgets([1.0], 3, [1, 2])
    with pytest.raises(ValueError, match="total"):
        allocate_budgets([1.0], -1, [1])


def test_eviction_indicator_equation_and_planted_tokens():
    planted = (10, 11, 12, 25, 26, 27)  # two 3-token needles (the pooling spreads single tokens)
    q, k, _ = layer_inputs("planted", planted=planted)
    pw = window_attention(q, k, 0.25, None, 8)
    ind = eviction_indicator(pw, gamma=200.0, kernel=5, kv_heads=2)
    assert ind.shape == (2, 2, 40)
    # by hand: mean + gamma * unbiased var over the window rows, prefix only, avg-pooled, GQA-group mean
    raw = (pw.mean(-2) + 200.0 * pw.var(-2))[..., :40]
    want = F.avg_pool1d(raw, 5, 1, 2).reshape(2, 2, 2, 40).mean(2)
    torch.testing.assert_close(ind, want)
    top = ops.topk_positions(ind, len(planted))
    for p in planted:
        assert (top == p).any(-1).all(), (p, top)
    # through the policy: every KV head of every batch row keeps the planted tokens
    pol = make_policy(budget=8 + len(planted), window=8, decode_evict=False)  # the prefill's choice only
    site = make_site("l0", 2, 2, 16)
    prefill(pol, [site], [(q, k, _)])
    decode_step(pol, [site], [layer_inputs("dispersed", s=1, seed=1)])
    pos = kept(site)
    for p in planted:
        assert (pos == p).any(-1).all(), (p, pos)
    assert (pos[..., -9:] == torch.arange(40, 49)).all()  # the window and the new token


def test_cascading_equals_one_shot():
    """Theorem 1 on five constructed layers (one dominant and clamped, one sharp, three dispersed): the first
    sequence evicts one-shot at its first decode step; the second cascades layer by layer and must end with the very
    same kept sets, while no processed layer ever holds more than its budget so far."""
    kinds = [("dispersed", 3.0), ("sharp", 1.0), ("dispersed", 1.0), ("dispersed", 0.5), ("planted", 1.0)]
    layers = []
    for i, (kind, sharpen) in enumerate(kinds):  # a larger query scale: peakier attention that moves more
        q, k, v = layer_inputs(kind, seed=i, planted=(5, 11))
        layers.append((q * sharpen, k, v))
    sites = [make_site(f"l{i}", 2, 2, 16) for i in range(5)]
    pol = make_policy(budget=24, window=8, decode_evict=False)  # the decode step only appends its token
    step = [layer_inputs("dispersed", s=1, seed=9)] * 5

    prefill(pol, sites, layers)
    assert pol.layers is None and all(s.tier["n"] == 48 for s in sites)  # nothing evicted before L is known
    decode_step(pol, sites, step)
    assert pol.layers == 5
    one_shot = [kept(s)[..., :-1] for s in sites]
    prefs = [s.tier["pref"] for s in sites]
    budgets = allocate_budgets(prefs, (24 - 8) * 5, [40] * 5)
    assert budgets[0] == 40 and budgets[1] == 0 and len(set(budgets)) > 3  # clamped, sharp: nothing, the rest differ
    assert [s.tier["budget"] for s in sites] == budgets

    # the one-shot sets are the top-B_l of each layer's indicator, plus the window
    for (q, k, _), bud, got in zip(layers, budgets, one_shot):
        ind = eviction_indicator(window_attention(q, k, 0.25, PrefillView(q, k, k, None, True, 0, 48, 0, 0.25)
                                                  .bias(8), 8), 200.0, 5, 2)
        want = torch.cat([ops.topk_positions(ind, bud), torch.arange(40, 48).expand(2, 2, 8)], dim=2)
        assert torch.equal(got, want)

    # second sequence: cascading from the first layer on
    held = []
    for i, (site, (q, k, v)) in enumerate(zip(sites, layers)):
        prefill(pol, [site], [(q, k, v)])
        stage = allocate_budgets(prefs[: i + 1], (24 - 8) * 5, [40] * (i + 1))
        assert [s.tier["np"] for s in sites[: i + 1]] == stage
        held.append(sum(s.tier["n"] for s in sites[: i + 1]))
    assert max(held) <= (24 - 8) * 5 + 5 * 8 + 40  # B_total + the windows + one layer's prompt
    for s, want in zip(sites, one_shot):
        assert torch.equal(kept(s), want)


def test_fraction_budget_and_prompt_that_fits():
    """budget in (0, 1]: C = ceil(budget * S) tokens per layer; a prompt that fits (S <= C) is not evicted at all."""
    layers = [layer_inputs("dispersed", seed=i) for i in range(3)]
    step = [layer_inputs("dispersed", s=1, seed=9)] * 3
    for frac, per_layer in [(0.5, 24), (0.3, 15), (1.0, 48)]:
        pol = make_policy(budget=frac, window=8, decode_evict=False)
        sites = [make_site(f"l{i}", 2, 2, 16) for i in range(3)]
        prefill(pol, sites, layers)
        decode_step(pol, sites, step)
        budgets = pol.budgets()
        if per_layer < 48:
            assert sum(budgets.values()) == 3 * (per_layer - 8), (frac, budgets)
            assert all(s.tier["n"] == s.tier["budget"] + 8 + 1 for s in sites)
        else:  # fits: every prompt token stays, the decode budget is C - S_w
            assert all(b == 48 - 8 for b in budgets.values())
            assert all(torch.equal(kept(s), torch.arange(49).expand(2, 2, 49)) for s in sites)


@pytest.mark.parametrize("decode_evict", [True, False])
def test_decode_rule(decode_evict):
    pol = make_policy(budget=16, window=4, decode_evict=decode_evict)
    sites = [make_site(f"l{i}", 2, 2, 16) for i in range(2)]
    prefill(pol, sites, [layer_inputs("dispersed", seed=i) for i in range(2)])
    g = torch.Generator().manual_seed(3)
    nbytes = None
    for t in range(12):
        q, k, v = (torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g),
                   torch.randn(2, 2, 1, 16, generator=g))
        decode_step(pol, sites, [(q, k, v)] * 2)
        for s in sites:
            t_ = s.tier
            pos = kept(s)
            assert (pos[..., -4:] == torch.arange(s.length - 4, s.length)).all()  # the most recent S_w kept
            if decode_evict:
                assert t_["n"] == t_["budget"] + t_["sw"]
            else:
                assert t_["n"] == t_["budget"] + t_["sw"] + t + 1
        if t == 0:
            nbytes = sum(s.tier_bytes()["device"] for s in sites)
    grown = sum(s.tier_bytes()["device"] for s in sites)
    assert (grown == nbytes) if decode_evict else grown >= nbytes


def test_decode_attends_kept_rows_in_range():
    """The decode bias is read at each kept row's position; rows below lo (slid out of a sliding window) are
    masked: the output equals exact attention over the kept rows with positions in [lo, hi)."""
    pol = make_policy(budget=12, window=4)
    site = make_site("l0", 1, 2, 16)
    q, k, v = layer_inputs("dispersed", b=1)
    prefill(pol, [site], [(q, k, v)])
    g = torch.Generator().manual_seed(7)
    qd, kd, vd = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g), torch.randn(
        1, 2, 1, 16, generator=g)
    lo = 20
    bias = torch.zeros(1, 1, 1, 49)
    bias[..., 30] = float("-inf")  # the model masks one more position
    out = decode_step(pol, [site], [(qd, kd, vd)], bias=bias, lo=lo)[0]
    # decode evicted one row after attending: rebuild what it attended from the prefill's kept set + the new token
    kk = torch.cat([k, kd], 2)
    vv = torch.cat([v, vd], 2)
    pol2 = make_policy(budget=12, window=4)
    site2 = make_site("l0", 1, 2, 16)
    prefill(pol2, [site2], [(q, k, v)])
    pol2._finalise()
    pos = torch.cat([kept(site2), torch.full((1, 2, 1), 48)], dim=2)  # [1, 2, n]
    want = torch.empty(1, 4, 1, 16)
    for h in range(4):
        p = pos[0, h // 2]
        p = p[(p >= lo) & (p != 30)]
        att = torch.softmax((qd[0, h, 0] @ kk[0, h // 2, p].T) * 0.25, -1)
        want[0, h, 0] = att @ vv[0, h // 2, p]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_dtypes_heads_and_left_padding(dtype, hq, hkv):
    """A left-padded batch: padding keys get no attention, so they go first; all shapes and dtypes run."""
    b, s, d = 2, 40, 16
    lengths = (40, 26)
    keep = torch.zeros(b, s, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, s - n :] = True
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = (causal & keep[:, None, :])[:, None]  # [B, 1, S, S] bool, True = attend
    pol = make_policy(budget=20, window=8)
    sites = [make_site(f"l{i}", b, hkv, d, dtype) for i in range(2)]
    prefill(pol, sites, [layer_inputs("dispersed", b, hq, hkv, s, d, seed=i, dtype=dtype) for i in range(2)], mask)
    q, k, v = layer_inputs("dispersed", b, hq, hkv, 1, d, seed=5, dtype=dtype)
    bias = torch.zeros(b, 1, 1, s + 1).masked_fill_(~torch.cat([keep, torch.ones(b, 1, dtype=torch.bool)], 1)[:, None,
                                                                                                          None], -1e30)
    outs = decode_step(pol, sites, [(q, k, v)] * 2, bias=bias)
    for out, site in zip(outs, sites):
        assert out.shape == (b, hq, 1, d) and out.dtype == dtype and torch.isfinite(out.float()).all()
        assert site.tier["k"].dtype == dtype
        pos = kept(site)
        # the short row (26 real tokens, 14 pads) keeps no padding position whose pooled indicator is exactly 0 (all
        # but the last two pads): 26 - 8 real prefix tokens outnumber the budget
        assert (pos[1] >= s - lengths[1] - 2).all(), pos[1]
    assert sum(pol.budgets().values()) == 2 * (20 - 8)


def test_bad_options_raise():
    cases = [({"budget": 8}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "big"}, "budget"),
             ({"window": 0}, "window"), ({"gamma": -1.0}, "gamma"), ({"tau1": 0.0}, "tau1"),
             ({"tau2": float("nan")}, "tau2"), ({"kernel": 4}, "kernel"), ({"decode_evict": 1}, "decode_evict"),
             ({"budgett": 100}, "unknown")]
    for opts, field in cases:
        with pytest.raises(ValueError, match=field) as err:
            make_policy(**opts)
        assert "fix" in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="budget"):  # at compile time, through the public call
        specache.compile(torch.nn.Linear(2, 2), policy="cake", policy_options={"budget": 0})


# -- the whole pass ---------------------------------------------------------------------------------------------------

PROMPT, STEPS = (40, 33, 25), 8


def cake_report(model) -> dict[str, dict]:
    """Per site: the policy's figures (budget, window, kept rows, preference) and the device bytes."""
    from specache_compile.api import runtime_of

    rt = runtime_of(model)
    return {name: {**rt.policy.site_report(s), **s.tier_bytes()} for name, s in rt.sites.items()}


def decode_loop(model, ids, mask, steps, forced=None):
    from test_hf import decode_loop as loop  # tests/models/test_hf.py: prefill, then one token per step by hand
    from transformers import DynamicCache

    return loop(model, ids, mask, DynamicCache(config=model.config), steps, forced)


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from hf_models import build, twin
    from test_hf import padded_batch

    model = build("llama", "sdpa", layers=4)  # 4 query / 2 KV heads of 16
    ids, mask = padded_batch(PROMPT)
    with torch.no_grad():
        want, toks = decode_loop(twin(model), ids, mask, STEPS)
    return model, ids, mask, want, toks


def test_pass_budget_covering_prompt_is_exact(llama):
    from hf_models import twin

    base, ids, mask, want, toks = llama
    model = twin(base)
    specache.compile(model, policy="cake", policy_options={"budget": max(PROMPT) + STEPS + 1, "window": 4})
    with torch.no_grad():
        got, _ = decode_loop(model, ids, mask, STEPS, forced=toks)
    st = specache.stats(model)
    assert st["rewritten"] == st["found"] == 4
    assert all(s["decode_steps"] == STEPS for s in st["store"].values())
    assert all(s["cake_kept"] == max(PROMPT) + STEPS for s in cake_report(model).values())
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs


def test_pass_small_budget_is_bounded_and_per_layer(llama):
    from hf_models import twin

    from specache_compile.evals.harness import kv_bytes_full

    base, ids, mask, want, toks = llama
    model = twin(base)
    budget, window = 12, 4
    specache.compile(model, policy="cake", policy_options={"budget": budget, "window": window})
    with torch.no_grad():
        got, _ = decode_loop(model, ids, mask, STEPS, forced=toks)
    st = specache.stats(model)
    store = cake_report(model)
    budgets = [s["cake_budget"] for s in store.values()]
    assert len(set(budgets)) > 1, budgets  # adaptive: the layers got different budgets
    assert sum(budgets) == (budget - window) * 4
    assert all(s["cake_kept"] == s["cake_budget"] + window for s in store.values())
    # device bytes: (B_l + S_w + 1) rows of K, V (fp32) and positions (int64) per KV head, nothing on the host
    b, hkv, d = ids.shape[0], 2, 16
    bound = sum((s["cake_budget"] + window + 1) * b * hkv * (2 * d * 4 + 8) for s in store.values())
    assert st["bytes"]["host"] == 0 and 0 < st["bytes"]["device"] <= bound
    assert st["bytes"]["device"] < kv_bytes_full(model, max(PROMPT) + STEPS, b) / 2
    assert max(rel_err(g, w) for g, w in zip(got, want)) > 1e-3  # it really evicted
    # a second sequence cascades (L is known now) and must give the same logits (Theorem 1 end to end)
    with torch.no_grad():
        again, _ = decode_loop(model, ids, mask, STEPS, forced=toks)
    assert model._specache_runtime.policy.layers == 4
    assert max(rel_err(a, g) for a, g in zip(again, got)) == 0.0


def test_pass_sliding_window_layers_exact():
    """Mistral's sliding window (16 < prompt): decode attends store positions [lo, hi) with lo > 0, so the kept
    prompt rows below lo must be masked; with a budget covering everything the logits stay the model's."""
    pytest.importorskip("transformers")
    from hf_models import build, twin
    from test_hf import padded_batch

    model = build("mistral", "sdpa", sliding_window=16)
    ref = twin(model)
    ids, mask = padded_batch(PROMPT)
    with torch.no_grad():
        want, toks = decode_loop(ref, ids, mask, STEPS)
        specache.compile(model, policy="cake", policy_options={"budget": 64, "window": 4}, sliding_layers="rewrite")
        got, _ = decode_loop(model, ids, mask, STEPS, forced=toks)
    st = specache.stats(model)
    assert st["rewritten"] == st["found"] == 2
    assert all(s["cake_kept"] == max(PROMPT) + STEPS for s in cake_report(model).values())
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert max(errs) <= FP32_REL, errs
