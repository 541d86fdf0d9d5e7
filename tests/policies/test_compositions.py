"""Compositions of two methods in one policy: CAKE's per-layer budgets deciding SpeCache's per-layer top-k."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_models  # noqa: E402

import specache  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # the trained model over a 600-token prompt: ~10 s on 2 cores (the exact case below stays fast)
def test_cake_budgets_give_layers_different_topk_summing_to_the_total(tiny_model):
    model = copy.deepcopy(tiny_model)  # tests/conftest.py: the trained model, loaded once per process
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 2000, (1, 600), generator=g)
    specache.compile(model, topk=32, policy_options={"layer_budgets": "cake"})
    specache.generate(model, ids, 4)
    st = specache.stats(model)["store"]
    topk = [s["topk"] for s in st.values()]
    assert len(set(topk)) > 2  # the trained model's layers attend very differently: so do their budgets
    assert abs(sum(topk) - 32 * len(topk)) <= len(topk)  # the same total as uniform top-32 (up to the 1-row floor)
    for s in st.values():  # each layer fetched exactly its own top-k per step (pre-decoding + 3 steps)
        assert s["fetched_rows"] == 4 * 2 * s["topk"]


def test_cake_budgets_exact_when_topk_covers_every_layer():
    base = hf_models.build("llama", layers=3)
    ids = torch.randint(2, hf_models.VOCAB, (2, 120))
    ref = base.generate(ids, max_new_tokens=8, do_sample=False)[:, 120:]
    m = specache.compile(hf_models.twin(base), topk=400, window=16, group_size=16,
                         policy_options={"layer_budgets": "cake"})
    assert torch.equal(specache.generate(m, ids, 8), ref)


def test_composition_options_are_checked():
    with pytest.raises(ValueError, match="layer_budgets"):
        specache.compile(hf_models.build("llama"), policy_options={"layer_budgets": "pyramid"})
    with pytest.raises(ValueError, match="tau1"):
        specache.compile(hf_models.build("llama"), policy_options={"layer_budgets": "cake", "tau1": -1})


@pytest.mark.slow  # a 300-token batch of 2 at head dim 64, coded and decoded by the reference codec: ~9 s on 2 cores
def test_kvcomp_host_codec_shrinks_the_host_copy_within_its_error_bound():
    base = hf_models.build("llama", layers=2, heads=8, kv_heads=2, head_dim=64)
    ids = torch.randint(2, hf_models.VOCAB, (2, 300))
    ref = base.generate(ids, max_new_tokens=6, do_sample=False)[:, 300:]
    rel = 0.02
    # measure_error keeps an exact copy next to the coded one: the oracle for the bound
    m = specache.compile(hf_models.twin(base), topk=512, measure_error=True,
                         policy_options={"host_codec": "kvcomp", "host_rel": rel})
    out = specache.generate(m, ids, 6, prefill_chunk=128)  # chunks: later chunks attend to decoded earlier rows
    assert (out == ref).float().mean() >= 0.8  # rows within 1% of their range: greedy barely moves
    for site in specache.runtime_of(m).sites.values():
        n = site.length
        exact_k, exact_v = site.k.view(), site.v.view()
        idx = torch.arange(n).expand(site.batch, site.heads, n)
        k, v = site.codec.fetch(idx, torch.float32, torch.device("cpu"), True, True)
        for got, want in ((k, exact_k), (v, exact_v)):
            bound = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) * rel / 2  # s/2 per row
            assert bool(((got - want).abs() <= bound * 1.001 + 1e-6).all())
        raw = 2 * exact_k.numel() * exact_k.element_size()
        assert site.tier_bytes()["host"] < raw / 2  # fp32 rows coded at a few bits per value


def test_kvcomp_host_codec_options_are_checked():
    with pytest.raises(ValueError, match="host_codec"):
        specache.compile(hf_models.build("llama"), policy_options={"host_codec": "zstd"})
    with pytest.raises(ValueError, match="host_rel"):
        specache.compile(hf_models.build("llama"), policy_options={"host_codec": "kvcomp", "host_rel": 1e-4})
