"""Flash-decoding over the low-bit KV copy with full-precision columns substituted in (``lowbit_decode_attention``).

Two kernels. ``lowbit_decode_split_kernel``: every program owns a contiguous range of low-bit tiles (split-K) or of
full-precision column tiles (the last programs), keeps the running (max, sum, output) of its rows in registers and
writes them as one partial; ``merge_splits_kernel`` combines the partials of a row by log-sum-exp. Scores live in the
log2 domain (``exp2``; ``qk_scale = softmax_scale * log2(e)``), partial maxima too.

In-kernel dequantization, never materialised (see score.py for the key side and for ``split_dot``): the value of token
``n``, channel ``d`` in channel group ``j = d // GV`` is ``vz[n, j] + vs[n, j] * c[n, d]``, so

    Σ_n p_n v̂_nd = Σ_n p_n vz[n, j] + Σ_n (p_n vs[n, j]) c_nd

a row reduction per channel group plus a product of the scaled probabilities with the codes, one product per channel
group (``NGV = Dv / GV`` of them, each kept for its group's channels).

Substitution: a low-bit position listed in ``fp_pos`` is skipped (its full-precision column counts instead).
``substitution_bitmap_kernel`` turns ``fp_pos`` into one bit per low-bit position before the split kernel runs (one
program per (batch, KV head): zero the row, barrier, atomic OR); a tile reads ``BLOCK_N / 8`` bytes of it. Chosen over
a binary search in a sorted ``fp_pos`` (``log2 F`` dependent loads per token, and a sortedness contract on the caller)
and over a byte map built by torch ops (three launches, 8x the bytes).

Precision as in score.py: the low-bit products run in fp16 on power-of-two-scaled operands (``PARTS`` terms), the
full-precision columns in their own dtype (``q`` and ``k_fp`` exact, ``p`` in ``FP_PARTS`` terms).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .score import pow2_scale, round_to, split_dot, split_dot_rhs, unpack_codes_2d

LOG2E = tl.constexpr(1.4426950408889634)  # a global a @triton.jit function may read must be a tl.constexpr


@triton.jit
def substitution_bitmap_kernel(
    pos_ptr, map_ptr,
    NQ, F, NW,
    stride_pb, stride_ph, stride_pf,
    stride_mb, stride_mh,
    BLOCK_W: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # pos: [B, Hkv, F] int (any values; those outside [0, NQ) are not low-bit positions); map: [B, Hkv, NW] int32,
    # NW = cdiv(NQ, 32): bit p % 32 of word p // 32 is set iff p is listed. grid (Hkv, B).
    # Reads F positions, writes NW words (then F atomic ORs into them).
    kv = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    base = map_ptr + b * stride_mb + kv * stride_mh
    for w0 in range(0, NW, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        tl.store(base + w, tl.zeros([BLOCK_W], dtype=tl.int32), mask=w < NW)
    tl.debug_barrier()  # the zeros are visible to every thread of the program before any bit is set
    for f0 in range(0, F, BLOCK_F):
        j = f0 + tl.arange(0, BLOCK_F)
        p = tl.load(pos_ptr + b * stride_pb + kv * stride_ph + j * stride_pf, mask=j < F, other=-1).to(tl.int64)
        mask = (j < F) & (p >= 0) & (p < NQ)
        bit = tl.full([BLOCK_F], 1, tl.int32) << (p % 32).to(tl.int32)
        tl.atomic_or(base + p // 32, bit, mask=mask)  # atomic: two positions may share a word


@triton.jit
def _online_update(x, m_i, l_i):
    # x: [BLOCK_M, BLOCK_N] log2-domain scores, -inf where masked -> (p, alpha, m_new, l_new). A row with nothing
    # unmasked yet keeps m = -inf; its exponents are taken against 0 so that -inf - -inf never makes a NaN.
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(x - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@triton.jit
def lowbit_decode_split_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr, sub_ptr,
    kf_ptr, vf_ptr, pos_ptr, bias_ptr,
    po_ptr, pm_ptr, pl_ptr,
    lo, hi_q, F, W, D, DV, qk_scale,
    tile0, n_tiles, tiles_per_split, n_lb_splits, n_fp_tiles, fp_tiles_per_split,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kqb, stride_kqh, stride_kqs, stride_kqd,
    stride_ksb, stride_ksh, stride_ksg, stride_ksd,
    stride_kzb, stride_kzh, stride_kzg, stride_kzd,
    stride_vqb, stride_vqh, stride_vqs, stride_vqd,
    stride_vsb, stride_vsh, stride_vss, stride_vsg,
    stride_vzb, stride_vzh, stride_vzs, stride_vzg,
    stride_subb, stride_subh,
    stride_kfb, stride_kfh, stride_kff, stride_kfd,
    stride_vfb, stride_vfh, stride_vff, stride_vfd,
    stride_fpb, stride_fph, stride_fpf,
    stride_bb, stride_bh, stride_bs, stride_bw,
    stride_pob, stride_poh, stride_pos, stride_pom,
    stride_pmb, stride_pmh, stride_pms,
    REP: tl.constexpr, SQ: tl.constexpr, GROUP: tl.constexpr, GV: tl.constexpr, NGV: tl.constexpr,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_NGV: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTS: tl.constexpr, QPARTS: tl.constexpr, FP_PARTS: tl.constexpr, EMULATE: tl.constexpr,
):
    # q: [B, Hq, Sq, D]; kq: [B, Hkv, nq, D*BITS//8] uint8; ks, kz: [B, Hkv, nq//GROUP, D];
    # vq: [B, Hkv, nq, DV*BITS//8]; vs, vz: [B, Hkv, nq, NGV]; sub: [B, Hkv, cdiv(nq, 32)] int32 bitmap;
    # kf: [B, Hkv, F, D]; vf: [B, Hkv, F, DV]; pos: [B, Hkv, F] int; bias: [B, Hq, Sq, W] (broadcast strides 0);
    # po: [B, Hkv, NS, REP*SQ, DV] fp32; pm, pl: [B, Hkv, NS, REP*SQ] fp32.
    # grid (NS, Hkv, B), NS = n_lb_splits + fp splits. Program `pid < n_lb_splits` takes low-bit tiles
    # [tile0 + pid * tiles_per_split, ...) (tile t = positions [t * BLOCK_N, (t + 1) * BLOCK_N), inside one key group),
    # clipped to [lo, hi_q); the others take full-precision column tiles. Rows as in score.py: r = head r // SQ of the
    # GQA group, query r % SQ, so each KV tile is read once for the REP * SQ rows.
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    PER: tl.constexpr = 8 // BITS
    LB_DT: tl.constexpr = tl.float16  # the low-bit products: codes are exact in fp16 (operands pow2-scaled)
    CDT: tl.constexpr = kf_ptr.dtype.element_ty  # the full-precision columns' (and q's) dtype

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < REP * SQ
    head = kv * REP + rows // SQ
    sq = rows % SQ
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + sq[:, None] * stride_qs + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    dv_group = dv // GV  # value channel group of each output channel
    jg = tl.arange(0, BLOCK_NGV)
    jk = tl.arange(0, BLOCK_D // PER)  # key code bytes of a token
    jv = tl.arange(0, BLOCK_DV // PER)  # value code bytes of a token

    bias_rows = bias_ptr + b * stride_bb + head[:, None] * stride_bh + sq[:, None] * stride_bs  # [BLOCK_M, 1]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # ---- low-bit tiles (an empty range for the full-precision programs) ------------------------------------------
    kq_base = kq_ptr + b * stride_kqb + kv * stride_kqh
    ks_base = ks_ptr + b * stride_ksb + kv * stride_ksh
    kz_base = kz_ptr + b * stride_kzb + kv * stride_kzh
    vq_base = vq_ptr + b * stride_vqb + kv * stride_vqh
    vs_base = vs_ptr + b * stride_vsb + kv * stride_vsh
    vz_base = vz_ptr + b * stride_vzb + kv * stride_vzh
    sub_base = sub_ptr + b * stride_subb + kv * stride_subh
    t_lo = tile0 + pid * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tile0 + n_tiles)
    # Per tile: reads BLOCK_N * (D + DV) * BITS / 8 code bytes, 2 * BLOCK_N * NGV value scale/zero elements, BLOCK_N / 8
    # substitution-bitmap bytes, 2 * D key scale/zero elements (HBM once per key group, GROUP / BLOCK_N tiles share
    # them) and, with a bias, REP * SQ * BLOCK_N bias elements (L2 when the bias broadcasts over heads). E.g.
    # D = DV = 128, 2 bits, GROUP = 64, bf16, BLOCK_N = 64: 4096 + 512 + 8 + 512 = 5128 bytes, 80 a token. Writes
    # nothing.
    for t in range(t_lo, t_hi):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = (n >= lo) & (n < hi_q)
        word = tl.load(sub_base + (n >> 5), mask=in_range, other=0)
        valid = in_range & (((word >> (n & 31)) & 1) == 0)

        # The loads below are masked by in_range only, not by the substitution bits: their addresses then depend on
        # the loop index alone, so they are issued together and pipelined across iterations. Substituted tokens are
        # read (finite, low-bit data) and dropped through x = -inf, p = 0.
        g = (t * BLOCK_N) // GROUP
        s = tl.load(ks_base + g * stride_ksg + d * stride_ksd, mask=d_mask, other=0.0).to(tl.float32)
        z = tl.load(kz_base + g * stride_kzg + d * stride_kzd, mask=d_mask, other=0.0).to(tl.float32)
        kbyte = tl.load(kq_base + n[:, None] * stride_kqs + jk[None, :] * stride_kqd,
                        mask=in_range[:, None] & (jk < D // PER)[None, :], other=0)
        kc = unpack_codes_2d(kbyte, BITS)  # [BLOCK_N, BLOCK_D]: the key codes, token-major as stored
        qz = tl.sum(q * z[None, :], axis=1)
        qs = q * s[None, :]
        # scores transposed, [BLOCK_N, BLOCK_M] = codes @ (q * s)^T: the big code tile is the left operand as it lies
        # in registers (no transpose of it), the small query tile is the one transposed
        if PARTS == 0:
            xt = split_dot_rhs(kc, tl.trans(qs), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PARTS, LB_DT,
                               EMULATE)
            x = tl.trans(xt)
        else:
            r_scale, r_inv = pow2_scale(tl.max(tl.abs(qs), axis=1), 14)
            xt = split_dot_rhs(kc, tl.trans(qs * r_scale[:, None]), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32),
                               PARTS, LB_DT, EMULATE)
            x = tl.trans(xt) * r_inv[:, None]
        x = (qz[:, None] + x) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_rows + (n - lo)[None, :] * stride_bw, mask=row_mask[:, None] & in_range[None, :],
                           other=0.0)
            x += bias.to(tl.float32) * LOG2E
        x = tl.where(valid[None, :], x, float("-inf"))
        p, alpha, m_i, l_i = _online_update(x, m_i, l_i)

        tok_mask = in_range[:, None] & (jg < NGV)[None, :]  # [BLOCK_N, NGV]
        vs = tl.load(vs_base + n[:, None] * stride_vss + jg[None, :] * stride_vsg, mask=tok_mask, other=0.0)
        vz = tl.load(vz_base + n[:, None] * stride_vzs + jg[None, :] * stride_vzg, mask=tok_mask, other=0.0)
        vs = vs.to(tl.float32)
        vz = vz.to(tl.float32)
        vbyte = tl.load(vq_base + n[:, None] * stride_vqs + jv[None, :] * stride_vqd,
                        mask=in_range[:, None] & (jv < DV // PER)[None, :], other=0)
        vc = unpack_codes_2d(vbyte, BITS)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None]
        if PARTS != 0:
            v_scale, v_inv = pow2_scale(tl.max(tl.max(tl.abs(vs), axis=1), axis=0), 14)
        # Channel group j: acc[:, group j] += p @ vz[:, j] + (p * vs[:, j]) @ codes[:, group j]. The product runs over
        # all channels and keeps group j's (NGV products of [BLOCK_M, BLOCK_N] x [BLOCK_N, BLOCK_DV]: cheap next to the
        # unpacking, and every operand stays 2-D).
        for jj in tl.static_range(NGV):
            vs_j = tl.sum(tl.where((jg == jj)[None, :], vs, 0.0), axis=1)  # [BLOCK_N]
            vz_j = tl.sum(tl.where((jg == jj)[None, :], vz, 0.0), axis=1)
            pz = tl.sum(p * vz_j[None, :], axis=1)  # [BLOCK_M]
            zero = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            if PARTS == 0:
                pv = split_dot(p * vs_j[None, :], vc, zero, PARTS, LB_DT, EMULATE)
            else:
                pv = split_dot(p * (vs_j * v_scale)[None, :], vc, zero, PARTS, LB_DT, EMULATE) * v_inv
            acc += tl.where((dv_group == jj)[None, :], pv + pz[:, None], 0.0)

    # ---- full-precision column tiles (an empty range for the low-bit programs) -----------------------------------
    kf_base = kf_ptr + b * stride_kfb + kv * stride_kfh
    vf_base = vf_ptr + b * stride_vfb + kv * stride_vfh
    fp_base = pos_ptr + b * stride_fpb + kv * stride_fph
    is_fp = (pid >= n_lb_splits).to(tl.int32)
    f_lo = (pid - n_lb_splits) * fp_tiles_per_split
    f_hi = f_lo + is_fp * (tl.minimum(f_lo + fp_tiles_per_split, n_fp_tiles) - f_lo)
    # Per tile: reads BLOCK_N * (D + DV) elements of the columns and BLOCK_N positions (+ the bias as above).
    for ft in range(f_lo, f_hi):
        j = ft * BLOCK_N + tl.arange(0, BLOCK_N)
        pos = tl.load(fp_base + j * stride_fpf, mask=j < F, other=-1).to(tl.int64)
        valid = (j < F) & (pos >= lo)
        if HAS_BIAS:
            valid = valid & (pos < lo + W)
        kt = tl.load(kf_base + j[None, :] * stride_kff + d[:, None] * stride_kfd,
                     mask=d_mask[:, None] & valid[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        x = split_dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), QPARTS, CDT, EMULATE) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_rows + (pos - lo)[None, :] * stride_bw, mask=row_mask[:, None] & valid[None, :],
                           other=0.0)
            x += bias.to(tl.float32) * LOG2E
        x = tl.where(valid[None, :], x, float("-inf"))
        p, alpha, m_i, l_i = _online_update(x, m_i, l_i)
        # masked by valid: a padding row of an uninitialised buffer may hold NaN, and NaN * 0 is NaN
        vt = tl.load(vf_base + j[:, None] * stride_vff + dv[None, :] * stride_vfd,
                     mask=valid[:, None] & dv_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
        acc = split_dot(p, vt, acc * alpha[:, None], FP_PARTS, CDT, EMULATE)

    # Writes REP * SQ * (DV + 2) fp32: the unnormalised output, its log2 max and its sum.
    po = po_ptr + b * stride_pob + kv * stride_poh + pid * stride_pos
    tl.store(po + rows[:, None] * stride_pom + dv[None, :], acc, mask=row_mask[:, None] & dv_mask[None, :])
    pm = b * stride_pmb + kv * stride_pmh + pid * stride_pms + rows
    tl.store(pm_ptr + pm, m_i, mask=row_mask)
    tl.store(pl_ptr + pm, l_i, mask=row_mask)


@triton.jit
def merge_splits_kernel(
    po_ptr, pm_ptr, pl_ptr, out_ptr,
    NS, DV,
    stride_pob, stride_poh, stride_pos, stride_pom,
    stride_pmb, stride_pmh, stride_pms,
    stride_ob, stride_oh, stride_os, stride_od,
    REP: tl.constexpr, SQ: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # po, pm, pl: the split kernel's partials; out: [B, Hq, Sq, DV] in q's dtype.
    # grid (REP * SQ, Hkv, B): one program per output row. Lane i of a BLOCK_S chunk merges splits i, i + BLOCK_S, ...
    # online; the lanes are merged at the end. A row no split attended to (sum 0) is written as zeros.
    r = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < DV
    po = po_ptr + b * stride_pob + kv * stride_poh + r * stride_pom
    pm = b * stride_pmb + kv * stride_pmh + r

    m_v = tl.full([BLOCK_S], float("-inf"), tl.float32)
    l_v = tl.zeros([BLOCK_S], dtype=tl.float32)
    o_v = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
    # Reads NS * (DV + 2) fp32, writes DV elements.
    for s0 in range(0, NS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < NS
        m = tl.load(pm_ptr + pm + s * stride_pms, mask=s_mask, other=float("-inf"))
        l_s = tl.load(pl_ptr + pm + s * stride_pms, mask=s_mask, other=0.0)
        o = tl.load(po + s[:, None] * stride_pos + dv[None, :], mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
        m_new = tl.maximum(m_v, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp2(m_v - m_safe)
        a_new = tl.exp2(m - m_safe)
        l_v = l_v * a_old + l_s * a_new
        o_v = o_v * a_old[:, None] + o * a_new[:, None]
        m_v = m_new
    m_all = tl.max(m_v, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp2(m_v - m_all)
    l_all = tl.sum(l_v * w, axis=0)
    o_all = tl.sum(o_v * w[:, None], axis=0)
    out = tl.where(l_all > 0, o_all / tl.where(l_all > 0, l_all, 1.0), 0.0)
    head = kv * REP + r // SQ
    o_ptrs = out_ptr + b * stride_ob + head * stride_oh + (r % SQ) * stride_os + dv * stride_od
    tl.store(o_ptrs, round_to(out, out_ptr.dtype.element_ty), mask=dv_mask)
