"""specache's one-token decode samples how much of each step's top-k the previous step held: the hit rate a
previous-query prefetch would have under model.generate (reported as previous_query_hit_rate)."""

from __future__ import annotations

import torch
from hf_models import build, twin

import specache
from specache_compile.config import Config
from specache_compile.policies.specache import SpeCachePolicy


class _Site:
    def __init__(self):
        self.tier = {}


def test_sampled_overlap_counts():
    policy = SpeCachePolicy(Config(policy="specache", policy_options={"hit_every": 2}))
    site = _Site()
    steps = [[[0, 1, 2, 3]], [[0, 1, 8, 9]], [[1, 8, 9, 10]], [[20, 21, 22, 23]], [[20, 21, 22, 30]]]
    for row in steps:
        policy._sample_previous(site, torch.tensor([row]))
    # sampled at steps 2 and 4 (every second one-token step): 2 of 4 against step 1, 0 of 4 against step 3
    assert int(site.tier["prev_hits"]) == 2 and site.tier["prev_total"] == 8


@torch.no_grad()
def test_reported_by_model_generate():
    base = build("llama", seed=0)
    m = specache.compile(twin(base), topk=8, window=16, group_size=16, policy_options={"hit_every": 1})
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(0))
    m.generate(ids, max_new_tokens=12, do_sample=False)
    rates = [s["previous_query_hit_rate"] for s in specache.stats(m)["store"].values()]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in rates), rates
