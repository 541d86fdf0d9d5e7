"""KIVI quantize + pack kernels: ``reference.quantize_keys`` and ``reference.quantize_values``, bit for bit.

Layouts and the quantizer are the reference's (kernels/reference.py): codes packed along D into uint8, code ``j`` of a
byte at bit ``j * BITS``; scale/zero stored in the output pointer's dtype, rounded to it BEFORE codes are chosen.

Bit-exactness against the float32 torch reference, on CUDA and under TRITON_INTERPRET=1:
- Divisions go through ``tl.div_rn`` (IEEE round-to-nearest). Plain ``/`` on fp32 may lower to an approximate divide.
- No multiply feeds an add, so FMA contraction (Triton's default) cannot change a rounding: ``3 * lo`` is written
  ``lo + lo + lo`` (``2 lo`` is exact, so one rounding, the same as torch's ``3.0 * lo``).
- ``torch.round`` (half to even) is ``(y + 1.5 * 2**23) - 1.5 * 2**23`` for ``|y| < 2**22``: the add pushes the
  fraction out of the mantissa and fp32 round-to-nearest-even does the rest. ``y`` is first clamped to
  ``[-1, LEVELS + 1]``, which changes no clamped code. (libdevice ``rint`` would do, but the interpreter has no
  extern calls.)
- fp32 -> bf16 is rounded by hand (torch's ``round_to_nearest_even`` bit trick): the interpreter truncates on that
  cast. fp16 uses ``.to`` (RTNE on both). The stored value is then exact, so the store's implicit cast is too.
- (torch on CUDA divides by a Python scalar as a multiply by its reciprocal, so the reference run on CUDA can differ
  from the CPU reference in the last bit of a scale; these kernels match the CPU reference.)
NaN / inf inputs are out of contract: min / max here drop NaN where the reference propagates it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_storage(x, OUT_DTYPE: tl.constexpr):
    # x: float32 -> the nearest OUT_DTYPE value (ties to even, as torch's .to), returned as float32
    if OUT_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(OUT_DTYPE).to(tl.float32)
    return x


@triton.jit
def _group_params(lo, hi, BITS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # lo, hi: float32 min / max of each group -> (scale, zero) rounded to OUT_DTYPE, as float32 (_quantize_groups)
    if BITS == 1:
        # SpeCache's 1-bit quantizer: the two levels are the quarter points of [lo, hi]
        zero = tl.div_rn((lo + lo + lo) + hi, 4.0)
        scale = tl.div_rn(hi - lo, 2.0)
    else:
        zero = lo
        scale = tl.div_rn(hi - lo, ((1 << BITS) - 1) * 1.0)
    return _to_storage(scale, OUT_DTYPE), _to_storage(zero, OUT_DTYPE)


@triton.jit
def _codes(x, zero, scale, BITS: tl.constexpr):
    # x, zero, scale: float32, broadcastable -> int32 codes in [0, 2**BITS); scale == 0 gives code 0
    LEVELS: tl.constexpr = (1 << BITS) - 1
    nonzero = scale > 0
    y = tl.div_rn(x - zero, tl.where(nonzero, scale, 1.0))
    y = tl.minimum(tl.maximum(y, -1.0), LEVELS + 1.0)  # keeps |y| < 2**22 for the rounding below
    y = (y + 12582912.0) - 12582912.0  # round half to even: 12582912 = 1.5 * 2**23, see the module docstring
    q = tl.minimum(tl.maximum(y, 0.0), LEVELS * 1.0)
    return tl.where(nonzero, q, 0.0).to(tl.int32)


@triton.jit
def quantize_keys_kernel(
    k_ptr, packed_ptr, scale_ptr, zero_ptr,
    D,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_sg,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # k: [B, H, S, D] any strides; packed: [B, H, S, D*BITS//8]; scale, zero: [B, H, S//GROUP, D], last dims dense.
    # grid (S // GROUP, H, B): one program per (b, h, group of GROUP tokens), looping over D in BLOCK_D chunks.
    # The signature has no defaulted constexpr and no unused pointer: torch 2.11's Inductor launched such a kernel
    # with one argument short ("launcher() missing 1 required positional argument: '_grid_2'").
    pid_g = tl.program_id(0).to(tl.int64)
    t0 = pid_g * GROUP
    _quantize_keys_group(k_ptr, packed_ptr, scale_ptr, zero_ptr, D, stride_kb, stride_kh, stride_ks, stride_kd,
                         stride_pb, stride_ph, stride_ps, stride_sb, stride_sh, stride_sg, t0, t0, pid_g,
                         GROUP, BITS, BLOCK_T, BLOCK_D)


@triton.jit
def quantize_keys_at_kernel(
    k_ptr, packed_ptr, scale_ptr, zero_ptr,
    D,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_sg,
    off_ptr,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # quantize_keys_kernel with the rows read from the device: off_ptr holds three int64 values (source row,
    # destination row, destination group) added to the token and group indices. The static decode path quantizes its
    # ring's oldest group straight into the copy with it (grid (1, H, B)).
    pid_g = tl.program_id(0).to(tl.int64)
    t0 = pid_g * GROUP
    _quantize_keys_group(k_ptr, packed_ptr, scale_ptr, zero_ptr, D, stride_kb, stride_kh, stride_ks, stride_kd,
                         stride_pb, stride_ph, stride_ps, stride_sb, stride_sh, stride_sg,
                         t0 + tl.load(off_ptr).to(tl.int64), t0 + tl.load(off_ptr + 1).to(tl.int64),
                         pid_g + tl.load(off_ptr + 2).to(tl.int64), GROUP, BITS, BLOCK_T, BLOCK_D)


@triton.jit
def _quantize_keys_group(
    k_ptr, packed_ptr, scale_ptr, zero_ptr,
    D,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_sg,
    src_t0, dst_t0, grp,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One group of GROUP tokens of one (b, h): source rows src_t0.., destination rows dst_t0.., scale/zero row grp.
    # Channel d is element (j, i) of a [NB, PER] tile, d = j * PER + i, so byte j packs channels j*PER .. j*PER+PER-1.
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = BLOCK_D // PER
    OUT_DTYPE: tl.constexpr = scale_ptr.dtype.element_ty

    k_base = k_ptr + pid_b * stride_kb + pid_h * stride_kh + src_t0 * stride_ks
    p_base = packed_ptr + pid_b * stride_pb + pid_h * stride_ph + dst_t0 * stride_ps
    s_off = pid_b * stride_sb + pid_h * stride_sh + grp * stride_sg
    offs_t = tl.arange(0, BLOCK_T)
    offs_j = tl.arange(0, NB)
    offs_i = tl.arange(0, PER)
    offs_c = offs_j[:, None] * PER + offs_i[None, :]  # [NB, PER] channel within the chunk
    shift = offs_i * BITS  # code i of a byte at bit i * BITS

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_c
        d_mask = offs_d < D
        # Pass 1: per-channel min / max over the group's tokens. Reads GROUP * BLOCK_D input elements.
        lo = tl.full([NB, PER], float("inf"), tl.float32)
        hi = tl.full([NB, PER], float("-inf"), tl.float32)
        for t in range(0, GROUP, BLOCK_T):
            tok = t + offs_t
            mask = (tok < GROUP)[:, None, None] & d_mask[None, :, :]
            ptrs = k_base + tok[:, None, None] * stride_ks + offs_d[None, :, :] * stride_kd
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.where(d_mask, lo, 0.0)  # padding channels past D: a finite constant group, never stored
        hi = tl.where(d_mask, hi, 0.0)
        scale, zero = _group_params(lo, hi, BITS, OUT_DTYPE)
        # Writes 2 * BLOCK_D scale/zero elements.
        tl.store(scale_ptr + s_off + offs_d, scale, mask=d_mask)
        tl.store(zero_ptr + s_off + offs_d, zero, mask=d_mask)
        # Pass 2: codes and bytes. Re-reads the GROUP * BLOCK_D tile pass 1 just read (L2-resident: at most
        # BLOCK_T * BLOCK_D elements per step) and writes GROUP * BLOCK_D * BITS / 8 bytes.
        byte = d0 // PER + offs_j
        for t in range(0, GROUP, BLOCK_T):
            tok = t + offs_t
            mask = (tok < GROUP)[:, None, None] & d_mask[None, :, :]
            ptrs = k_base + tok[:, None, None] * stride_ks + offs_d[None, :, :] * stride_kd
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            q = _codes(x, zero[None, :, :], scale[None, :, :], BITS)
            packed = tl.sum(q << shift[None, None, :], axis=2).to(tl.uint8)  # [BLOCK_T, NB]
            out_mask = (tok < GROUP)[:, None] & (byte < D // PER)[None, :]
            tl.store(p_base + tok[:, None] * stride_ps + byte[None, :], packed, mask=out_mask)


@triton.jit
def quantize_values_kernel(
    v_ptr, packed_ptr, scale_ptr, zero_ptr,
    S,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_ss,
    G: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # v: [B, H, S, NG * G] any strides; packed: [B, H, S, NG*G*BITS//8]; scale, zero: [B, H, S, NG], last dims dense.
    # grid (cdiv(S, BLOCK_T), H, B): one program per (b, h, block of BLOCK_T tokens), the whole head dim at once.
    # No defaulted constexpr, no unused pointer (see quantize_keys_kernel).
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    _quantize_values_rows(v_ptr, packed_ptr, scale_ptr, zero_ptr, S, stride_vb, stride_vh, stride_vs, stride_vd,
                          stride_pb, stride_ph, stride_ps, stride_sb, stride_sh, stride_ss, tok, tok,
                          G, NG, BITS, BLOCK_T, BLOCK_NG, BLOCK_G)


@triton.jit
def quantize_values_at_kernel(
    v_ptr, packed_ptr, scale_ptr, zero_ptr,
    S,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_ss,
    off_ptr,
    G: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # quantize_values_kernel with the rows read from the device: off_ptr holds int64 values (source row, destination
    # row) added to the token index (see quantize_keys_at_kernel).
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    _quantize_values_rows(v_ptr, packed_ptr, scale_ptr, zero_ptr, S, stride_vb, stride_vh, stride_vs, stride_vd,
                          stride_pb, stride_ph, stride_ps, stride_sb, stride_sh, stride_ss,
                          tok + tl.load(off_ptr).to(tl.int64), tok + tl.load(off_ptr + 1).to(tl.int64),
                          G, NG, BITS, BLOCK_T, BLOCK_NG, BLOCK_G)


@triton.jit
def _quantize_values_rows(
    v_ptr, packed_ptr, scale_ptr, zero_ptr,
    S,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ph, stride_ps,
    stride_sb, stride_sh, stride_ss,
    src_tok, dst_tok,
    G: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # The BLOCK_T tokens of program (t, h, b): read from rows src_tok, written to rows dst_tok; tokens past S of the
    # program's block (counted from the block's start, offsets aside) are masked.
    # Tile [BLOCK_T, BLOCK_NG, BLOCK_G // PER, PER]: channel d = g * G + j * PER + i is group g, byte j of the group,
    # code i of the byte. Needs G % PER == 0 (no byte spans two groups); the launcher checks.
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    PER: tl.constexpr = 8 // BITS
    NB: tl.constexpr = BLOCK_G // PER
    OUT_DTYPE: tl.constexpr = scale_ptr.dtype.element_ty
    t_mask = (tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)) < S
    offs_g = tl.arange(0, BLOCK_NG)
    offs_j = tl.arange(0, NB)
    offs_i = tl.arange(0, PER)
    byte = offs_g[:, None] * (G // PER) + offs_j[None, :]  # [BLOCK_NG, NB] byte within the token's row
    b_mask = (offs_g < NG)[:, None] & (offs_j < G // PER)[None, :]
    offs_d = byte[:, :, None] * PER + offs_i[None, None, :]  # [BLOCK_NG, NB, PER]
    mask = t_mask[:, None, None, None] & b_mask[None, :, :, None]

    # Reads BLOCK_T * D input elements once; writes BLOCK_T * D * BITS / 8 bytes and 2 * BLOCK_T * NG scale/zero.
    v_base = v_ptr + pid_b * stride_vb + pid_h * stride_vh
    ptrs = v_base + src_tok[:, None, None, None] * stride_vs + offs_d[None, :, :, :] * stride_vd
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=3), axis=2)  # [BLOCK_T, BLOCK_NG]
    hi = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=3), axis=2)
    g_mask = t_mask[:, None] & (offs_g < NG)[None, :]
    lo = tl.where(g_mask, lo, 0.0)  # padding (tokens past S, groups past NG): a finite constant group, never stored
    hi = tl.where(g_mask, hi, 0.0)
    scale, zero = _group_params(lo, hi, BITS, OUT_DTYPE)
    s_ptrs = pid_b * stride_sb + pid_h * stride_sh + dst_tok[:, None] * stride_ss + offs_g[None, :]
    tl.store(scale_ptr + s_ptrs, scale, mask=g_mask)
    tl.store(zero_ptr + s_ptrs, zero, mask=g_mask)

    q = _codes(x, zero[:, :, None, None], scale[:, :, None, None], BITS)
    shift = offs_i * BITS  # code i of a byte at bit i * BITS
    packed = tl.sum(q << shift[None, None, None, :], axis=3).to(tl.uint8)  # [BLOCK_T, BLOCK_NG, NB]
    p_ptrs = packed_ptr + pid_b * stride_pb + pid_h * stride_ph + dst_tok[:, None, None] * stride_ps + byte[None, :, :]
    tl.store(p_ptrs, packed, mask=t_mask[:, None, None] & b_mask[None, :, :])
