"""The full cache: every token, full precision (the exactness mode).

The full KV still lives where ``Config.kv_home`` says (host memory by default), so each decode step fetches the whole
attended range: this is what transformers' OffloadedCache does, and the baseline every other policy is measured
against. Nothing is kept on the device between steps.
"""

from __future__ import annotations

from ..kernels import ops
from .base import Policy, register_policy


@register_policy
class FullPolicy(Policy):
    name = "full"

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, 1, D]; the whole range comes back from the store in full precision.
        k, v = site.fetch_range(lo, hi)
        return ops.sparse_attention(q, k, v, bias, scale)
