"""KVComp: the whole KV cache on the device, compressed lossily; attention decompresses inside its kernels.

Paper: Jiang, Yang, Liu, Zhang, He, Jin, "KVComp: A High-Performance, LLM-Aware, Lossy Compression Framework for KV
Cache", arXiv 2509.00579 (digest: ../shared/research/papers.md §3; code BoJiang03/kvcomp).

Per layer and sequence (B > 1 allowed; the paper's kernels assume B = 1):

    K: BlockQuant  scale = (max - min) * rel_k over a k_block-token block across heads and channels (rel_k = 0.05)
    V: TokenQuant  scale = (max - min) * rel_v over one token across heads and channels (rel_v = 0.1)
       q = round(x / scale) - round(min / scale),  x_hat = (q + round(min / scale)) * scale,  |x - x_hat| <= scale / 2
    Huffman: one canonical length-limited codebook per K and per V of each layer, built from the first quant ints
       compressed (the prefill's when the prompt is longer than the recent buffer), reused for every later block
    layout: K vector = one (token, head) key of D values; V vector = one channel of one head over v_block tokens

The newest tokens stay in full precision (the recent buffers: between ``k_recent`` and ``k_recent + k_block - 1``
keys, likewise values); once a buffer holds a whole block past its recent size, that block is quantized, encoded with
the existing codebook and appended to the stream (the paper's ``cut_tensor`` rule). Decode step (three phases, as the
paper's kernels): ``kvcomp_scores`` decodes the keys and takes q·k̂ for all query heads of a GQA group at once;
softmax over the compressed scores and the recent keys' scores (with the model's mask); ``kvcomp_pv`` decodes the
values and takes p·v̂, plus p·V over the recent values.

Checked against the official code (BoJiang03/kvcomp @ 2d18a51, ``kvcomp_cuda_extension/scripts/kv_com_ctx.py``): one
codebook per ``KVComCtx``, i.e. per layer and K/V, built at its first ``store``; K quantized over [64 tokens, batch,
heads, head_dim] and V over [batch, heads, head_dim] per token (we keep batch elements apart: B > 1); its CUDA context
keeps no fp16 buffer (K_BUFFER_SIZE = V_BUFFER_SIZE = 0), its accuracy simulation 128 / 256 (our defaults; 0 works).

Choices the paper leaves open, made here: the codebook covers the whole
alphabet floor(1/rel) + 2 (counts + 1), so later blocks never need an escape; codes are limited to ``max_len`` bits so
a value decodes with one table lookup instead of the paper's bit-serial tree walk; offsets are one int32 word offset
per group of up to 32 vectors plus a 16-bit bit offset per vector (the paper: uint32 per 64-vector block, uint16 per
vector). Scales and min_ints are kept in fp32 / int32 (the paper: fp16 / int8), a few bytes per block or token.

Options (``policy_options``): rel_k, rel_v, k_block, v_block, k_recent, v_recent, max_len, and ``static`` ("auto"
by default, True, False): a model decoding a StaticCache (what ``model.generate`` after ``specache.compile`` uses
for a static policy, or a gpt-fast-style module writing its cache by position) decodes through fixed-shape state
(policies/kvcomp_static.py: the same streams, recent buffers and attention, lengths on the device, blocks compressed
on the steps that run from Python), so its one-token steps replay as CUDA graphs (decode_graphs.py); True requires
that path (a DynamicCache decode is refused), False never takes it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import kvcomp_ops as ko
from ..kernels import ops
from ..runtime.buffers import Growable
from ..runtime.state import parse_static
from .base import Policy, register_policy
from .kvcomp_static import KVCompState

_DEFAULTS = {"rel_k": 0.05, "rel_v": 0.1, "k_block": 64, "v_block": 128, "k_recent": 128, "v_recent": 256,
             "max_len": 10}
_COMPRESSED = ("k_words", "k_base", "k_rel", "k_scale", "k_min", "k_lut", "k_code", "k_len",
               "v_words", "v_base", "v_rel", "v_scale", "v_min", "v_lut", "v_code", "v_len")


def _bad(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"kvcomp policy: policy_options[{field!r}] expected {expected}, got {value!r}; fix: pass "
                      f"{field}={_DEFAULTS[field]!r} (the paper's setting) or another value in range")


@register_policy
class KVCompPolicy(Policy):
    name = "kvcomp"
    uses_store = False

    def __init__(self, config):
        super().__init__(config)
        opts = dict(config.policy_options)
        static = opts.pop("static", "auto")
        unknown = sorted(set(opts) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"kvcomp policy: unknown policy_options {unknown}; expected some of "
                             f"{sorted([*_DEFAULTS, 'static'])}")
        o = {**_DEFAULTS, **opts}
        for f in ("rel_k", "rel_v"):
            v = o[f]
            # q must fit a uint8 symbol: floor(1/rel) + 2 <= 256
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 / 254 <= v <= 1:
                raise _bad(f, v, "a number in [1/254, 1] (the relative quantization scale)")
        for f in ("k_block", "v_block"):
            v = o[f]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1) or v > 1024:
                raise _bad(f, v, "a power of two in [1, 1024] (tokens per block)")
        for f in ("k_recent", "v_recent"):
            v = o[f]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _bad(f, v, "an int >= 0 (full-precision recent tokens)")
        v = o["max_len"]
        need = max(1, (ko.n_symbols(min(o["rel_k"], o["rel_v"])) - 1).bit_length())
        if isinstance(v, bool) or not isinstance(v, int) or not need <= v <= 16:
            raise _bad("max_len", v, f"an int in [{need}, 16] (2**max_len >= the alphabet of the smaller rel)")
        self.rel_k, self.rel_v = float(o["rel_k"]), float(o["rel_v"])
        self.k_block, self.v_block = o["k_block"], o["v_block"]
        self.k_recent, self.v_recent = o["k_recent"], o["v_recent"]
        self.max_len = v
        parse_static(self, static, [])  # every option of this policy has a static path

    # -- state ----------------------------------------------------------------------------------------------------
    def reset(self, site):
        site.clear_state()
        t, dev = site.tier, site.device
        b, h, d, dv = site.batch, site.heads, site.head_dim, site.v_head_dim
        if dv * self.max_len >= 1 << 16 or d * self.max_len >= 1 << 16:
            raise ValueError(f"kvcomp policy: head dims {d}/{dv} at max_len={self.max_len} overflow the 16-bit vector "
                             "offsets; fix: lower max_len")
        t["nk"] = t["nv"] = 0
        t["gk"] = ko.group_size(d, self.k_block, self.max_len)
        t["gv"] = ko.group_size(self.v_block, dv, self.max_len)
        t["k_words"] = Growable((), (), torch.int32, dev)
        t["k_base"] = Growable((b, h), (), torch.int32, dev)
        t["k_rel"] = Growable((b, h), (), torch.int16, dev)
        t["k_scale"] = Growable((b,), (), torch.float32, dev)
        t["k_min"] = Growable((b,), (), torch.int32, dev)
        t["v_words"] = Growable((), (), torch.int32, dev)
        t["v_base"] = Growable((b, h), (dv // t["gv"],), torch.int32, dev)
        t["v_rel"] = Growable((b, h), (dv,), torch.int16, dev)
        t["v_scale"] = Growable((b,), (), torch.float32, dev)
        t["v_min"] = Growable((b,), (), torch.int32, dev)
        t["k_rec"] = Growable((b, h), (d,), site.dtype, dev, capacity=min(self.k_recent + self.k_block, 1024))
        t["v_rec"] = Growable((b, h), (dv,), site.dtype, dev, capacity=min(self.v_recent + self.v_block, 1024))
        if site.capacity:  # max_seq_len or specache.generate's hint: the metadata is allocated once
            cap = site.capacity
            for name, n in (("k_base", cap // t["gk"]), ("k_rel", cap), ("k_scale", cap // self.k_block),
                            ("k_min", cap // self.k_block), ("v_base", cap // self.v_block),
                            ("v_rel", cap // self.v_block), ("v_scale", cap), ("v_min", cap)):
                t[name].reserve(n)

    @staticmethod
    def _book(t, kind: str, max_len: int) -> ko.Codebook:
        return ko.Codebook(t[f"{kind}_code"], t[f"{kind}_len"], t[f"{kind}_lut"], max_len)

    def _ensure_book(self, t, kind: str, sym: torch.Tensor, rel: float) -> ko.Codebook:
        if f"{kind}_lut" not in t:
            book = ko.build_codebook(sym, ko.n_symbols(rel), self.max_len)
            t[f"{kind}_code"], t[f"{kind}_len"], t[f"{kind}_lut"] = book.code, book.length, book.lut
        return self._book(t, kind, self.max_len)

    def _compress_keys(self, t, k):
        # k: [B, Hkv, T, D], T a multiple of k_block
        b, h, n, d = k.shape
        kb = self.k_block
        q, scale, mn = ko.quantize_ints(k.reshape(b, h, n // kb, kb, d), (1, 3, 4), self.rel_k)
        book = self._ensure_book(t, "k", q, self.rel_k)
        words, base, rel = ko.encode_vectors(q.reshape(-1, d), book, t["gk"], t["k_words"].length)
        t["k_words"].append(words)
        t["k_base"].append(base.view(b, h, n // t["gk"]))
        t["k_rel"].append(rel.view(b, h, n))
        t["k_scale"].append(scale.reshape(b, n // kb))
        t["k_min"].append(mn.reshape(b, n // kb))
        t["nk"] += n

    def _compress_values(self, t, v):
        # v: [B, Hkv, T, Dv], T a multiple of v_block; vectors are channels over v_block tokens (transposed)
        b, h, n, dv = v.shape
        vb, nb = self.v_block, n // self.v_block
        q, scale, mn = ko.quantize_ints(v, (1, 3), self.rel_v)
        book = self._ensure_book(t, "v", q, self.rel_v)
        sym = q.reshape(b, h, nb, vb, dv).transpose(-1, -2).reshape(-1, vb)
        words, base, rel = ko.encode_vectors(sym, book, t["gv"], t["v_words"].length)
        t["v_words"].append(words)
        t["v_base"].append(base.view(b, h, nb, dv // t["gv"]))
        t["v_rel"].append(rel.view(b, h, nb, dv))
        t["v_scale"].append(scale.reshape(b, n))
        t["v_min"].append(mn.reshape(b, n))
        t["nv"] += n

    def append(self, site, k, v, start):
        # k, v: [B, Hkv, Sn, D] on the device, positions [start, start + Sn); the recent buffers hold [nk, start).
        t = site.tier
        end = start + k.shape[2]
        for kind, x, block, recent, fn in (("k", k, self.k_block, self.k_recent, self._compress_keys),
                                           ("v", v, self.v_block, self.v_recent, self._compress_values)):
            n0 = t[f"n{kind}"]
            target = max(n0, (end - recent) // block * block)
            buf: Growable = t[f"{kind}_rec"]
            if target == n0:
                buf.append(x)
                continue
            # Compress whole blocks straight from [recent; new], so the buffer never grows to a prefill's size.
            allx = torch.cat([buf.view(), x], dim=2)
            fn(t, allx[:, :, : target - n0])
            buf.clear()
            buf.append(allx[:, :, target - n0 :])

    # -- decode ---------------------------------------------------------------------------------------------------
    def decode(self, site, q, bias, lo, hi, scale):
        # q: [B, Hq, Sq, D]; attended store positions [lo, hi); bias [.., Sq, hi - lo] or None.
        t = site.tier
        nk, nv = t["nk"], t["nv"]
        b, hq, sq, _ = q.shape
        hkv = site.heads
        rep = hq // hkv
        dv = site.v_head_dim
        if hi <= lo:  # nothing attended: zeros, as reference.sparse_attention
            return q.new_zeros((b, hq, sq, dv))
        parts = []
        if min(nk, hi) > lo:  # compressed keys [lo, min(nk, hi))
            s = ko.kvcomp_scores(q, t["k_words"].view(), t["k_base"].view(), t["k_rel"].view(), t["k_scale"].view(),
                                  t["k_min"].view(), t["k_lut"], t["gk"], self.k_block, self.max_len, scale)
            parts.append(s[..., lo : min(nk, hi)])
        r_lo = max(lo, nk)
        if hi > r_lo:  # recent keys [max(lo, nk), hi)
            parts.append(ops.attention_logits(q, t["k_rec"].view(r_lo - nk, hi - nk), scale))
        logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # [B, Hq, Sq, hi - lo] fp32
        if bias is not None:
            logits = logits + bias
        # softmax that gives a fully masked row zeros instead of NaN (as reference.sparse_attention)
        m = logits.amax(dim=-1, keepdim=True)
        e = torch.exp(logits - torch.where(torch.isinf(m), 0.0, m))
        total = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(total > 0, total, 1.0)
        out = torch.zeros((b, hq, sq, dv), dtype=torch.float32, device=q.device)
        c_hi = min(nv, hi)
        if c_hi > lo:  # compressed values [lo, c_hi): the kernel takes weights for all nv tokens
            pc = torch.nn.functional.pad(p[..., : c_hi - lo], (lo, nv - c_hi))
            out += ko.kvcomp_pv(pc, t["v_words"].view(), t["v_base"].view(), t["v_rel"].view(), t["v_scale"].view(),
                                 t["v_min"].view(), t["v_lut"], t["gv"], self.v_block, self.max_len)
        r_lo = max(lo, nv)
        if hi > r_lo:  # recent values [max(lo, nv), hi)
            pr = p[..., r_lo - lo :].reshape(b, hkv, rep * sq, hi - r_lo)
            vr = t["v_rec"].view(r_lo - nv, hi - nv).float()
            out += (pr @ vr).reshape(b, hq, sq, dv)
        return out.to(q.dtype)

    def decode_static(self, site, q, k_new, v_new, pos, bias, scale, n_real, speculating):
        # the streams and recent buffers at fixed shapes, lengths on the device (policies/kvcomp_static.py); built at
        # a site's first static step from what the prefill left
        if speculating or q.shape[2] != 1:
            from ..runtime.runtime import CacheMismatch  # (runtime.py imports the policies)

            raise CacheMismatch(f"specache: site {site.name}: kvcomp's static decode path takes one-token steps; got "
                                f"{q.shape[2]} query rows (speculating={speculating}). Fix: decode one token a call, "
                                "or pass policy_options={'static': False}")
        if site.static is None:
            site.static = KVCompState(self, site, bias.shape[-1])
        return site.static.step(site, q, k_new, v_new, pos, bias, scale)

    # -- reporting ------------------------------------------------------------------------------------------------
    def site_report(self, site):
        t = site.tier
        if "nk" not in t:
            return {}
        return {"compressed_tokens_k": t["nk"], "compressed_tokens_v": t["nv"], **compression_stats(site)}

    def describe(self):
        return {"policy": self.name, "rel_k": self.rel_k, "rel_v": self.rel_v, "k_block": self.k_block,
                "v_block": self.v_block, "k_recent": self.k_recent, "v_recent": self.v_recent,
                "max_len": self.max_len, "static": self.static}


def _used(x: Any) -> int:
    # bytes in use (not capacity): what the compression ratio counts
    if isinstance(x, Growable):
        v = x.view()
        return v.numel() * v.element_size()
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return 0


def compression_stats(site) -> dict[str, float | int]:
    """KVComp's accounting for one site (``kv_com_ctx.get_cr``): original bytes of the compressed tokens at the
    model's dtype ÷ everything stored for them (streams, offsets, scales, min_ints, codebooks); and the same over
    the whole cache, the full-precision recent buffers included. Bytes in use, not allocated capacity."""
    t = site.tier
    elt = torch.empty((), dtype=site.dtype).element_size()
    rows = site.batch * site.heads
    orig = rows * (t["nk"] * site.head_dim + t["nv"] * site.v_head_dim) * elt
    comp = sum(_used(t[n]) for n in _COMPRESSED if n in t)
    recent = _used(t["k_rec"]) + _used(t["v_rec"])
    total_orig = rows * site.length * (site.head_dim + site.v_head_dim) * elt
    return {"compressed_bytes": comp, "recent_bytes": recent,
            "compression_ratio": orig / comp if comp else 1.0,
            "cache_compression_ratio": total_orig / max(comp + recent, 1)}


def compression_ratio(site) -> float:
    """Original bytes of the compressed tokens ÷ everything stored for them, metadata included (1.0 before any)."""
    return float(compression_stats(site)["compression_ratio"])
