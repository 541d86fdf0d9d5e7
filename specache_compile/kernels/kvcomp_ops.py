"""KVComp's codec and its decode-attention ops (Jiang et al., arXiv 2509.00579; digest: shared/research/papers.md §3).

Stage 1, error-bounded quantization (:func:`quantize_ints`): over a reduction region (K: a block of ``KB`` tokens
across all heads and channels, BlockQuant; V: one token across heads and channels, TokenQuant; rows: one (token, head),
VectorQuant) ``scale = (max - min) * rel``, ``min_int = round(min / scale)``, ``q = round(x / scale) - min_int``,
``x_hat = (q + min_int) * scale``, so ``|x - x_hat| <= scale / 2``. q takes at most ``floor(1/rel) + 2`` values (the
alphabet, :func:`n_symbols`), stored as uint8 symbols.

Stage 2, Huffman coding (:func:`build_codebook`, :func:`encode_vectors`): a canonical code limited to ``max_len`` bits,
so that decoding a value is one lookup in a ``2**max_len``-entry table (entry = symbol | length << 8, int16). Every
symbol of the alphabet gets a code (counts + 1), so data quantized after the codebook was built always encodes: no
escape code is needed. Vectors (see kernels/triton/kvcomp.py for the layout) are bit-packed MSB-first into int32 words;
per group of ``G`` vectors one int32 word offset (groups start on a word), per vector a 16-bit offset in its group.
Encoding runs in torch, vectorised (one host sync per call: the stream's length); decoding runs in Triton (CUDA) or in
the pure-torch references here (CPU, and the tests' oracle).

Ops (``torch.library.triton_op`` + ``wrap_triton`` with a fake and a CPU kernel; ``custom_op`` over the reference
without Triton):

- ``specache::kvcomp_scores``: ``softmax_scale * q · k_hatᵀ`` over the compressed keys, fp32 ``[B, Hq, Sq, N]``.
- ``specache::kvcomp_pv``: ``p · v_hat`` over the compressed values (transposed layout), fp32 ``[B, Hq, Sq, Dv]``.
- ``specache::kvcomp_gather_rows``: rows ``idx [B, H, K]`` of a row-addressable payload (:func:`compress_rows`),
  decompressed: ``[B, H, K, D]``.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from dataclasses import dataclass

import torch

try:
    import triton
    from torch.library import wrap_triton

    from .triton.kvcomp import (
        kvcomp_gather_rows_kernel,
        kvcomp_pv_kernel,
        kvcomp_scores_kernel,
        kvcomp_stage_rows_kernel,
    )

    HAS_TRITON = True
except ImportError:  # keep `import specache` working without Triton: the reference ops below
    HAS_TRITON = False

MAX_GROUP = 32  # vectors per word offset: 16-bit in-group offsets need (G - 1) * VL * max_len < 2**16
_SCORE_BLOCK_N = 64  # keys per program of the scores kernel (one lane each)
_ROWS_BLOCK_K = 32
_PV_PROGRAMS_PER_SM = 4


# ----------------------------------------------------------------------------------------------------------------------
# stage 1: error-bounded quantization
# ----------------------------------------------------------------------------------------------------------------------


def n_symbols(rel: float) -> int:
    """Alphabet size of the quant ints for relative scale ``rel``: q in [0, floor(1/rel) + 1]."""
    return int(math.floor(1.0 / rel + 1e-9)) + 2


def quantize_ints(
    x: torch.Tensor, dims: tuple[int, ...], rel: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float -> (q uint8 like x, scale fp32, min_int int32), the last two reduced over ``dims`` (kept as size 1).

    The scale has a floor of ``absmax * 2**-16`` (a constant block would otherwise divide by 0 and its min_int
    overflow); the bound ``|x - x_hat| <= scale / 2`` holds with the stored scale either way.
    """
    xf = x.float()
    mn = xf.amin(dim=dims, keepdim=True)
    mx = xf.amax(dim=dims, keepdim=True)
    absmax = torch.maximum(mn.abs(), mx.abs())
    scale = torch.maximum((mx - mn) * rel, absmax * 2.0**-16).clamp_min(1e-30)
    min_int = torch.round(mn / scale)
    q = (torch.round(xf / scale) - min_int).clamp_(0, n_symbols(rel) - 1)
    return q.to(torch.uint8), scale, min_int.to(torch.int32)


def dequantize_ints(q: torch.Tensor, scale: torch.Tensor, min_int: torch.Tensor) -> torch.Tensor:
    """(q + min_int) * scale in fp32 (scale and min_int broadcast against q)."""
    return (q.float() + min_int.float()) * scale.float()


# ----------------------------------------------------------------------------------------------------------------------
# stage 2: the Huffman codebook
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Codebook:
    """A canonical, length-limited prefix code over symbols [0, n). code/length: [n] int64 (device); lut:
    [2**max_len] int16, entry = symbol | length << 8 for every max_len-bit window starting with the symbol's code."""

    code: torch.Tensor
    length: torch.Tensor
    lut: torch.Tensor
    max_len: int

    @property
    def nbytes(self) -> int:
        # what the decoder needs on the device: the table (and the encoder's code/length, n entries each)
        return sum(t.numel() * t.element_size() for t in (self.code, self.length, self.lut))


def _huffman_lengths(counts: list[int], max_len: int) -> list[int]:
    n = len(counts)
    if n == 1:
        return [1]
    heap = [(c, i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = [0] * n
    tie = n
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    if max(lengths) <= max_len:
        return lengths
    # Length limiting (the JPEG-style heuristic, close to package-merge for the short alphabets here): clamp, then
    # lengthen the least costly symbols (longest code below the limit, rarest first) until Kraft's sum is <= 1.
    lengths = [min(x, max_len) for x in lengths]
    kraft = sum(1 << (max_len - x) for x in lengths)
    while kraft > 1 << max_len:
        cand = [i for i in range(n) if lengths[i] < max_len]
        i = max(cand, key=lambda s: (lengths[s], -counts[s]))
        kraft -= 1 << (max_len - lengths[i] - 1)
        lengths[i] += 1
    return lengths


def build_codebook(symbols: torch.Tensor, n_sym: int, max_len: int) -> Codebook:
    """The codebook of the symbols' histogram (plus one per symbol, so every symbol of the alphabet is encodable).

    NOTE: a host sync (the histogram comes to the host for the tree): once per site and K/V, when its first block is
    compressed.
    """
    if not 1 <= n_sym <= 256 or (1 << max_len) < n_sym or max_len > 16:
        raise ValueError(f"build_codebook: expected 1 <= n_sym <= 256 symbols and n_sym <= 2**max_len, max_len <= 16, "
                         f"got n_sym={n_sym}, max_len={max_len}; fix: raise max_len or rel")
    dev = symbols.device
    counts = torch.bincount(symbols.reshape(-1).long(), minlength=n_sym)[:n_sym].cpu() + 1
    lengths = _huffman_lengths(counts.tolist(), max_len)
    order = sorted(range(n_sym), key=lambda s: (lengths[s], s))
    codes = [0] * n_sym
    code, prev = 0, lengths[order[0]]
    lut = torch.zeros(1 << max_len, dtype=torch.int16)
    for s in order:
        code <<= lengths[s] - prev
        prev = lengths[s]
        codes[s] = code
        lo = code << (max_len - lengths[s])
        lut[lo : lo + (1 << (max_len - lengths[s]))] = s | (lengths[s] << 8)
        code += 1
    return Codebook(torch.tensor(codes, dtype=torch.int64, device=dev),
                    torch.tensor(lengths, dtype=torch.int64, device=dev), lut.to(dev), max_len)


def group_size(vec_len: int, n_vectors_per_run: int, max_len: int) -> int:
    """Vectors per word offset: the largest power of two <= MAX_GROUP dividing ``n_vectors_per_run`` whose in-group
    bit offsets fit 16 bits at the worst case (every value a max_len-bit code)."""
    g = MAX_GROUP
    while g > 1 and ((g - 1) * vec_len * max_len >= 1 << 16 or n_vectors_per_run % g):
        g //= 2
    if vec_len * max_len >= 1 << 16:
        raise ValueError(f"kvcomp: a vector of {vec_len} values at up to {max_len} bits each does not fit the 16-bit "
                         "offsets; fix: lower max_len or the block size")
    return g


def encode_vectors(sym: torch.Tensor, book: Codebook, group: int, word0: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sym: [M, VL] uint8 symbols, M a multiple of ``group`` -> (words int32 [W], base int32 [M // group], rel int16
    [M]): vector m starts at bit ``base[m // group] * 32 + (rel[m] & 0xFFFF)`` of the stream whose first ``word0``
    words are already written (base counts from the stream's start).

    NOTE: one host sync, for W (the stream's length).
    """
    m, vl = sym.shape
    assert m % group == 0, (m, group)
    dev = sym.device
    s = sym.long()
    lens = book.length[s]  # [M, VL]
    codes = book.code[s]
    vbits = lens.sum(1)  # [M]
    gbits = vbits.view(m // group, group)
    rel = torch.cumsum(gbits, 1) - gbits  # in-group start of each vector
    gwords = (gbits.sum(1) + 31) // 32
    gstart = torch.cumsum(gwords, 0) - gwords  # word offset of each group in this chunk
    n_words = int(gwords.sum())  # NOTE: the host sync
    start = gstart.repeat_interleave(group) * 32 + rel.reshape(-1)  # [M] first bit of each vector in the chunk
    pos = start[:, None] + torch.cumsum(lens, 1) - lens  # [M, VL] first bit of each code
    # A code of l <= 16 bits at bit p touches words p // 32 and p // 32 + 1: place it in a 64-bit window and add both
    # halves (codes never overlap, so the sum is the OR).
    sh = 64 - (pos & 31) - lens
    win = codes << sh  # may wrap the sign bit: the halves below are taken as unsigned
    hi = (win >> 32) & 0xFFFFFFFF
    lo = win & 0xFFFFFFFF
    w = (pos >> 5).reshape(-1)
    acc = torch.zeros(n_words + 1, dtype=torch.int64, device=dev)
    acc.index_add_(0, w, hi.reshape(-1))
    acc.index_add_(0, w + 1, lo.reshape(-1))
    acc = acc[:n_words]
    words = torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)
    rel16 = rel.reshape(-1)
    rel16 = torch.where(rel16 >= 1 << 15, rel16 - (1 << 16), rel16).to(torch.int16)
    return words, (gstart + word0).to(torch.int32), rel16


def vector_starts(base: torch.Tensor, rel: torch.Tensor, group: int) -> torch.Tensor:
    """First bit of each vector: base [..., M // group] int32, rel [..., M] int16 -> [..., M] int64."""
    return base.long().repeat_interleave(group, dim=-1) * 32 + (rel.long() & 0xFFFF)


def decode_vectors(words: torch.Tensor, start: torch.Tensor, vec_len: int, lut: torch.Tensor, max_len: int
                   ) -> torch.Tensor:
    """Reference decoder: start [...] int64 first bits -> symbols [..., vec_len] int64 (what the kernels do, lane by
    lane, one value per step)."""
    w64 = torch.cat([words.long() & 0xFFFFFFFF, words.new_zeros(1, dtype=torch.int64)])
    lut = lut.long()
    pos = start.long().clone()
    out = torch.empty((*start.shape, vec_len), dtype=torch.int64, device=start.device)
    mask = (1 << max_len) - 1
    for i in range(vec_len):
        w = pos >> 5
        win = (((w64[w] << 32) | w64[w + 1]) >> (64 - (pos & 31) - max_len)) & mask
        e = lut[win]
        out[..., i] = e & 255
        pos += e >> 8
    return out


# ----------------------------------------------------------------------------------------------------------------------
# row-addressable payloads (the host copy of a store, compressed): one vector per (token, head) row
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RowPayload:
    """Rows of x [B, H, N, D] compressed one (token, head) row at a time (VectorQuant: own scale and min_int), so any
    row decompresses alone. words: [W] int32; base: [B, H, Np // G] int32; rel: [B, H, Np] int16 (Np = N padded to G);
    scale: [B, H, N] fp32; min_int: [B, H, N] int32."""

    words: torch.Tensor
    base: torch.Tensor
    rel: torch.Tensor
    scale: torch.Tensor
    min_int: torch.Tensor
    book: Codebook
    group: int
    shape: tuple[int, int, int, int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        ts = (self.words, self.base, self.rel, self.scale, self.min_int)
        return sum(t.numel() * t.element_size() for t in ts) + self.book.nbytes

    def compression_ratio(self) -> float:
        b, h, n, d = self.shape
        return b * h * n * d * torch.empty((), dtype=self.dtype).element_size() / max(self.nbytes, 1)


def compress_rows(x: torch.Tensor, rel: float = 0.1, max_len: int = 10, book: Codebook | None = None,
                  word0: int = 0) -> RowPayload:
    """x: [B, H, N, D] -> a RowPayload (codebook built from x's quant ints unless ``book`` is given; pass the
    codebook of earlier rows to append: symbols it never saw still encode). ``word0``: words already in the stream
    these rows will follow (base offsets count from the stream's start), for a caller that keeps the stream in a
    growing buffer; :func:`append_rows` does it for a payload."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"compress_rows: expected a float tensor [B, H, N, D], got {tuple(x.shape)} {x.dtype}; "
                         "fix: pass one K or V tensor of a store")
    b, h, n, d = x.shape
    q, scale, min_int = quantize_ints(x, (3,), rel)
    g = group_size(d, MAX_GROUP, max_len)
    npad = -(-n // g) * g
    if book is None:
        book = build_codebook(q, n_symbols(rel), max_len)
    qp = torch.nn.functional.pad(q, (0, 0, 0, npad - n)) if npad != n else q
    words, base, rel16 = encode_vectors(qp.reshape(-1, d), book, g, word0)
    return RowPayload(words, base.view(b, h, npad // g), rel16.view(b, h, npad), scale[..., 0].contiguous(),
                      min_int[..., 0].contiguous(), book, g, (b, h, n, d), x.dtype)


def append_rows(p: RowPayload, x: torch.Tensor, rel: float = 0.1) -> RowPayload:
    """p's rows followed by x [B, H, Nn, D] (encoded with p's codebook, quantized with ``rel``): a new payload.
    Copies p's tensors (torch.cat); a store that grows should keep them in Growables and call compress_rows with
    ``book`` and ``word0``."""
    b, h, n, d = p.shape
    if n % p.group or tuple(x.shape[:2]) != (b, h) or x.shape[3] != d:
        raise ValueError(f"append_rows: expected a payload of whole offset groups (N % {p.group} == 0) and x "
                         f"[{b}, {h}, Nn, {d}], got N={n} and x {tuple(x.shape)}; fix: append in multiples of "
                         f"{p.group} rows (the last, partial append may be any size)")
    new = compress_rows(x, rel, p.book.max_len, p.book, p.words.numel())
    return RowPayload(torch.cat([p.words, new.words]), torch.cat([p.base, new.base], 2),
                      torch.cat([p.rel, new.rel], 2), torch.cat([p.scale, new.scale], 2),
                      torch.cat([p.min_int, new.min_int], 2), p.book, p.group, (b, h, n + x.shape[2], d), p.dtype)


def gather_decompress_reference(p: RowPayload, idx: torch.Tensor) -> torch.Tensor:
    b, h, n, d = p.shape
    valid = (idx >= 0) & (idx < n)
    i = idx.long().clamp(0, max(n - 1, 0))
    start = torch.gather(vector_starts(p.base, p.rel, p.group), 2, i)
    sym = decode_vectors(p.words, start, d, p.book.lut, p.book.max_len)
    s = torch.gather(p.scale, 2, i)[..., None]
    m = torch.gather(p.min_int, 2, i)[..., None]
    out = dequantize_ints(sym, s, m)
    return torch.where(valid[..., None], out, 0.0).to(p.dtype)


def gather_decompress(p: RowPayload, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, H, K] of the payload, decompressed: [B, H, K, D] in the payload's dtype (zero rows for indices
    outside [0, N)). On CUDA one Triton kernel (kvcomp_gather_rows); elsewhere the reference."""
    return kvcomp_gather_rows(idx, p.words, p.base, p.rel, p.scale, p.min_int, p.book.lut, p.group, p.book.max_len,
                              p.shape[3], p.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# references of the decode ops
# ----------------------------------------------------------------------------------------------------------------------


def decompress_keys(words, base, rel, scale, min_int, lut, group: int, block: int, max_len: int, d: int
                    ) -> torch.Tensor:
    """Compressed keys -> fp32 [B, Hkv, N, D] (base [B, Hkv, N // G], rel [B, Hkv, N], scale/min [B, N // block])."""
    sym = decode_vectors(words, vector_starts(base, rel, group), d, lut, max_len)  # [B, Hkv, N, D]
    s = scale.repeat_interleave(block, 1)[:, None, :, None]
    m = min_int.repeat_interleave(block, 1)[:, None, :, None]
    return dequantize_ints(sym, s, m)


def decompress_values(words, base, rel, scale, min_int, lut, group: int, block: int, max_len: int) -> torch.Tensor:
    """Compressed values -> fp32 [B, Hkv, NVB * block, Dv] (base [B, Hkv, NVB, Dv // G], rel [B, Hkv, NVB, Dv],
    scale/min [B, NVB * block]); the stream holds channel vectors of ``block`` tokens."""
    b, hkv, nvb, dv = rel.shape
    sym = decode_vectors(words, vector_starts(base, rel, group), block, lut, max_len)  # [B, Hkv, NVB, Dv, VB]
    sym = sym.transpose(-1, -2).reshape(b, hkv, nvb * block, dv)
    return dequantize_ints(sym, scale[:, None, :, None], min_int[:, None, :, None])


def kvcomp_scores_reference(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale):
    b, hq, sq, d = q.shape
    hkv, n = rel.shape[1], rel.shape[2]
    k = decompress_keys(words, base, rel, scale, min_int, lut, group, block, max_len, d)
    qg = q.float().reshape(b, hkv, (hq // hkv) * sq, d)
    return (softmax_scale * (qg @ k.transpose(-1, -2))).reshape(b, hq, sq, n)


def kvcomp_pv_reference(p, words, base, rel, scale, min_int, lut, group, block, max_len):
    b, hq, sq, n = p.shape
    hkv = rel.shape[1]
    v = decompress_values(words, base, rel, scale, min_int, lut, group, block, max_len)
    pg = p.float().reshape(b, hkv, (hq // hkv) * sq, n)
    return (pg @ v).reshape(b, hq, sq, v.shape[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Triton launchers (CUDA; CPU tensors only under TRITON_INTERPRET=1, as the tests run them)
# ----------------------------------------------------------------------------------------------------------------------


def _kernel_ok(*ts: torch.Tensor) -> bool:
    return HAS_TRITON and all(t.device.type == "cuda" for t in ts)


def _num_sms(x: torch.Tensor) -> int:
    if not x.is_cuda:
        return 4
    return torch.cuda.get_device_properties(x.device).multi_processor_count


def _check_gqa(hq: int, hkv: int, op: str) -> int:
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"{op}: expected query heads a multiple of KV heads, got Hq={hq}, Hkv={hkv}; fix: pass the "
                         "compressed cache of this layer")
    return hq // hkv


def _kvcomp_scores_triton(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale):
    # q: [B, Hq, Sq, D] any strides; the compressed keys as decompress_keys takes them
    b, hq, sq, d = q.shape
    hkv, n = rel.shape[1], rel.shape[2]
    rep = _check_gqa(hq, hkv, "kvcomp_scores")
    out = torch.empty((b, hq, sq, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    wrap_triton(kvcomp_scores_kernel)[(triton.cdiv(n, _SCORE_BLOCK_N), hkv, b)](
        q, words, base, rel, scale, min_int, lut, out,
        n, d, words.numel(), float(softmax_scale),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        base.stride(0), base.stride(1), base.stride(2),
        rel.stride(0), rel.stride(1), rel.stride(2),
        scale.stride(0), scale.stride(1),
        min_int.stride(0), min_int.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        REP=rep, SQ=sq, G=group, KB=block, MAX_LEN=max_len,
        BLOCK_M=triton.next_power_of_2(rep * sq), BLOCK_N=_SCORE_BLOCK_N, num_warps=2,
    )
    return out


def _kvcomp_pv_triton(p, words, base, rel, scale, min_int, lut, group, block, max_len):
    # p: [B, Hq, Sq, NVB * block] fp32; the compressed values as decompress_values takes them
    b, hq, sq, n = p.shape
    hkv, nvb, dv = rel.shape[1], rel.shape[2], rel.shape[3]
    rep = _check_gqa(hq, hkv, "kvcomp_pv")
    if nvb == 0:
        return torch.zeros((b, hq, sq, dv), dtype=torch.float32, device=p.device)
    # one token block per program unless that overfills the GPU: then a few blocks per program (partials stay small)
    per = max(1, triton.cdiv(nvb * hkv * b, _PV_PROGRAMS_PER_SM * _num_sms(p)))
    ns = triton.cdiv(nvb, per)
    part = torch.empty((b, hkv, ns, rep * sq, dv), dtype=torch.float32, device=p.device)
    wrap_triton(kvcomp_pv_kernel)[(ns, hkv, b)](
        p, words, base, rel, scale, min_int, lut, part,
        nvb, dv, words.numel(), per,
        p.stride(0), p.stride(1), p.stride(2), p.stride(3),
        base.stride(0), base.stride(1), base.stride(2), base.stride(3),
        rel.stride(0), rel.stride(1), rel.stride(2), rel.stride(3),
        scale.stride(0), scale.stride(1),
        min_int.stride(0), min_int.stride(1),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        REP=rep, SQ=sq, G=group, VB=block, MAX_LEN=max_len,
        BLOCK_M=triton.next_power_of_2(rep * sq), BLOCK_DV=triton.next_power_of_2(dv), num_warps=4,
    )
    return part.sum(2).reshape(b, hq, sq, dv)


def _kvcomp_gather_rows_triton(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype):
    b, h, k = idx.shape
    n = scale.shape[2]
    out = torch.empty((b, h, k, d), dtype=dtype, device=idx.device)
    if out.numel() == 0:
        return out
    scale, min_int = scale.contiguous(), min_int.contiguous()
    _launch_gather_rows(wrap_triton(kvcomp_gather_rows_kernel), idx, words, words.numel(), base, rel, scale, min_int,
                        lut, out, n, group, max_len)
    return out


def _launch_gather_rows(kernel, idx, words, n_words, base, rel, scale, min_int, lut, out, n, group, max_len):
    """kvcomp_gather_rows_kernel (``kernel``: itself, or wrap_triton'd where a graph may trace it) over out's rows."""
    b, h, k, d = out.shape
    kernel[(triton.cdiv(k, _ROWS_BLOCK_K), h, b)](
        idx, words, base, rel, scale, min_int, lut, out,
        n, k, d, n_words,
        idx.stride(0), idx.stride(1), idx.stride(2),
        base.stride(0), base.stride(1), base.stride(2),
        rel.stride(0), rel.stride(1), rel.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        G=group, MAX_LEN=max_len, BLOCK_K=_ROWS_BLOCK_K, num_warps=1,
    )


def stage_words(d: int, max_len: int) -> int:
    """Scratch words per row of :func:`gather_rows_into` (a power of two): a row's worst case, every value a
    max_len-bit code starting at bit 31 of its first word, plus the word the decoder peeks past it."""
    return triton.next_power_of_2(-(-(31 + d * max_len) // 32) + 1) if HAS_TRITON else 0


def gather_rows_into(out: torch.Tensor, idx: torch.Tensor, words: torch.Tensor, n_words: int, base: torch.Tensor,
                     rel: torch.Tensor, scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int,
                     max_len: int) -> torch.Tensor:
    """``out [B, H, K, D] = rows idx [B, H, K]`` of a row payload (:func:`compress_rows`'s layout, any strides) whose
    tensors may live in pinned host memory: the compressed host copy of runtime/host_codec.py. Zero rows for indices
    outside [0, N). ``n_words``: the stream's written length (``words`` may be a larger buffer).

    Not a torch.library op: like quant_ops.gather_rows it moves data between memories and runs only inside the
    runtime. On CUDA two kernels, on the current stream, with no host sync: ``kvcomp_stage_rows`` copies each row's
    compressed words (and its base, offset, scale, min) into a device scratch, reading pinned host memory in place
    (one independent load per word: a row costs one trip over the bus, and only its compressed bytes cross), then
    ``kvcomp_gather_rows`` decodes the scratch (G = 1, idx = k). The caller keeps the host tensors alive and unwritten
    until the kernels ran (runtime/host_codec.py: its buffers only grow, and growth waits for the device). Elsewhere
    (no CUDA ``out``, or a payload in pageable host memory, which a kernel cannot read) the reference, on the
    payload's device, copied into ``out``.
    """
    # a kernel reads device memory or pinned host memory in place
    if not (HAS_TRITON and out.is_cuda and all(t.is_cuda or t.is_pinned() for t in (words, base, rel, scale, min_int))):
        b, h, _, d = out.shape
        book = Codebook(lut.new_zeros(0, dtype=torch.int64), lut.new_zeros(0, dtype=torch.int64), lut.to(words.device),
                        max_len)
        p = RowPayload(words[:n_words], base, rel, scale, min_int, book, group, (b, h, scale.shape[2], d), out.dtype)
        return out.copy_(gather_decompress_reference(p, idx.to(words.device)))
    return _gather_rows_into_triton(out, idx, words, n_words, base, rel, scale, min_int, lut, group, max_len)


def _gather_rows_into_triton(out, idx, words, n_words, base, rel, scale, min_int, lut, group, max_len):
    b, h, k, d = out.shape
    n = scale.shape[2]
    if scale.stride() != min_int.stride():
        raise ValueError(f"gather_rows_into: expected scale and min_int laid out alike, got strides {scale.stride()} "
                         f"and {min_int.stride()}; fix: keep them in buffers of one shape")
    if k == 0 or out.numel() == 0:
        return out
    from .quant_ops import _HostPointer

    w = stage_words(d, max_len)
    if b * h * k * w >= 2**31:
        raise ValueError(f"gather_rows_into: expected B*H*K*{w} < 2**31 scratch words, got B={b} H={h} K={k}; fix: "
                         "fetch fewer rows per call")
    dev = out.device
    idx = idx.to(dev, non_blocking=True)
    swords = torch.empty(b * h * k * w, dtype=torch.int32, device=dev)
    sbase = torch.empty((b, h, k), dtype=torch.int32, device=dev)
    srel = torch.empty((b, h, k), dtype=torch.int16, device=dev)
    sscale = torch.empty((b, h, k), dtype=scale.dtype, device=dev)
    smin = torch.empty((b, h, k), dtype=min_int.dtype, device=dev)

    def ptr(t: torch.Tensor):
        return t if t.device == dev else _HostPointer(t)  # pinned host memory, read in place (UVA)

    grid = (triton.cdiv(k, _ROWS_BLOCK_K), h, b)
    # (a CPU ``out`` only under TRITON_INTERPRET=1, as the tests run it)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kvcomp_stage_rows_kernel[grid](
            idx, ptr(words), ptr(base), ptr(rel), ptr(scale), ptr(min_int), swords, sbase, srel, sscale, smin,
            n, k, n_words,
            idx.stride(0), idx.stride(1), idx.stride(2),
            base.stride(0), base.stride(1), base.stride(2),
            rel.stride(0), rel.stride(1), rel.stride(2),
            scale.stride(0), scale.stride(1), scale.stride(2),
            G=group, W=w, BLOCK_K=_ROWS_BLOCK_K, num_warps=4,
        )
        ar = torch.arange(k, device=dev).expand(b, h, k)
        _launch_gather_rows(kvcomp_gather_rows_kernel, ar, swords, swords.numel(), sbase, srel, sscale, smin,
                            lut.to(dev, non_blocking=True), out, k, 1, max_len)
    return out


def _gather_rows_reference(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype):
    b, h, n = scale.shape
    book = Codebook(lut.new_zeros(0, dtype=torch.int64), lut.new_zeros(0, dtype=torch.int64), lut, max_len)
    p = RowPayload(words, base, rel, scale, min_int, book, group, (b, h, n, d), dtype)
    return gather_decompress_reference(p, idx)


# ----------------------------------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Opaque reference ops for the triton_ops' non-CUDA branch (as quant_ops does): traced, the reference would be
    # decomposed by AOTAutograd; opaque, it runs as written.
    @torch.library.custom_op("specache::kvcomp_scores_ref", mutates_args=())
    def _kvcomp_scores_ref(q: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                           scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int,
                           max_len: int, softmax_scale: float) -> torch.Tensor:
        return kvcomp_scores_reference(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale)

    @torch.library.custom_op("specache::kvcomp_pv_ref", mutates_args=())
    def _kvcomp_pv_ref(p: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                       scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int,
                       max_len: int) -> torch.Tensor:
        return kvcomp_pv_reference(p, words, base, rel, scale, min_int, lut, group, block, max_len)

    @torch.library.custom_op("specache::kvcomp_gather_rows_ref", mutates_args=())
    def _kvcomp_gather_rows_ref(idx: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                                scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int,
                                max_len: int, d: int, dtype: torch.dtype) -> torch.Tensor:
        return _gather_rows_reference(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype)

    @torch.library.triton_op("specache::kvcomp_scores", mutates_args=())
    def kvcomp_scores(q: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                      scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int,
                      max_len: int, softmax_scale: float) -> torch.Tensor:
        if not _kernel_ok(q, words):
            return _kvcomp_scores_ref(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale)
        return _kvcomp_scores_triton(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale)

    @torch.library.triton_op("specache::kvcomp_pv", mutates_args=())
    def kvcomp_pv(p: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, scale: torch.Tensor,
                  min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int, max_len: int) -> torch.Tensor:
        if not _kernel_ok(p, words):
            return _kvcomp_pv_ref(p, words, base, rel, scale, min_int, lut, group, block, max_len)
        return _kvcomp_pv_triton(p, words, base, rel, scale, min_int, lut, group, block, max_len)

    @torch.library.triton_op("specache::kvcomp_gather_rows", mutates_args=())
    def kvcomp_gather_rows(idx: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                           scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, max_len: int,
                           d: int, dtype: torch.dtype) -> torch.Tensor:
        if not _kernel_ok(idx, words):
            return _kvcomp_gather_rows_ref(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype)
        return _kvcomp_gather_rows_triton(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype)

    @kvcomp_scores.register_kernel("cpu")
    def _(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale):
        return kvcomp_scores_reference(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale)

    @kvcomp_pv.register_kernel("cpu")
    def _(p, words, base, rel, scale, min_int, lut, group, block, max_len):
        return kvcomp_pv_reference(p, words, base, rel, scale, min_int, lut, group, block, max_len)

    @kvcomp_gather_rows.register_kernel("cpu")
    def _(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype):
        return _gather_rows_reference(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype)

else:

    @torch.library.custom_op("specache::kvcomp_scores", mutates_args=())
    def kvcomp_scores(q: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                      scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int,
                      max_len: int, softmax_scale: float) -> torch.Tensor:
        return kvcomp_scores_reference(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale)

    @torch.library.custom_op("specache::kvcomp_pv", mutates_args=())
    def kvcomp_pv(p: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor, scale: torch.Tensor,
                  min_int: torch.Tensor, lut: torch.Tensor, group: int, block: int, max_len: int) -> torch.Tensor:
        return kvcomp_pv_reference(p, words, base, rel, scale, min_int, lut, group, block, max_len)

    @torch.library.custom_op("specache::kvcomp_gather_rows", mutates_args=())
    def kvcomp_gather_rows(idx: torch.Tensor, words: torch.Tensor, base: torch.Tensor, rel: torch.Tensor,
                           scale: torch.Tensor, min_int: torch.Tensor, lut: torch.Tensor, group: int, max_len: int,
                           d: int, dtype: torch.dtype) -> torch.Tensor:
        return _gather_rows_reference(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype)


def _scores_fake(q, words, base, rel, scale, min_int, lut, group, block, max_len, softmax_scale):
    return q.new_empty((*q.shape[:3], rel.shape[2]), dtype=torch.float32)


def _pv_fake(p, words, base, rel, scale, min_int, lut, group, block, max_len):
    return p.new_empty((*p.shape[:3], rel.shape[3]), dtype=torch.float32)


def _rows_fake(idx, words, base, rel, scale, min_int, lut, group, max_len, d, dtype):
    return idx.new_empty((*idx.shape, d), dtype=dtype)


kvcomp_scores.register_fake(_scores_fake)
kvcomp_pv.register_fake(_pv_fake)
kvcomp_gather_rows.register_fake(_rows_fake)
if HAS_TRITON:
    _kvcomp_scores_ref.register_fake(_scores_fake)
    _kvcomp_pv_ref.register_fake(_pv_fake)
    _kvcomp_gather_rows_ref.register_fake(_rows_fake)
