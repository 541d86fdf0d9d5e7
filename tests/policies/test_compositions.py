"""Compositions of two methods in one policy: CAKE's per-layer budgets deciding SpeCache's per-layer top-k."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_models  # noqa: E402

import specache  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "models" / "specache-tiny"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_cake_budgets_give_layers_different_topk_summing_to_the_total():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
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
