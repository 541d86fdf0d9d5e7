"""Shapes fuzzed with hypothesis through the whole rewritten path (pass, runtime, policy, CPU kernels) against the
unmodified attention: batch 1-3 with ragged (left-padded) lengths, GQA groups 1-4, odd head dims, prompts of 1-150
tokens; specache with a covering top-k is exact, so any difference is a bug."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specache


class GQA(torch.nn.Module):
    def __init__(self, d, hq, hkv, hd):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, hd
        self.q = torch.nn.Linear(d, hq * hd)
        self.kv = torch.nn.Linear(d, 2 * hkv * hd)

    def forward(self, x, past, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.hq, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.hkv, self.hd).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(b, s, -1), (k, v)


@pytest.mark.slow  # each example compiles its own model (about 3 s)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       hd=st.sampled_from([8, 12, 16]), s=st.integers(1, 150), pads=st.lists(st.integers(0, 5), min_size=3,
                                                                               max_size=3))
@torch.no_grad()
def test_specache_covering_topk_equals_sdpa(b, hkv, group, hd, s, pads):
    torch.manual_seed(0)
    d = 16
    ref = GQA(d, hkv * group, hkv, hd).eval()
    m = specache.compile(GQA(d, hkv * group, hkv, hd).eval(), policy="specache", topk=4096, window=2, group_size=4)
    m.load_state_dict(ref.state_dict())
    pad = [min(p, s - 1) for p in pads[:b]]
    keep = torch.ones(b, s, dtype=torch.bool)
    for i, p in enumerate(pad):
        keep[i, :p] = False
    x = torch.randn(b, s, d)
    empty = (torch.zeros(b, hkv, 0, hd), torch.zeros(b, hkv, 0, hd))
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = (causal[None] & keep[:, None, :])[:, None]
    outs = []
    for model in (ref, m):
        y, past = model(x, empty, mask)
        ys, km = [y], keep
        for t in range(5):
            km = torch.cat([km, torch.ones(b, 1, dtype=torch.bool)], dim=1)
            y, past = model(torch.randn(b, 1, d, generator=torch.Generator().manual_seed(t)), past, km[:, None, None])
            ys.append(y)
        outs.append(torch.cat(ys, dim=1))
    rows = torch.cat([keep, torch.ones(b, 5, dtype=torch.bool)], dim=1)  # padded query rows attend nothing defined
    torch.testing.assert_close(outs[1][rows], outs[0][rows], rtol=1e-4, atol=1e-5)
