"""The README's example policy (H2O, under "Writing a policy") runs as printed: registered, equal to the unmodified
model while its budget holds the whole context, bounded to the budget when it does not, its options checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hf_models import build, twin

import specache
from specache_compile.policies import base

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def h2o():
    text = README.read_text()
    code = re.search(r"<!-- example-policy -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.splitlines()) < 60, "the README promises a policy in under 60 lines"
    namespace: dict = {}
    exec(compile(code, "README.md:example-policy", "exec"), namespace)
    yield namespace["H2OPolicy"]
    base._REGISTRY.pop("h2o", None)


@torch.no_grad()
def test_covering_budget_equals_the_unmodified_model(h2o):
    ref = build("llama", seed=0)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    m = specache.compile(twin(ref), policy="h2o", policy_options={"budget": 512, "recent": 8})
    assert torch.equal(m.generate(ids, max_new_tokens=10, do_sample=False),
                       ref.generate(ids, max_new_tokens=10, do_sample=False))


@torch.no_grad()
def test_small_budget_keeps_the_budget(h2o):
    ref = build("llama", seed=0)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    m = specache.compile(twin(ref), policy="h2o", policy_options={"budget": 24, "recent": 8})
    m.generate(ids, max_new_tokens=10, do_sample=False)
    for site in specache.runtime_of(m).sites.values():
        t = site.tier
        assert t["k"].shape[2] == t["pos"].shape[2] == 24
        newest = t["pos"][..., -8:]
        assert torch.equal(newest, torch.arange(41, 49).expand_as(newest))  # the 8 newest of 49 positions, kept
    assert specache.memory(m)["host"] == 0


@pytest.mark.parametrize("opts,match", [
    ({"budget": 8, "recent": 8}, "expected 0 < recent < budget"),
    ({"budgt": 3}, r"unknown policy_options \['budgt'\]; expected some of \['budget', 'recent'\]"),
    ({"budget": "x"}, r"policy_options\['budget'\] expected int, got 'x'"),
    ({"recent": True}, r"policy_options\['recent'\] expected int, got True"),
])
def test_options_are_checked(h2o, opts, match):
    with pytest.raises(ValueError, match=match):
        specache.compile(twin(build("llama", seed=0)), policy="h2o", policy_options=opts)
