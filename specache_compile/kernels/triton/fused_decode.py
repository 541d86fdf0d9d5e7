"""One pass over the low-bit KV copy per layer per decode step: attention, and the next step's ranking.

``reference.fused_decode`` is the contract. Per (batch, KV head) program of a split over the keys (flash-decoding),
each key tile's packed K and V codes and scales are read once, and for all ``REP * SQ`` query rows of the GQA group:

- the low-bit scores ``q · k̂_n`` (kernels/triton/score.py's split ``q · z_g + (q ∘ s_g) · c_n``);
- online-softmax attention over the low-bit tokens not substituted (a bitmap of the fetched positions), then, in
  splits of their own, over the full-precision columns: the fetched rows (source 1) and the window (source 2);
- for the ranking row (``RANK_ROW``): its scores over every low-bit token (substituted ones too, by their low-bit
  score) written as fp32 logits, and the split's softmax statistics over those and the window columns.

:func:`rank_probs_kernel` then folds the splits' statistics into each query head's softmax and averages the GQA
group's probabilities, and a ``torch.topk`` over those gives the step's top-k; for short rows :func:`rank_topk_kernel`
does the same and keeps each block's top-k (kernels/triton/select.py's bitonic sort of probability/position keys),
and the ``torch.topk`` runs over the blocks' candidates. Why the logits go through memory instead of a
per-block top-k inside the pass: the GQA mean weights head ``h`` by ``1 / L_h``, its softmax sum over every split, so
the order of a block's positions is not known until all splits have run (for GQA 1 it would be).

Layout of a tile in registers. The packed codes are read as int32 words (a token's bytes ``4w .. 4w + 3``: code ``c``
of word ``w`` at bit ``c * BITS`` is channel ``w * 32 / BITS + c``), and a tile's columns are ordered as
:func:`_unpack_words` produces them: both 16-bit halves of a word are unpacked by one shift and one and-or, so the two
codes of a pair (``c`` and ``c + 16 / BITS``) sit in adjacent columns. The query, the key scales and the value-group
masks are loaded in that column order; partial outputs are stored back in channel order. Scores and the output are
computed transposed (``[tokens, rows]`` and ``[channels, rows]``) so that the big code tile is always the left operand
of the product, and the row tile is 8 wide at GQA 4 x 2 rows (a tensor-core N of 8: no padding rows).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .score import split_dot_rhs

LOG2E = tl.constexpr(1.4426950408889634)  # a global a @triton.jit function may read must be a tl.constexpr


@triton.jit
def _online_update_t(xt, m_i, l_i):
    # xt: [BLOCK_N, BLOCK_M] log2-domain scores, -inf where masked -> (p, alpha, m_new, l_new), statistics per column
    # (query row). A row with nothing unmasked yet keeps m = -inf; its exponents are taken against 0 so that
    # -inf - -inf never makes a NaN.
    m_new = tl.maximum(m_i, tl.max(xt, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(xt - m_safe[None, :])
    l_new = l_i * alpha + tl.sum(p, axis=0)
    return p, alpha, m_new, l_new


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _unpack_words(x, R: tl.constexpr, NW: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    # x: int32 [R, NW], each word 32 // BITS codes (code c at bit c * BITS) -> the codes [R, NW * 32 // BITS] as DT
    # (bf16 or fp16), exactly, in column order (word w, shift i, half h): column (w * H + i) * 2 + h = code h * H + i
    # of word w (H = 16 // BITS). One shift and one and-or per two codes: both halves of a 32-bit register are
    # unpacked at once, each written into the mantissa of a power of two whose ulp is 1 (bf16 128.0 = 0x4300, fp16
    # 1024.0 = 0x6400), which is then subtracted (exact, two to a register). No int-to-float conversion, no shuffle
    # of registers: a pair's halves are adjacent columns.
    H: tl.constexpr = 16 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    MAGIC: tl.constexpr = 0x4300 if DT == tl.bfloat16 else 0x6400
    BASE: tl.constexpr = 128.0 if DT == tl.bfloat16 else 1024.0
    sh = tl.arange(0, H) * BITS
    t = ((x[:, :, None] >> sh[None, None, :]) & (LEVELS | (LEVELS << 16))) | (MAGIC | (MAGIC << 16))  # [R, NW, H]
    lo = t.to(tl.int16).to(DT, bitcast=True)
    hi = (t >> 16).to(tl.int16).to(DT, bitcast=True)
    return tl.reshape(tl.join(lo, hi) - BASE, [R, NW * H * 2])


@triton.jit
def _word_channels(NW_REAL: tl.constexpr, BLOCK_NW: tl.constexpr, BITS: tl.constexpr):
    # the channel of each column of _unpack_words' tile, and which columns hold real channels
    CPW: tl.constexpr = 32 // BITS
    H: tl.constexpr = 16 // BITS
    c = tl.arange(0, BLOCK_NW * CPW)
    r = c % CPW
    return (c // CPW) * CPW + (r % 2) * H + r // 2, (c // CPW) < NW_REAL


@triton.jit
def _fp_tile(
    qt, acc, m_i, l_i, mr, lr,
    k_base, v_base, p_base, row0, n_rows, lo, W, qk_scale, bias_rows, row_mask, rank_mask,
    dk, dk_mask, dv_ch, dv_mask,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, stride_bw,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, RANKED: tl.constexpr,
    ATTEND: tl.constexpr, QPARTS: tl.constexpr, FP_PARTS: tl.constexpr, CDT: tl.constexpr, EMULATE: tl.constexpr,
):
    # One tile of BLOCK_N full-precision columns (rows row0.. of one source): reads BLOCK_N * (D + DV) elements and
    # BLOCK_N positions (+ the bias rows at those positions). RANKED: the columns also count in the ranking softmax.
    j = row0 + tl.arange(0, BLOCK_N)
    pos = tl.load(p_base + j * stride_pn, mask=j < n_rows, other=-1).to(tl.int64)
    valid = (j < n_rows) & (pos >= lo)
    if HAS_BIAS:
        valid = valid & (pos < lo + W)
    kf = tl.load(k_base + j[:, None] * stride_kn + dk[None, :] * stride_kd,
                 mask=valid[:, None] & dk_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D], columns code-major
    xt = split_dot_rhs(kf, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), QPARTS, CDT, EMULATE) * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_rows + (pos - lo)[:, None] * stride_bw, mask=valid[:, None] & row_mask[None, :],
                       other=0.0)
        xt += bias.to(tl.float32) * LOG2E
    if RANKED:
        xr = tl.where(valid[:, None] & rank_mask[None, :], xt, float("-inf"))
        _, _, mr, lr = _online_update_t(xr, mr, lr)
    if ATTEND:
        x = tl.where(valid[:, None], xt, float("-inf"))
        p, alpha, m_i, l_i = _online_update_t(x, m_i, l_i)
        # masked by valid: a padding row of an uninitialised buffer may hold NaN, and NaN * 0 is NaN
        vt = tl.load(v_base + j[None, :] * stride_vn + dv_ch[:, None] * stride_vd,
                     mask=dv_mask[:, None] & valid[None, :], other=0.0)  # [BLOCK_DV, BLOCK_N]
        acc = split_dot_rhs(vt, p, acc * alpha[None, :], FP_PARTS, CDT, EMULATE)
    return acc, m_i, l_i, mr, lr


@triton.jit
def fused_decode_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr, sub_ptr,
    kf_ptr, vf_ptr, fpos_ptr, kw_ptr, vw_ptr, wpos_ptr, bias_ptr, lim_ptr,
    po_ptr, pm_ptr, pl_ptr, rx_ptr, rm_ptr, rl_ptr,
    lo, hi_q, F, FW, W, qk_scale,
    tile0, n_tiles, tiles_per_split, n_lb_splits, n_f_tiles, n_fp_tiles, fp_tiles_per_split,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kqb, stride_kqh, stride_kqs, stride_kqd,
    stride_ksb, stride_ksh, stride_ksg, stride_ksd,
    stride_vqb, stride_vqh, stride_vqs, stride_vqd,
    stride_vsb, stride_vsh, stride_vss, stride_vsg,
    stride_subb, stride_subh,
    stride_kfb, stride_kfh, stride_kff, stride_kfd,
    stride_vfb, stride_vfh, stride_vff, stride_vfd,
    stride_fpb, stride_fph, stride_fpf,
    stride_kwb, stride_kwh, stride_kwf, stride_kwd,
    stride_vwb, stride_vwh, stride_vwf, stride_vwd,
    stride_wpb, stride_wph, stride_wpf,
    stride_bb, stride_bh, stride_bs, stride_bw,
    stride_pob, stride_poh, stride_pos, stride_pom,
    stride_pmb, stride_pmh, stride_pms,
    stride_rxb, stride_rxh,
    D: tl.constexpr, DV: tl.constexpr, REP: tl.constexpr, SQ: tl.constexpr, RANK_ROW: tl.constexpr,
    GROUP: tl.constexpr, GV: tl.constexpr,
    NGV: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NW: tl.constexpr,
    BLOCK_NWV: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, ATTEND: tl.constexpr,
    PARTS: tl.constexpr, QPARTS: tl.constexpr, FP_PARTS: tl.constexpr, EMULATE: tl.constexpr,
):
    # q: [B, Hq, Sq, D]; kq: [B, Hkv, nq, D*BITS//8] uint8; ks, kz: [B, Hkv, nq//GROUP, D] (same strides);
    # vq: [B, Hkv, nq, DV*BITS//8]; vs, vz: [B, Hkv, nq, NGV] (same strides); sub: [B, Hkv, cdiv(nq, 32)] int32 bitmap
    # of the fetched positions; kf, vf, fpos: the fetched rows [B, Hkv, F, D|DV] and their positions [B, Hkv, F];
    # kw, vw, wpos: the window columns [B, Hkv, FW, D|DV], [B, Hkv, FW]; bias: [B, Hq, Sq, W] (broadcast strides 0)
    # over positions [lo, lo + W); lim: int64 [1], low-bit positions at or past it are not attended or ranked.
    # po: [B, Hkv, NS, REP*SQ, DV] fp32; pm, pl, rm, rl: [B, Hkv, NS, REP*SQ] fp32 (same strides); rx: [B, Hq, n_low]
    # fp32 ranking logits (log2 domain) of positions lo + i.
    # grid (NS, Hkv, B), NS = n_lb_splits + full-precision splits. Program pid < n_lb_splits takes low-bit tiles
    # [tile0 + pid * tiles_per_split, ...) (tile t = positions [t * BLOCK_N, (t + 1) * BLOCK_N), inside one key group),
    # clipped to [lo, min(hi_q, lim)); the others take full-precision tiles: the n_f_tiles tiles of the fetched rows,
    # then the window's. Row r of a tile = query head r // SQ of the GQA group, query r % SQ.
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    CPW: tl.constexpr = 32 // BITS  # codes per int32 word
    BLOCK_DV: tl.constexpr = CPW * BLOCK_NWV
    # The low-bit products: codes are exact in bf16, and the fp32 operand is split into PARTS bf16 terms (score.py's
    # split_dot): bf16 has fp32's range, so no per-tile scaling (a reduction) keeps the terms in range. The
    # interpreter's bf16 bitcasts are wrong: there the codes are unpacked as fp16 (also exact) and widened.
    LB_DT: tl.constexpr = tl.bfloat16
    CODE_DT: tl.constexpr = tl.float16 if EMULATE else tl.bfloat16
    CDT: tl.constexpr = kf_ptr.dtype.element_ty  # the full-precision columns' (and q's) dtype

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < REP * SQ
    rank_mask = row_mask & ((rows % SQ) == RANK_ROW)  # all False when RANK_ROW < 0
    head = kv * REP + rows // SQ
    sq = rows % SQ
    # the columns of a key / value tile in _unpack_words' order: column c holds channel dk[c] / dv_ch[c]
    dk, dk_mask = _word_channels(D * BITS // 32, BLOCK_NW, BITS)
    dv_ch, dv_mask = _word_channels(DV * BITS // 32, BLOCK_NWV, BITS)
    dv_grp = dv_ch // GV  # the value channel group of each column
    nw = tl.arange(0, BLOCK_NW)  # code words of a token
    nw_mask = nw < D * BITS // 32
    nwv = tl.arange(0, BLOCK_NWV)
    nwv_mask = nwv < DV * BITS // 32

    q_ptrs = q_ptr + b * stride_qb + head[None, :] * stride_qh + sq[None, :] * stride_qs + dk[:, None] * stride_qd
    qt = tl.load(q_ptrs, mask=dk_mask[:, None] & row_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_M]
    qts = qt * qk_scale  # the low-bit scores are formed in fp32 from it: log2-domain logits with no multiply a tile
    bias_rows = bias_ptr + b * stride_bb + head[None, :] * stride_bh + sq[None, :] * stride_bs  # [1, BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mr = tl.full([BLOCK_M], float("-inf"), tl.float32)  # the ranking row's statistics (no substitution)
    lr = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DV, BLOCK_M], dtype=tl.float32)

    hi = hi_q
    if HAS_LIMIT:
        hi = tl.minimum(hi, tl.load(lim_ptr).to(tl.int32))

    # ---- low-bit tiles (an empty range for the full-precision programs) ------------------------------------------
    kq_base = kq_ptr.to(tl.pointer_type(tl.int32)) + b * stride_kqb + kv * stride_kqh  # strides in words
    ks_base = ks_ptr + b * stride_ksb + kv * stride_ksh
    kz_base = kz_ptr + b * stride_ksb + kv * stride_ksh
    vq_base = vq_ptr.to(tl.pointer_type(tl.int32)) + b * stride_vqb + kv * stride_vqh
    vs_base = vs_ptr + b * stride_vsb + kv * stride_vsh
    vz_base = vz_ptr + b * stride_vsb + kv * stride_vsh
    sub_base = sub_ptr + b * stride_subb + kv * stride_subh
    rx_rows = rx_ptr + b * stride_rxb + head[None, :] * stride_rxh  # [1, BLOCK_M]
    t_lo = tile0 + pid * tiles_per_split
    t_hi = tl.minimum(tl.minimum(t_lo + tiles_per_split, tile0 + n_tiles), tl.cdiv(hi, BLOCK_N))
    # Per tile, from HBM: BLOCK_N * (D + DV) * BITS / 8 code bytes (as int32 words, once), 2 * BLOCK_N * NGV value
    # scale/zero elements, BLOCK_N / 8 bitmap bytes, 2 * D key scale/zero elements (once per key group: GROUP /
    # BLOCK_N tiles share them) and, with a bias, its REP * SQ * BLOCK_N elements (L2 when the bias broadcasts over
    # heads). E.g. D = DV = 128, 2 bits, GROUP = BLOCK_N = 64, bf16: 4096 + 512 + 8 + 512 = 5128 bytes, 80 a token.
    # Writes, with a ranking row: its REP * BLOCK_N fp32 logits (4 * REP bytes a token).
    for t in range(t_lo, t_hi):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = (n >= lo) & (n < hi)
        g = (t * BLOCK_N) // GROUP
        s = tl.load(ks_base + g * stride_ksg + dk * stride_ksd, mask=dk_mask, other=0.0).to(tl.float32)
        z = tl.load(kz_base + g * stride_ksg + dk * stride_ksd, mask=dk_mask, other=0.0).to(tl.float32)
        kword = tl.load(kq_base + n[:, None] * stride_kqs + nw[None, :] * stride_kqd,
                        mask=in_range[:, None] & nw_mask[None, :], other=0)  # [BLOCK_N, BLOCK_NW]
        kc = _unpack_words(kword, BLOCK_N, BLOCK_NW, BITS, CODE_DT)  # [BLOCK_N, BLOCK_D]
        qz = tl.sum(qts * z[:, None], axis=0)  # [BLOCK_M]
        xt = split_dot_rhs(kc, qts * s[:, None], tl.broadcast_to(qz[None, :], [BLOCK_N, BLOCK_M]), PARTS, LB_DT,
                           EMULATE)  # [BLOCK_N, BLOCK_M], log2 domain
        if HAS_BIAS:
            bias = tl.load(bias_rows + (n - lo)[:, None] * stride_bw, mask=in_range[:, None] & row_mask[None, :],
                           other=0.0)
            xt += bias.to(tl.float32) * LOG2E
        # One softmax maximum for the attention and the ranking: the largest score in range, substituted tokens
        # included. Attention drops those (p = 0) but attends their full-precision rows at about the same score, so
        # a maximum above its own terms loses nothing at fp32 precision; both then share alpha, and a tile costs one
        # max and one (paired) sum across the tile instead of two each.
        x = tl.where(in_range[:, None], xt, float("-inf"))
        if RANK_ROW >= 0:
            tl.store(rx_rows + (n - lo)[:, None], x, mask=in_range[:, None] & rank_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        pr = tl.exp2(x - m_safe[None, :])  # [BLOCK_N, BLOCK_M], 0 out of range
        m_i = m_new
        if not ATTEND:
            lr = lr * alpha + tl.sum(pr, axis=0)
        else:
            # substituted tokens are read like the others (their loads depend on the loop index alone, so they are
            # issued together and pipelined) and dropped through p = 0
            word = tl.load(sub_base + (n >> 5), mask=in_range, other=0)
            p = tl.where((((word >> (n & 31)) & 1) != 0)[:, None], 0.0, pr)
            if RANK_ROW >= 0:
                sp, spr = tl.reduce((p, pr), 0, _add_pair)
                lr = lr * alpha + spr
            else:
                sp = tl.sum(p, axis=0)
            l_i = l_i * alpha + sp
            vword = tl.load(vq_base + n[:, None] * stride_vqs + nwv[None, :] * stride_vqd,
                            mask=in_range[:, None] & nwv_mask[None, :], other=0)  # [BLOCK_N, BLOCK_NWV]
            vc = tl.trans(_unpack_words(vword, BLOCK_N, BLOCK_NWV, BITS, CODE_DT))  # [BLOCK_DV, BLOCK_N]
            acc = acc * alpha[None, :]
            # Channel group gg: acc[group gg] += codes @ (p * vs[:, gg]) + p · vz[:, gg]. The product runs over all
            # columns and keeps group gg's (NGV products of [BLOCK_DV, BLOCK_N] x [BLOCK_N, BLOCK_M]).
            for gg in tl.static_range(NGV):
                vs_g = tl.load(vs_base + n * stride_vss + gg * stride_vsg, mask=in_range, other=0.0).to(tl.float32)
                vz_g = tl.load(vz_base + n * stride_vss + gg * stride_vsg, mask=in_range, other=0.0).to(tl.float32)
                pz = tl.sum(p * vz_g[:, None], axis=0)  # [BLOCK_M]
                pv = split_dot_rhs(vc, p * vs_g[:, None], tl.broadcast_to(pz[None, :], [BLOCK_DV, BLOCK_M]), PARTS,
                                   LB_DT, EMULATE)
                acc += tl.where((dv_grp == gg)[:, None], pv, 0.0)

    # ---- full-precision tiles (an empty range for the low-bit programs): fetched rows, then the window -----------
    is_fp = (pid >= n_lb_splits).to(tl.int32)
    f_lo = (pid - n_lb_splits) * fp_tiles_per_split
    f_hi = f_lo + is_fp * (tl.minimum(f_lo + fp_tiles_per_split, n_fp_tiles) - f_lo)
    if ATTEND:
        kf_base = kf_ptr + b * stride_kfb + kv * stride_kfh
        vf_base = vf_ptr + b * stride_vfb + kv * stride_vfh
        fp_base = fpos_ptr + b * stride_fpb + kv * stride_fph
        for ft in range(tl.maximum(f_lo, 0), tl.minimum(f_hi, n_f_tiles)):
            acc, m_i, l_i, mr, lr = _fp_tile(
                qt, acc, m_i, l_i, mr, lr, kf_base, vf_base, fp_base, ft * BLOCK_N, F, lo, W, qk_scale, bias_rows,
                row_mask, rank_mask, dk, dk_mask, dv_ch, dv_mask,
                stride_kff, stride_kfd, stride_vff, stride_vfd, stride_fpf, stride_bw,
                BLOCK_N, BLOCK_M, HAS_BIAS, False, ATTEND, QPARTS, FP_PARTS, CDT, EMULATE,
            )
    kw_base = kw_ptr + b * stride_kwb + kv * stride_kwh
    vw_base = vw_ptr + b * stride_vwb + kv * stride_vwh
    wp_base = wpos_ptr + b * stride_wpb + kv * stride_wph
    for ft in range(tl.maximum(f_lo, n_f_tiles), f_hi):
        acc, m_i, l_i, mr, lr = _fp_tile(
            qt, acc, m_i, l_i, mr, lr, kw_base, vw_base, wp_base, (ft - n_f_tiles) * BLOCK_N, FW, lo, W, qk_scale,
            bias_rows, row_mask, rank_mask, dk, dk_mask, dv_ch, dv_mask,
            stride_kwf, stride_kwd, stride_vwf, stride_vwd, stride_wpf, stride_bw,
            BLOCK_N, BLOCK_M, HAS_BIAS, RANK_ROW >= 0, ATTEND, QPARTS, FP_PARTS, CDT, EMULATE,
        )

    # Writes REP * SQ * (DV + 4) fp32: the unnormalised output (back in channel order), its log2 max and sum, and the
    # ranking statistics.
    pm = b * stride_pmb + kv * stride_pmh + pid * stride_pms + rows
    if ATTEND:
        po = po_ptr + b * stride_pob + kv * stride_poh + pid * stride_pos
        tl.store(po + rows[None, :] * stride_pom + dv_ch[:, None], acc, mask=dv_mask[:, None] & row_mask[None, :])
        tl.store(pm_ptr + pm, m_i, mask=row_mask)
        tl.store(pl_ptr + pm, l_i, mask=row_mask)
    if RANK_ROW >= 0:
        # a low-bit program's ranking maximum is its softmax maximum (see the tile loop)
        tl.store(rm_ptr + pm, tl.where(pid < n_lb_splits, m_i, mr), mask=rank_mask)
        tl.store(rl_ptr + pm, lr, mask=rank_mask)


@triton.jit
def _group_mean_prob(
    rx_ptr, rm_ptr, rl_ptr, lim_ptr, b, kv, offs, n_low, lo, NS,
    stride_rxb, stride_rxh, stride_rmb, stride_rmh, stride_rms,
    REP: tl.constexpr, SQ: tl.constexpr, RANK_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
):
    # -> (prob, valid): the mean over the GQA group of each position's probability under its query head's softmax
    # (the splits' statistics folded into one maximum and sum), and which of offs are positions to rank.
    # Reads REP * (BLOCK_N + 2 * NS) fp32.
    valid = offs < n_low
    if HAS_LIMIT:
        valid = valid & (offs + lo < tl.load(lim_ptr))
    sp = tl.arange(0, BLOCK_S)
    s_mask = sp < NS
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r in range(REP):
        st = b * stride_rmb + kv * stride_rmh + sp * stride_rms + r * SQ + RANK_ROW
        m = tl.load(rm_ptr + st, mask=s_mask, other=float("-inf"))
        lsum = tl.load(rl_ptr + st, mask=s_mask, other=0.0)
        m_all = tl.max(m, axis=0)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        l_all = tl.sum(lsum * tl.exp2(tl.where(m == float("-inf"), m_safe, m) - m_safe), axis=0)
        inv = tl.where(l_all > 0, 1.0 / l_all, 0.0)
        x = tl.load(rx_ptr + b * stride_rxb + (kv * REP + r) * stride_rxh + offs, mask=valid, other=float("-inf"))
        acc += tl.exp2(x - m_safe) * inv
    return acc / REP, valid


@triton.jit
def rank_probs_kernel(
    rx_ptr, rm_ptr, rl_ptr, lim_ptr, prob_ptr,
    n_low, lo, NS,
    stride_rxb, stride_rxh,
    stride_rmb, stride_rmh, stride_rms,
    stride_pb, stride_ph,
    REP: tl.constexpr, SQ: tl.constexpr, RANK_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
):
    # rx: the ranking logits [B, Hq, n_low] (log2 domain; positions lo + i); rm, rl: the splits' ranking statistics
    # [B, Hkv, NS, REP*SQ]; prob: [B, Hkv, n_low] fp32, the mean probability over the GQA group of each position (0
    # past the limit). grid (cdiv(n_low, BLOCK_N), Hkv, B). The top-k over prob is torch.topk's (a radix select that
    # spreads a long row over many blocks): a bitonic sort of every block's keys here cost more than the pass itself
    # at long contexts.
    pid_n = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    prob, valid = _group_mean_prob(rx_ptr, rm_ptr, rl_ptr, lim_ptr, b, kv, offs, n_low, lo, NS,
                                   stride_rxb, stride_rxh, stride_rmb, stride_rmh, stride_rms,
                                   REP, SQ, RANK_ROW, BLOCK_N, BLOCK_S, HAS_LIMIT)
    # Writes BLOCK_N fp32.
    tl.store(prob_ptr + b * stride_pb + kv * stride_ph + offs, tl.where(valid, prob, 0.0), mask=offs < n_low)


@triton.jit
def rank_topk_kernel(
    rx_ptr, rm_ptr, rl_ptr, lim_ptr, cand_val_ptr, cand_idx_ptr,
    n_low, lo, NS,
    stride_rxb, stride_rxh,
    stride_rmb, stride_rmh, stride_rms,
    REP: tl.constexpr, SQ: tl.constexpr, RANK_ROW: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    # rx: the ranking logits [B, Hq, n_low] (log2 domain; positions lo + i); rm, rl: the splits' ranking statistics
    # [B, Hkv, NS, REP*SQ]; cand_val, cand_idx: [B, Hkv, nblocks, K]. grid (nblocks, Hkv, B): block i of BLOCK_N
    # positions. Writes the block's K best (mean probability over the GQA group, absolute position); probability 0
    # and position -1 past its valid positions and for positions of zero probability.
    pid_n = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    prob, valid = _group_mean_prob(rx_ptr, rm_ptr, rl_ptr, lim_ptr, b, kv, offs, n_low, lo, NS,
                                   stride_rxb, stride_rxh, stride_rmb, stride_rmh, stride_rms,
                                   REP, SQ, RANK_ROW, BLOCK_N, BLOCK_S, HAS_LIMIT)
    # Writes 2 * K values.
    bits = prob.to(tl.int32, bitcast=True).to(tl.int64)  # >= 0: ordered like the probabilities
    key = tl.where(valid & (prob > 0), (bits << 32) | offs.to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    keep = tl.arange(0, BLOCK_N) < K
    top_val = tl.where(key >= 0, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    top_idx = tl.where(key >= 0, (key & 0xFFFFFFFF) + lo, -1)
    out = ((b * tl.num_programs(1) + kv) * tl.num_programs(0) + pid_n) * K + tl.arange(0, BLOCK_N)
    tl.store(cand_val_ptr + out, top_val, mask=keep)
    tl.store(cand_idx_ptr + out, top_idx, mask=keep)
