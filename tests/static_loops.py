"""What the static decode paths' CPU tests (tests/policies/test_*_static.py) share: a hand-written greedy loop over
one StaticCache, and a site whose static state a few plain steps have built (the wrong-position tests)."""

from __future__ import annotations

import pytest
import torch

from specache_compile.runtime.runtime import CacheMismatch


def greedy_over_static_cache(model, ids, steps, cache_len, after_prefill=None, refuse_more=False):
    """Prefill ``ids`` [1, S] into a StaticCache of ``cache_len`` positions, then ``steps`` one-token greedy steps at
    the positions the loop gives (a gpt-fast-style caller): each step's last-position logits, stacked [1, steps, V].
    ``after_prefill(model)`` runs between the two; ``refuse_more``: a two-token call after the steps must raise, as
    for a policy that keeps no full-precision store to attend the earlier tokens exactly."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    if after_prefill is not None:
        after_prefill(model)
    logits, tok, p = [], out.logits[:, -1:].argmax(-1), ids.shape[1]
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[p]]),
                    cache_position=torch.tensor([p]))
        p += 1
        logits.append(out.logits[:, -1:])
        tok = out.logits[:, -1:].argmax(-1)
    if refuse_more:
        with pytest.raises(CacheMismatch, match="keeps no full-precision"):
            model(input_ids=torch.cat([tok, tok], 1), past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(p, p + 2)[None], cache_position=torch.arange(p, p + 2))
    return torch.cat(logits, 1)


def site_after_plain_steps(model, ids, steps, cache_len=64):
    """The model's first site after a prefill of ``ids`` and ``steps`` one-token steps at the next positions (its
    static state built), checked to have flagged nothing."""
    import specache

    greedy_over_static_cache(model, ids, steps, cache_len)
    specache.stats(model)  # nothing flagged so far
    return next(iter(specache.runtime_of(model).sites.values()))
