"""KVComp's static decode path: the compressed streams and the full-precision recent buffers at fixed shapes, the
lengths on the device, so a one-token step that compresses nothing does the same work whatever the position and is
replayed as a CUDA graph (decode_graphs.py).

KVComp's default decode (policies/kvcomp.py) sizes its attention by host counts that change every step: the
compressed keys it decodes (``nk``), the recent rows it attends (``length - nk``), likewise for the values. Most steps
only append the new token to the recent buffers; a step on which a whole block becomes due compresses it (quantize,
Huffman-encode with one host sync for the stream's length, append). Here, for a model decoding a StaticCache
(index-mode writes at ``cache_position``):

- **the recent buffers** are the default path's (the tier's ``k_rec`` / ``v_rec``) at ``recent + block`` rows (the
  most a step can hold before its block is cut), fixed; the new token's row goes to ``position - nk`` (a device
  scalar), and rows at or past the tokens written are masked;
- **the compressed streams** are the default path's Growables (words, offsets, scales, min_ints, codebook), read
  through views of a fixed number of tokens ``kcap`` / ``vcap`` (whole blocks) reserved up front, their unwritten
  tails zeroed (an unwritten vector starts at bit 0 and has scale 0: it decodes to finite zeros, which the mask, or
  a zero weight, removes); ``nk`` / ``nv`` are device scalars. The kernels (kvcomp_scores / kvcomp_pv) take their
  lengths from their tensors' shapes: a fixed view is a fixed launch, so they run unchanged;
- **attention** is the default path's: the compressed keys' scores and the recent keys' logits, each with the
  model's bias read at its position, masked past ``nk`` / the written tokens, the same softmax; the probabilities are
  placed by position, then read as weights over the compressed values ``[0, nv)`` and the recent values;
- **a block step** (a block of K or V becomes due: known on the host from ``site.length`` and the block sizes, no
  sync) says ``fits() == False``, so decode_graphs runs that call eagerly from Python: the block is compressed from
  the recent buffer as the default path cuts it (same rows, same codebook, same encoder), appended to the streams in
  place, the rest of the buffer shifted down, ``nk`` / ``nv`` advanced with ``fill_``. The graph stays valid: every
  tensor it reads is the same tensor, written in place.

Why views of ``kcap`` tokens rather than the cache's whole capacity, or exactly ``nk``: the kernels decode every
vector of their view each step, so a view of the whole capacity (at least 1024 positions for model.generate's
bucketed cache) would decode up to several times the compressed tokens; a view of exactly ``nk`` changes shape at
every block, i.e. a recapture every ``k_block`` steps. The view covers the compressed tokens plus a quarter (at least
four blocks); a block past it, or a stream that outgrows its reserved words (a Growable that grows is a new tensor),
makes the state a new object with larger views (``grown``), so decode_graphs proves and captures again: a few times
per sequence (graphs are keyed by the state's serial, never reused).

The write position is checked on the device (``bad``, raised by ``Runtime.check_deferred``). A multi-token call
after static steps is refused, as on the default path: KVComp keeps no full-precision store to attend the earlier
tokens exactly. The tier's host counters (``nk``, ``nv``, the recent buffers' lengths) stay exact: only a step run
from Python compresses, and a replayed step advances the recent lengths in ``replayed``.
"""

from __future__ import annotations

import torch

from ..kernels import kvcomp_ops as ko
from ..kernels import ops
from ..runtime.state import StaticDecodeState

_NEG = float("-inf")
# the tier's compressed-stream Growables a state reads through views (their unwritten tails zeroed)
_META = {"k": ("k_base", "k_rel", "k_scale", "k_min"), "v": ("v_base", "v_rel", "v_scale", "v_min")}


def _room(n: int, block: int, most: int) -> int:
    """Compressed tokens a state's views cover: ``n`` and a quarter more (at least four blocks), whole blocks, at
    most ``most``."""
    return min(most, -(-(n + max(n // 4, 4 * block)) // block) * block)


def due(policy, tier: dict, length: int) -> tuple[int, int]:
    """Tokens of K and of V the step writing position ``length`` compresses: the default path's cut rule
    (KVCompPolicy.append) after that step's one-token append."""
    end = length + 1
    return (max(0, (end - policy.k_recent) // policy.k_block * policy.k_block - tier["nk"]),
            max(0, (end - policy.v_recent) // policy.v_block * policy.v_block - tier["nv"]))


def _prefix(g, n: int) -> torch.Tensor:
    """The first ``n`` rows of a Growable's whole buffer (not only the rows written)."""
    return g.data.narrow(g.seq_dim, 0, n)


class KVCompState(StaticDecodeState):
    """One site's fixed-shape KVComp state (see the module docstring). ``n``: tokens written; ``nk`` / ``nv``: tokens
    compressed (device scalars, shared with the state this one replaced); views of the tier's buffers over
    ``kcap`` / ``vcap`` compressed tokens and ``rk`` / ``rv`` recent rows; ``cap``: the cache's capacity."""

    def __init__(self, policy, site, capacity: int, prev: KVCompState | None = None) -> None:
        super().__init__(site.device, site.length if prev is None else None)
        t, dev = site.tier, site.device
        self.policy, self.cap = policy, capacity
        kb, vb = policy.k_block, policy.v_block
        self.gk, self.gv = t["gk"], t["gv"]
        if prev is None:
            self.nk = torch.tensor(t["nk"], dtype=torch.int64, device=dev)
            self.nv = torch.tensor(t["nv"], dtype=torch.int64, device=dev)
        else:  # mid-step (a block step that outgrew the views): the counters and the flag carry on
            self.bad, self.n, self.nk, self.nv = prev.bad, prev.n, prev.nk, prev.nv
        # the most tokens either can compress: a block is cut once ``recent`` tokens follow it within the capacity
        self.kcap = _room(t["nk"], kb, max(0, capacity - policy.k_recent) // kb * kb)
        self.vcap = _room(t["nv"], vb, max(0, capacity - policy.v_recent) // vb * vb)
        self.rk = min(policy.k_recent + kb, capacity)
        self.rv = min(policy.v_recent + vb, capacity)
        b, h = site.batch, site.heads
        per_k, per_v = b * h * site.head_dim, b * h * site.v_head_dim  # values per token
        t["k_words"].reserve(_words(t, "k", self.kcap, per_k, b * h * self.kcap // self.gk, policy.max_len))
        t["v_words"].reserve(_words(t, "v", self.vcap, per_v, per_v * (self.vcap // vb) // self.gv, policy.max_len))
        sizes = {"k_base": self.kcap // self.gk, "k_rel": self.kcap, "k_scale": self.kcap // kb,
                 "k_min": self.kcap // kb, "v_base": self.vcap // vb, "v_rel": self.vcap // vb, "v_scale": self.vcap,
                 "v_min": self.vcap, "k_rec": self.rk, "v_rec": self.rv}
        for name, n in sizes.items():
            g = t[name]
            g.reserve(n)
            # unwritten offsets, scales and min_ints read as zeros (a finite, zero vector); recent rows as zeros
            g.data.narrow(g.seq_dim, g.length, g.data.shape[g.seq_dim] - g.length).zero_()
        self.views = {name: _prefix(t[name], n) for name, n in sizes.items()}
        self.views["k_words"], self.views["v_words"] = t["k_words"].data, t["v_words"].data
        self.sources = {name: t[name].data for name in (*sizes, "k_words", "v_words")}
        # a codebook not built yet (nothing compressed): a zero table the first block's is copied into, in place
        self.own_lut = {}
        for kind in ("k", "v"):
            lut = t.get(f"{kind}_lut")
            if lut is None:
                old = prev.own_lut.get(kind) if prev is not None else None
                lut = self.own_lut[kind] = old if old is not None else \
                    torch.zeros(1 << policy.max_len, dtype=torch.int16, device=dev)
            self.views[f"{kind}_lut"] = lut
        self.kcols = torch.arange(self.kcap, device=dev)
        self.vcols = torch.arange(self.vcap, device=dev)
        self.krows = torch.arange(self.rk, device=dev)
        self.vrows = torch.arange(self.rv, device=dev)
        if prev is not None:
            prev.__dict__.clear()  # its tensors go; the object stays (see the module docstring)

    def fits(self, site) -> bool:
        return due(self.policy, site.tier, site.length) == (0, 0)

    def tensors(self):
        return (self.n, self.nk, self.nv, self.kcols, self.vcols, self.krows, self.vrows, *self.own_lut.values())

    def replayed(self, site, steps: int) -> None:
        super().replayed(site, steps)
        _recent_lengths(site.tier, site.length)

    def step(self, site, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor,
             bias: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode step: q [B, Hq, 1, D], the new token's K/V [B, Hkv, 1, D] at the device position pos [1], bias
        [B|1, Hq|1, 1, C] over the cache's capacity. Returns [B, Hq, 1, Dv] in q.dtype. A block step compresses
        (from Python, with a host sync) and may replace ``site.static``; the attention is then the new
        state's."""
        p = pos[:1]
        self.advance(p)
        vw = self.views
        # clamped: a flagged step must not write past the buffers
        vw["k_rec"].index_copy_(2, (p - self.nk).clamp(0, self.rk - 1), k_new[:, :, :1].to(vw["k_rec"].dtype))
        vw["v_rec"].index_copy_(2, (p - self.nv).clamp(0, self.rv - 1), v_new[:, :, :1].to(vw["v_rec"].dtype))
        st = self
        mk, mv = due(self.policy, site.tier, site.length)
        if mk or mv:
            st = self._compress(site, mk, mv)
        _recent_lengths(site.tier, site.length + 1)
        return st._attend(q, bias, scale)

    def _compress(self, site, mk: int, mv: int) -> KVCompState:
        """The due blocks compressed from the recent buffers' oldest rows (the default path's cut), appended to the
        streams, the rest shifted down. NOTE: host syncs (the encoder's stream length; the codebook's histogram at a
        site's first block): block steps only, which run from Python."""
        t, pol = site.tier, self.policy
        end = site.length + 1
        for kind, m, fn in (("k", mk, pol._compress_keys), ("v", mv, pol._compress_values)):
            if not m:
                continue
            buf = t[f"{kind}_rec"].data
            rows = end - t[f"n{kind}"]  # rows held, the new token's included
            fn(t, buf[:, :, :m])
            buf[:, :, : rows - m].copy_(buf[:, :, m:rows].clone())
            (self.nk if kind == "k" else self.nv).fill_(t[f"n{kind}"])
            own = self.own_lut.get(kind)
            if own is not None:  # the codebook this block built: into the table the views read, and named by the tier
                own.copy_(t[f"{kind}_lut"])
                t[f"{kind}_lut"] = own
                del self.own_lut[kind]
        _recent_lengths(t, end)  # before a new state zeroes the buffers' tails: this step's rows are written
        moved = any(t[name].data is not src for name, src in self.sources.items())
        if moved or t["nk"] > self.kcap or t["nv"] > self.vcap:
            site.static = KVCompState(pol, site, self.cap, prev=self)
            return site.static
        return self

    def _attend(self, q: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """KVCompPolicy.decode's attention over the fixed views, unused entries masked."""
        pol, vw = self.policy, self.views
        b, hq = q.shape[:2]
        k_rec, v_rec = vw["k_rec"], vw["v_rec"]
        hkv, dv = k_rec.shape[1], v_rec.shape[-1]
        rep, cap = hq // hkv, self.cap
        parts, biases, ok, where = [], [], [], []
        if self.kcap:  # compressed keys: position = column
            parts.append(ko.kvcomp_scores(q, vw["k_words"], vw["k_base"], vw["k_rel"], vw["k_scale"], vw["k_min"],
                                          vw["k_lut"], self.gk, pol.k_block, pol.max_len, scale))
            biases.append(bias[..., : self.kcap])
            ok.append(self.kcols < self.nk)
            where.append(self.kcols)
        rpos = self.nk + self.krows  # recent keys at positions nk..
        parts.append(ops.attention_logits(q, k_rec, scale))
        biases.append(bias.index_select(-1, rpos.clamp(max=cap - 1)))
        ok.append(rpos < self.n)
        where.append(rpos)
        valid = torch.cat(ok)
        logits = torch.cat(parts, dim=-1) + torch.cat(biases, dim=-1)  # [B, Hq, 1, kcap + rk] fp32
        logits = logits.masked_fill(~valid, _NEG)
        # the default path's softmax (a fully masked row gives zeros, not NaN)
        m = logits.amax(dim=-1, keepdim=True)
        e = torch.exp(logits - torch.where(torch.isinf(m), 0.0, m))
        total = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(total > 0, total, 1.0)
        # the probabilities by position (column cap: where the masked entries go)
        idx = torch.where(valid, torch.cat(where), cap).expand(*p.shape)
        by_pos = p.new_zeros((*p.shape[:3], cap + 1)).scatter_(-1, idx, p)
        out = None
        if self.vcap:  # compressed values [0, nv)
            pc = torch.where(self.vcols < self.nv, by_pos[..., : self.vcap], 0.0)
            out = ko.kvcomp_pv(pc, vw["v_words"], vw["v_base"], vw["v_rel"], vw["v_scale"], vw["v_min"], vw["v_lut"],
                               self.gv, pol.v_block, pol.max_len)
        vpos = self.nv + self.vrows  # recent values at positions nv..
        pr = torch.where(vpos < self.n, by_pos.index_select(-1, vpos.clamp(max=cap)), 0.0)
        rec = (pr.reshape(b, hkv, rep, self.rv) @ v_rec.float()).reshape(b, hq, 1, dv)
        out = rec if out is None else out + rec
        return out.to(q.dtype)


def _recent_lengths(t: dict, length: int) -> None:
    """The recent buffers' host lengths at ``length`` tokens written (what compression_stats counts)."""
    t["k_rec"].length = length - t["nk"]
    t["v_rec"].length = length - t["nv"]


def _words(t: dict, kind: str, tokens: int, per_token: int, groups: int, max_len: int) -> int:
    """Words to reserve for ``tokens`` compressed tokens of ``per_token`` values: the stream's bits per value so far
    (half of max_len before any block), a quarter more, one word per offset group (groups start on a word)."""
    n, used = t[f"n{kind}"], t[f"{kind}_words"].length
    bits = used * 32 / (n * per_token) if n else max_len / 2
    return int(tokens * per_token * bits / 32 * 1.25) + groups + 64
