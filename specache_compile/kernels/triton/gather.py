"""Row gather: ``out[b, h, k] = src[b, h, idx[b, h, k]]`` (``reference.gather_rows``), one row = D elements.

``src_ptr`` may be pinned host memory read in place over PCIe (zero-copy / UVA: the launcher passes the pinned
tensor's pointer, which is valid on the device, see kernels/quant_ops.py), or device memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(
    src_ptr, idx_ptr, out_ptr,
    S, K, D,
    stride_sb, stride_sh, stride_ss, stride_sd,
    stride_ib, stride_ih, stride_ik,
    stride_ob, stride_oh, stride_ok, stride_od,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # src: [B, H, S, D]; idx: [B, H, K] int32/int64; out: [B, H, K, D]; any strides (stride_sd == stride_od == 1 lets
    # Triton's specialization vectorise each row into 16-byte loads / stores).
    # grid (cdiv(K, BLOCK_K), H, B): one program per (b, h, block of BLOCK_K rows).
    pid_k = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(idx_ptr + pid_b * stride_ib + pid_h * stride_ih + offs_k * stride_ik, mask=k_mask, other=0)
    rows = rows.to(tl.int64)
    in_range = (rows >= 0) & (rows < S)
    # Compiled in only with TRITON_DEBUG=1 (always checked by the interpreter). Otherwise an out-of-range position
    # reads nothing and yields a zero row: no host sync to check it, and no stray read of host memory.
    tl.device_assert(in_range | ~k_mask, "gather_rows: position out of range [0, S)")
    valid = k_mask & in_range

    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        row_mask = valid[:, None]
        out_mask = k_mask[:, None]
    else:
        row_mask = valid[:, None] & (offs_d < D)[None, :]
        out_mask = k_mask[:, None] & (offs_d < D)[None, :]
    # Reads BLOCK_K * D elements (BLOCK_K rows of D * elem bytes, e.g. 256 B for D=128 fp16: over PCIe for a host
    # src) and writes as many to out.
    src = src_ptr + pid_b * stride_sb + pid_h * stride_sh + rows[:, None] * stride_ss + offs_d[None, :] * stride_sd
    x = tl.load(src, mask=row_mask, other=0.0)
    dst = out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_k[:, None] * stride_ok + offs_d[None, :] * stride_od
    tl.store(dst, x, mask=out_mask)


@triton.jit
def scatter_rows_kernel(
    src_ptr, idx_ptr, dst_ptr,
    S, K, D,
    stride_sb, stride_sh, stride_sk, stride_sd,
    stride_db, stride_dh, stride_ds, stride_dd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dst[b, h, idx[k]] = src[b, h, k]: src [B, H, K, D]; idx [K] int64 positions shared by every (b, h); dst
    # [B, H, S, D] (pinned host memory written in place over PCIe, or device memory). Positions outside [0, S) write
    # nothing (the caller checks them on the device). grid (cdiv(K, BLOCK_K), H, B).
    pid_k = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(idx_ptr + offs_k, mask=k_mask, other=-1).to(tl.int64)
    valid = k_mask & (rows >= 0) & (rows < S)
    offs_d = tl.arange(0, BLOCK_D)
    m = valid[:, None] & (offs_d < D)[None, :]
    src = src_ptr + pid_b * stride_sb + pid_h * stride_sh + offs_k[:, None] * stride_sk + offs_d[None, :] * stride_sd
    x = tl.load(src, mask=m, other=0.0)
    dst = dst_ptr + pid_b * stride_db + pid_h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :] * stride_dd
    tl.store(dst, x, mask=m)
