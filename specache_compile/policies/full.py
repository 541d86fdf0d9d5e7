"""The full cache: every token, full precision (the exactness mode).

The full KV still lives where ``Config.kv_home`` says (host memory by default), so each decode step fetches the whole
attended range: this is what transformers' OffloadedCache does, and the baseline every other policy is measured
against. Nothing is kept on the device between steps.

Static decode path (``policy_options={"static": "auto"}``, the default; True requires it, False never): on a cache
written by position, a step writes the new token's K/V into the store at its device position
(``scatter_rows_static``: a GPU write into pinned memory) and fetches the store's whole capacity (one copy per tensor
whose size is fixed for the sequence; the bias over the capacity masks what is not written yet), so the step has the
same shapes whatever the position and ``model.generate`` replays it as a CUDA graph. The price: it fetches the
capacity, not the written length (a bucketed cache's capacity is at most a quarter above the length past 4K
positions).
"""

from __future__ import annotations

from ..kernels import ops
from ..kernels.quant_ops import read_rows_from_host, scatter_rows_static
from ..runtime.state import StaticDecodeState, parse_static
from .base import Policy, register_policy


@register_policy
class FullPolicy(Policy):
    name = "full"

    def __init__(self, config):
        super().__init__(config)
        opts = dict(config.policy_options)
        static = opts.pop("static", "auto")
        if opts:
            raise ValueError(f"full policy: unknown policy_options {sorted(opts)}; expected at most 'static'; "
                             "fix: remove them")
        parse_static(self, static, [])

    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, 1, D]; the whole range comes back from the store in full precision.
        k, v = site.fetch_range(lo, hi)
        return ops.sparse_attention(q, k, v, bias, scale)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        if site.static is None:
            site.static = FullStatic(site, bias.shape[-1])
        return site.static.step(site, q, k_new, v_new, pos, bias, scale)

    def describe(self):
        return {"policy": self.name, "static": self.static}


class FullStatic(StaticDecodeState):
    """The full policy's static state: a device counter of the tokens stored and the store reserved at the cache's
    capacity ``C``, its unwritten rows zeroed (a masked column must hold a number: a -inf bias over a NaN row still
    gives NaN)."""

    def __init__(self, site, capacity: int) -> None:
        super().__init__(site.device, site.length)
        self.capacity = capacity
        for buf in (site.k, site.v):
            buf.reserve(capacity)  # one allocation (and a sync if it grows): written in place from now on
            buf.data.narrow(2, site.length, buf.data.shape[2] - site.length).zero_()
        if site.device.type == "cuda" and site.k.data.device.type == "cpu" and not site.k.data.is_pinned():
            raise RuntimeError(f"specache: site {site.name}: the static decode path writes the host store from the "
                               "GPU, which needs it pinned (Config.kv_home='host' on CUDA pins it)")
        self.rows = site.batch * site.heads * capacity
        self.nbytes_step = self.rows * (site.head_dim + site.v_head_dim) * site.k.data.element_size()

    def tensors(self):
        return (self.n,)

    def replayed(self, site, steps: int) -> None:
        if steps > 0:
            site.count_static_steps(1, False, steps)
            site.stats.fetched_rows += self.rows * steps
            site.stats.fetched_bytes += self.nbytes_step * steps

    def step(self, site, q, k_new, v_new, pos, bias, scale):
        """q [B, Hq, 1, D], the new token's K/V [B, Hkv, 1, D] at the device position pos [1], bias
        [B|1, Hq|1, 1, C] over the capacity. Returns [B, Hq, 1, Dv]."""
        p = pos[:1]
        self.advance(p)
        scatter_rows_static(k_new[:, :, :1], p, site.k.data)
        scatter_rows_static(v_new[:, :, :1], p, site.v.data)
        c, dev = self.capacity, q.device
        # from pinned memory: asynchronous, ordered after the writes above on the same stream. Through the slab reader:
        # a store reserved past the capacity makes the range a non-contiguous view, which ``.to`` would stage through
        # pageable memory (a blocking copy, and one a CUDA graph capture refuses)
        pinned = site.k.pin
        k = read_rows_from_host(site.k.data.narrow(2, 0, c), dev, pinned)
        v = read_rows_from_host(site.v.data.narrow(2, 0, c), dev, pinned)
        site.stats.fetched_rows += self.rows
        site.stats.fetched_bytes += self.nbytes_step
        return ops.sparse_attention(q, k, v, bias, scale)
