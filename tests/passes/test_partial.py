"""A site rewritten in one graph and left alone in another must fail loudly, never silently lose its prefill."""

import pytest
import torch
import torch.nn.functional as F

import specache
from specache_compile.runtime import CacheMismatch


class LegacyAttention(torch.nn.Module):
    """HF-legacy style: no cat at prefill (past is None), cat at decode."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h, self.qkv = h, torch.nn.Linear(d, 3 * d)

    def forward(self, x, past=None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        return o.transpose(1, 2).reshape(b, s, d), (k, v)


@torch.no_grad()
def test_prefill_left_alone_then_decode_rewritten_raises():
    torch.manual_seed(0)
    layer = LegacyAttention().eval()
    specache.compile(layer, policy="full")
    _, past = layer(torch.randn(1, 8, 32))
    with pytest.raises(CacheMismatch, match="left alone"):
        layer(torch.randn(1, 1, 32), past)
    st = specache.stats(layer)
    (site,) = st["sites"].values()
    assert st["partial"] == 1 and site["status"] == "partial" and site["graphs"] == 2, st["sites"]
    assert "no KV-cache write" in site["reason"]
