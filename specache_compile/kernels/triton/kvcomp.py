"""KVComp decode kernels: Huffman decode fused with the two GEMVs of decode attention (``kvcomp_ops``).

Stream layout (``kvcomp_ops.encode_vectors``): quantized ints (uint8 symbols) are Huffman-coded with a canonical,
length-limited code (at most ``MAX_LEN`` bits). A *vector* is the unit one lane decodes: for K one (token, head) key of
``D`` values, for V one channel of one head over ``VB`` tokens (the paper's transposed layout, so p·V is a per-lane dot
product). Vectors are bit-packed MSB-first into a stream of 32-bit words; vector ``m`` starts at bit
``base[m // G] * 32 + (rel[m] & 0xFFFF)``: a word offset per group of ``G`` vectors (int32) and a 16-bit offset inside
the group (stored as int16).

Decoding one value of a lane: load the two words around its bit position, take the next ``MAX_LEN`` bits, look them up
in the ``2**MAX_LEN``-entry table ``lut`` (entry = symbol | code length << 8), advance by the length. Every lane of a
program decodes a different vector in lock step (the code lengths differ, the step count does not).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _peek_symbol(words_ptr, lut_ptr, pos, n_words, mask, MAX_LEN: tl.constexpr):
    # pos: [N] int64 bit positions -> (symbol int32, code length int64). Reads 2 words and 1 table entry per lane.
    w = pos >> 5
    hi = tl.load(words_ptr + w, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    lo = tl.load(words_ptr + w + 1, mask=mask & (w + 1 < n_words), other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    # the 64-bit window [w, w+1]; an arithmetic shift keeps the MAX_LEN low bits exact (shift <= 64 - MAX_LEN)
    win = (((hi << 32) | lo) >> (64 - (pos & 31) - MAX_LEN)) & ((1 << MAX_LEN) - 1)
    e = tl.load(lut_ptr + win, mask=mask, other=0).to(tl.int32)
    return e & 255, (e >> 8).to(tl.int64)


@triton.jit
def kvcomp_scores_kernel(
    q_ptr, words_ptr, base_ptr, rel_ptr, scale_ptr, min_ptr, lut_ptr, out_ptr,
    N, D, n_words, softmax_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_bb, stride_bh, stride_bg,
    stride_rb, stride_rh, stride_rn,
    stride_sb, stride_sn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_os, stride_on,
    REP: tl.constexpr, SQ: tl.constexpr, G: tl.constexpr, KB: tl.constexpr, MAX_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # q: [B, Hq, Sq, D]; base: [B, Hkv, N // G] int32 word offsets; rel: [B, Hkv, N] int16 bit offsets;
    # scale, min: [B, N // KB] (one per KB-token block across heads and channels, BlockQuant);
    # out: [B, Hq, Sq, N] fp32 = softmax_scale * q . k_hat, k_hat = (sym + min) * scale.
    # grid (cdiv(N, BLOCK_N), Hkv, B); lane n decodes key n of this head; rows r = (head r // SQ of the group, query
    # r % SQ) share the decoded value (all query heads of a GQA group in one pass over the compressed keys).
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < REP * SQ
    q_rows = q_ptr + b * stride_qb + (kv * REP + rows // SQ) * stride_qh + (rows % SQ) * stride_qs

    base = tl.load(base_ptr + b * stride_bb + kv * stride_bh + (n // G) * stride_bg, mask=mask, other=0)
    rel = tl.load(rel_ptr + b * stride_rb + kv * stride_rh + n * stride_rn, mask=mask, other=0)
    pos = base.to(tl.int64) * 32 + (rel.to(tl.int64) & 0xFFFF)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    qsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Main loop, one value of every lane's key per step: reads 8 stream bytes + 2 table bytes a lane (the stream
    # bytes are the key's ~D * 3 bits once, through L1) and one q column; writes nothing.
    for d in range(D):
        sym, ln = _peek_symbol(words_ptr, lut_ptr, pos, n_words, mask, MAX_LEN)
        pos += ln
        qd = tl.load(q_rows + d * stride_qd, mask=row_mask, other=0.0).to(tl.float32)
        acc += qd[:, None] * sym.to(tl.float32)[None, :]
        qsum += qd
    blk = n // KB
    s = tl.load(scale_ptr + b * stride_sb + blk * stride_sn, mask=mask, other=0.0).to(tl.float32)
    mn = tl.load(min_ptr + b * stride_mb + blk * stride_mn, mask=mask, other=0).to(tl.float32)
    # sum_d q_d (sym_d + min) scale = scale (sum_d q_d sym_d + min sum_d q_d)
    x = (acc + qsum[:, None] * mn[None, :]) * (s * softmax_scale)[None, :]
    o_ptrs = (out_ptr + b * stride_ob + (kv * REP + rows[:, None] // SQ) * stride_oh + (rows[:, None] % SQ) * stride_os
              + n[None, :] * stride_on)
    tl.store(o_ptrs, x, mask=row_mask[:, None] & mask[None, :])


@triton.jit
def kvcomp_pv_kernel(
    p_ptr, words_ptr, base_ptr, rel_ptr, scale_ptr, min_ptr, lut_ptr, part_ptr,
    NVB, DV, n_words, blocks_per_split,
    stride_pb, stride_ph, stride_ps, stride_pn,
    stride_bb, stride_bh, stride_bj, stride_bg,
    stride_rb, stride_rh, stride_rj, stride_rc,
    stride_sb, stride_sn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_os, stride_om,
    REP: tl.constexpr, SQ: tl.constexpr, G: tl.constexpr, VB: tl.constexpr, MAX_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # p: [B, Hq, Sq, NVB * VB] fp32 attention weights of the compressed tokens; base: [B, Hkv, NVB, DV // G] int32;
    # rel: [B, Hkv, NVB, DV] int16; scale, min: [B, NVB * VB] (one per token across heads and channels, TokenQuant);
    # part: [B, Hkv, NS, REP * SQ, DV] fp32 partial sums of p . v_hat over this split's token blocks.
    # grid (NS, Hkv, B). Lane c decodes channel c of each token block (VB tokens) of the split, in token order.
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    c = tl.arange(0, BLOCK_DV)
    mask = c < DV
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < REP * SQ
    p_rows = p_ptr + b * stride_pb + (kv * REP + rows // SQ) * stride_ph + (rows % SQ) * stride_ps
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    j_lo = pid * blocks_per_split
    j_hi = tl.minimum(j_lo + blocks_per_split, NVB)
    for j in range(j_lo, j_hi):
        base = tl.load(base_ptr + b * stride_bb + kv * stride_bh + j * stride_bj + (c // G) * stride_bg, mask=mask,
                       other=0)
        rel = tl.load(rel_ptr + b * stride_rb + kv * stride_rh + j * stride_rj + c * stride_rc, mask=mask, other=0)
        pos = base.to(tl.int64) * 32 + (rel.to(tl.int64) & 0xFFFF)
        # Per token: 8 stream bytes + 2 table bytes a lane, the token's (scale, min) and REP * SQ weights; writes
        # nothing until the end.
        for t in range(VB):
            sym, ln = _peek_symbol(words_ptr, lut_ptr, pos, n_words, mask, MAX_LEN)
            pos += ln
            tok = j * VB + t
            s = tl.load(scale_ptr + b * stride_sb + tok * stride_sn).to(tl.float32)
            mn = tl.load(min_ptr + b * stride_mb + tok * stride_mn).to(tl.float32)
            pt = tl.load(p_rows + tok * stride_pn, mask=row_mask, other=0.0).to(tl.float32)
            v = (sym.to(tl.float32) + mn) * s
            acc += pt[:, None] * v[None, :]
    o_ptrs = part_ptr + b * stride_ob + kv * stride_oh + pid * stride_os + rows[:, None] * stride_om + c[None, :]
    tl.store(o_ptrs, acc, mask=row_mask[:, None] & mask[None, :])


@triton.jit
def _row_starts(idx_ptr, base_ptr, rel_ptr, N, K, stride_ib, stride_ih, stride_ik, stride_bb, stride_bh, stride_bg,
                stride_rb, stride_rh, stride_rn, G: tl.constexpr, BLOCK_K: tl.constexpr):
    # A row program's lanes (grid (cdiv(K, BLOCK_K), H, B)): (b, h, k, k < K, row n = idx[b, h, k], n in [0, N) and
    # k < K, the row's first bit in the stream).
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < K
    n = tl.load(idx_ptr + b * stride_ib + h * stride_ih + k * stride_ik, mask=kmask, other=0).to(tl.int64)
    mask = kmask & (n >= 0) & (n < N)
    base = tl.load(base_ptr + b * stride_bb + h * stride_bh + (n // G) * stride_bg, mask=mask, other=0)
    rel = tl.load(rel_ptr + b * stride_rb + h * stride_rh + n * stride_rn, mask=mask, other=0)
    return b, h, k, kmask, n, mask, base.to(tl.int64) * 32 + (rel.to(tl.int64) & 0xFFFF)


@triton.jit
def kvcomp_gather_rows_kernel(
    idx_ptr, words_ptr, base_ptr, rel_ptr, scale_ptr, min_ptr, lut_ptr, out_ptr,
    N, K, D, n_words,
    stride_ib, stride_ih, stride_ik,
    stride_bb, stride_bh, stride_bg,
    stride_rb, stride_rh, stride_rn,
    stride_sb, stride_sh, stride_sn,
    stride_ob, stride_oh, stride_ok, stride_od,
    G: tl.constexpr, MAX_LEN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # idx: [B, H, K] row positions; rows (token, head) each one vector of D values with their own (scale, min)
    # (VectorQuant): base [B, H, cdiv(N, G)], rel [B, H, N], scale/min [B, H, N]; out: [B, H, K, D] in out's dtype.
    # grid (cdiv(K, BLOCK_K), H, B): lane k decodes row idx[k]. An index outside [0, N) gives a zero row.
    b, h, k, kmask, n, mask, pos = _row_starts(idx_ptr, base_ptr, rel_ptr, N, K, stride_ib, stride_ih, stride_ik,
                                               stride_bb, stride_bh, stride_bg, stride_rb, stride_rh, stride_rn,
                                               G, BLOCK_K)
    s = tl.load(scale_ptr + b * stride_sb + h * stride_sh + n * stride_sn, mask=mask, other=0.0).to(tl.float32)
    # scale and min share one layout (the launcher makes both contiguous)
    mn = tl.load(min_ptr + b * stride_sb + h * stride_sh + n * stride_sn, mask=mask, other=0).to(tl.float32)
    o = out_ptr + b * stride_ob + h * stride_oh + k * stride_ok
    # Per value: 8 stream bytes + 2 table bytes a lane read, one element a lane written.
    for d in range(D):
        sym, ln = _peek_symbol(words_ptr, lut_ptr, pos, n_words, mask, MAX_LEN)
        pos += ln
        x = tl.where(mask, (sym.to(tl.float32) + mn) * s, 0.0)
        tl.store(o + d * stride_od, x.to(out_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def kvcomp_stage_rows_kernel(
    idx_ptr, words_ptr, base_ptr, rel_ptr, scale_ptr, min_ptr,
    swords_ptr, sbase_ptr, srel_ptr, sscale_ptr, smin_ptr,
    N, K, n_words,
    stride_ib, stride_ih, stride_ik,
    stride_bb, stride_bh, stride_bg,
    stride_rb, stride_rh, stride_rn,
    stride_sb, stride_sh, stride_sn,
    G: tl.constexpr, W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Stage rows idx [B, H, K] of a row payload (kvcomp_gather_rows_kernel's layout, typically in pinned host memory
    # read in place) into a dense scratch that kvcomp_gather_rows_kernel decodes with G = 1 and idx = k:
    # swords [B * H * K, W] int32 (row r's words from its first word, zeros after), sbase [B * H * K] = r * W,
    # srel = the row's bit offset in its first word, sscale / smin the row's (scale, min), 0 for a row outside [0, N).
    # grid (cdiv(K, BLOCK_K), H, B). A row's words end where the next row of its (b, h) starts (rows of one compress
    # call are adjacent in the stream); where that is unknown (the last row, the next chunk) all W words are read.
    # Every load is independent of the others, so a row costs one round trip to host memory, not one per value.
    b, h, k, kmask, n, mask, pos = _row_starts(idx_ptr, base_ptr, rel_ptr, N, K, stride_ib, stride_ih, stride_ik,
                                               stride_bb, stride_bh, stride_bg, stride_rb, stride_rh, stride_rn,
                                               G, BLOCK_K)
    nxt_ok = mask & (n + 1 < N)
    nbase = tl.load(base_ptr + b * stride_bb + h * stride_bh + ((n + 1) // G) * stride_bg, mask=nxt_ok, other=0)
    nrel = tl.load(rel_ptr + b * stride_rb + h * stride_rh + (n + 1) * stride_rn, mask=nxt_ok, other=0)
    npos = nbase.to(tl.int64) * 32 + (nrel.to(tl.int64) & 0xFFFF)
    w0 = pos >> 5
    span = (npos + 31) // 32 - w0  # words from the row's first to the one holding the next row's first bit
    span = tl.where(nxt_ok & (span > 0) & (span < W), span + 1, W)
    cols = tl.arange(0, W)
    wmask = mask[:, None] & (cols[None, :] < span[:, None]) & (w0[:, None] + cols[None, :] < n_words)
    vals = tl.load(words_ptr + w0[:, None] + cols[None, :], mask=wmask, other=0)
    r = (b * tl.num_programs(1) + h) * K + k
    tl.store(swords_ptr + r[:, None] * W + cols[None, :], vals, mask=kmask[:, None])
    tl.store(sbase_ptr + r, (r * W).to(tl.int32), mask=kmask)
    tl.store(srel_ptr + r, (pos & 31).to(tl.int16), mask=kmask)
    s = tl.load(scale_ptr + b * stride_sb + h * stride_sh + n * stride_sn, mask=mask, other=0.0)
    mn = tl.load(min_ptr + b * stride_sb + h * stride_sh + n * stride_sn, mask=mask, other=0)
    tl.store(sscale_ptr + r, s, mask=kmask)
    tl.store(smin_ptr + r, mn, mask=kmask)
