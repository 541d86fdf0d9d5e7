"""Low-bit key scores: ``reference.lowbit_scores`` read straight from the packed KIVI codes.

Per key group ``g`` (``GROUP`` tokens sharing one scale ``s_g`` and zero ``z_g`` per channel) the dot product splits as

    q · k̂_n = q · (z_g + s_g ∘ c_n) = Σ_d q_d z_gd + Σ_d (q_d s_gd) c_nd

so a tile of tokens inside one group needs one row reduction ``q · z_g`` and one matrix product of ``q ∘ s_g`` with the
integer codes: the dequantized keys never exist, in memory or in registers.

Precision. Codes are small integers, exact in fp16, so the tensor-core product ``(q ∘ s) · c`` is as exact as its other
operand. :func:`split_dot` writes that fp32 operand as a sum of ``PARTS`` fp16 terms (each the rounding of what the
previous ones left) and accumulates one product per term in fp32. Before the rounding, :func:`pow2_scale` multiplies
each row by a power of two that puts its largest element in [2^14, 2^15): fp16's range can then neither overflow nor
flush the row's large terms, and the scaling itself is exact. bf16 inputs use one fp16 term: ``q ∘ s`` (16 significant
bits) is rounded to 11, a relative error of at most 2^-12 per product, 8x below what rounding the dequantized key to
bf16 (the eager computation) costs. fp16 inputs use two terms (their 22-bit products are then exact). fp32 inputs use
``PARTS == 0``: one IEEE fp32 product (FMA units, no tensor cores).

``EMULATE`` (Triton's interpreter only): the interpreter's ``tl.dot`` multiplies bf16 tensors as their raw uint16
bits, so there each bf16 term is widened back to fp32 and multiplied in IEEE fp32. Products of two bf16 (or fp16)
values are exact in fp32, so this computes what the tensor core does (up to the order of the fp32 sums).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_dot(a, b, acc, PARTS: tl.constexpr, DT: tl.constexpr, EMULATE: tl.constexpr):
    # a: fp32 [.., M, K]; b: [.., K, N] whose values are exact in DT (codes, or DT data); acc: fp32 [.., M, N].
    # acc + a @ b with a written as a sum of PARTS DT terms (each the rounding of what the previous ones left).
    if PARTS == 0:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        if EMULATE:
            bd = b.to(tl.float32)  # b's values are exact in DT (and the interpreter casts ints to bf16 as raw bits)
        else:
            bd = b.to(DT)
        r = a
        for _ in tl.static_range(PARTS):
            h = r.to(DT)
            if EMULATE:
                acc = tl.dot(h.to(tl.float32), bd, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, bd, acc)
            r = r - h.to(tl.float32)
    return acc


@triton.jit
def split_dot_rhs(b, a, acc, PARTS: tl.constexpr, DT: tl.constexpr, EMULATE: tl.constexpr):
    # split_dot with the operands the other way round: acc + b @ a, b exact in DT (codes) on the left, a fp32 split.
    if PARTS == 0:
        acc = tl.dot(b.to(tl.float32), a, acc, input_precision="ieee")
    else:
        if EMULATE:
            bd = b.to(tl.float32)
        else:
            bd = b.to(DT)
        r = a
        for _ in tl.static_range(PARTS):
            h = r.to(DT)
            if EMULATE:
                acc = tl.dot(bd, h.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(bd, h, acc)
            r = r - h.to(tl.float32)
    return acc


@triton.jit
def pow2_scale(absmax, TARGET: tl.constexpr):
    # absmax: fp32 >= 0 (any shape) -> (scale, inverse), powers of two with absmax * scale in [2^TARGET, 2^(TARGET+1));
    # (1, 1) where absmax is 0 or subnormal. Built from the exponent bits: exact, no division, no log.
    e = (absmax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of absmax
    se = tl.minimum(tl.maximum(254 + TARGET - e, 1), 254)
    si = tl.minimum(tl.maximum(e - TARGET, 1), 254)
    scale = tl.where(e == 0, 1.0, (se << 23).to(tl.float32, bitcast=True))
    inv = tl.where(e == 0, 1.0, (si << 23).to(tl.float32, bitcast=True))
    return scale, inv


@triton.jit
def round_to(x, DT: tl.constexpr):
    # x: float32 -> the nearest DT value (ties to even, as torch's .to), as DT. bf16 is rounded by hand (torch's
    # round_to_nearest_even bit trick) because the interpreter truncates on that cast; the result is then exact in
    # bf16, so the final cast is exact everywhere. Finite inputs only (NaN is never produced here).
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def unpack_codes_2d(byte, BITS: tl.constexpr):
    # byte: uint8 [R, NB] -> int32 codes [R, NB * 8 // BITS]; code i of byte j is channel j * PER + i, at bit i * BITS
    PER: tl.constexpr = 8 // BITS
    shift = tl.arange(0, PER) * BITS
    codes = (byte.to(tl.int32)[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (byte.shape[0], byte.shape[1] * PER))


@triton.jit
def load_key_codes_t(kq_ptr, n, n_mask, stride_kqs, stride_kqd, D, BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    # kq_ptr: this (b, kv head)'s packed keys; n: [BLOCK_N] token positions -> codes [BLOCK_D, BLOCK_N] as int32,
    # zero past D or where ~n_mask. Loads whole bytes (BLOCK_N rows of D * BITS / 8 contiguous bytes) and unpacks them.
    PER: tl.constexpr = 8 // BITS
    j = tl.arange(0, BLOCK_D // PER)
    mask = n_mask[:, None] & (j < D // PER)[None, :]
    byte = tl.load(kq_ptr + n[:, None] * stride_kqs + j[None, :] * stride_kqd, mask=mask, other=0)
    return tl.trans(unpack_codes_2d(byte, BITS))


@triton.jit
def lowbit_scores_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, out_ptr,
    S, D, softmax_scale, n_tiles, tiles_per_prog,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kqb, stride_kqh, stride_kqs, stride_kqd,
    stride_ksb, stride_ksh, stride_ksg, stride_ksd,
    stride_kzb, stride_kzh, stride_kzg, stride_kzd,
    stride_ob, stride_oh, stride_os,
    REP: tl.constexpr, SQ: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTS: tl.constexpr, EMULATE: tl.constexpr,
):
    # q: [B, Hq, Sq, D]; kq: [B, Hkv, S, D*BITS//8] uint8; ks, kz: [B, Hkv, S//GROUP, D]; out: [B, Hq, Sq, S] fp32.
    # grid (cdiv(n_tiles, tiles_per_prog), Hkv, B): one program per (b, kv head, tiles_per_prog consecutive tiles of
    # BLOCK_N tokens); the launcher picks BLOCK_N dividing GROUP, so a tile lies inside one key group. The REP query
    # heads x SQ query rows of the GQA group are the BLOCK_M rows of each tile (row r = head r // SQ of the group,
    # query r % SQ): each key tile is read once for the whole group.
    pid = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    LB_DT: tl.constexpr = tl.float16  # codes are exact in fp16; pow2_scale keeps the other operand in range
    sm_scale = tl.cast(softmax_scale, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < REP * SQ
    head = kv * REP + rows // SQ
    sq = rows % SQ
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    q_ptrs = q_ptr + b * stride_qb + head[:, None] * stride_qh + sq[:, None] * stride_qs + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
    kq_base = kq_ptr + b * stride_kqb + kv * stride_kqh
    ks_base = ks_ptr + b * stride_ksb + kv * stride_ksh
    kz_base = kz_ptr + b * stride_kzb + kv * stride_kzh
    o_rows = out_ptr + b * stride_ob + head[:, None] * stride_oh + sq[:, None] * stride_os  # [BLOCK_M, 1]

    t_lo = pid * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, n_tiles)
    # Per tile: reads BLOCK_N * D * BITS / 8 code bytes and 2 * D scale/zero elements (HBM once per key group: the
    # GROUP / BLOCK_N tiles of a group share them); writes REP * SQ * BLOCK_N fp32 scores. The query (REP * SQ * D
    # elements) is read once per program. E.g. D = 128, 2 bits, BLOCK_N = 64, bf16, REP * SQ = 4: 2048 + 512 bytes in,
    # 1024 bytes out per tile.
    for t in range(t_lo, t_hi):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < S
        g = (t * BLOCK_N) // GROUP
        s = tl.load(ks_base + g * stride_ksg + d * stride_ksd, mask=d_mask, other=0.0).to(tl.float32)
        z = tl.load(kz_base + g * stride_kzg + d * stride_kzd, mask=d_mask, other=0.0).to(tl.float32)
        qz = tl.sum(q * z[None, :], axis=1)  # [BLOCK_M]
        qs = q * s[None, :]  # [BLOCK_M, BLOCK_D]
        codes = load_key_codes_t(kq_base, n, n_mask, stride_kqs, stride_kqd, D, BITS, BLOCK_D)  # [BLOCK_D, BLOCK_N]
        if PARTS == 0:
            x = split_dot(qs, codes, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PARTS, LB_DT, EMULATE)
        else:
            r_scale, r_inv = pow2_scale(tl.max(tl.abs(qs), axis=1), 14)
            x = split_dot(qs * r_scale[:, None], codes, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PARTS, LB_DT,
                          EMULATE) * r_inv[:, None]
        tl.store(o_rows + n[None, :], (qz[:, None] + x) * sm_scale, mask=row_mask[:, None] & n_mask[None, :])
