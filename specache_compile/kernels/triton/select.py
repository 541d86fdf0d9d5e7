"""Top-k positions by GQA-averaged softmax probability, in two passes over the logits (``reference.select_topk``).

The unfused selection (softmax over every column, slice, mean over the query heads of a KV group, ``torch.topk``)
reads and writes the [B, Hq, S] fp32 logits three times and then runs a radix select over S per KV head (about a
third of the unfused decode path at 128K: bench/results/kernels*.log). Here:

1. ``row_stats_kernel``: per (batch, query head, chunk of the columns) the running max and sum of exp (online
   softmax), over the S candidate logits and the E extra columns (window, speculative token) that only count in the
   denominator: partials [B, Hq, P, 2].
2. ``block_topk_kernel``: per (batch, KV head, block of BLOCK_N positions) the partials folded into each head's max
   and sum, the block's probabilities averaged over the group, then the block's top-k by one bitonic sort of keys
   (probability bits << 32 | position; probabilities are >= 0, so their fp32 bits order as integers): candidates
   [B, Hkv, nblocks, k]. The global top-k is among them; ``torch.topk`` over nblocks * k candidates finishes.

Ties between equal probabilities go to the larger position (the reference's torch.topk picks either).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(
    x_ptr, e_ptr, part_ptr,
    S, E, chunk,
    stride_xb, stride_xh, stride_xs,
    stride_eb, stride_eh, stride_es,
    P,
    BLOCK: tl.constexpr,
):
    # grid (P, Hq, B): program p reduces columns [p * chunk, (p + 1) * chunk) of the S logits, and program 0 the E
    # extra columns too. Writes (max, sum of exp(x - max)) to part[b, h, p].
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK], tl.float32)
    lo = pid_p * chunk
    hi = tl.minimum(lo + chunk, S)
    base = x_ptr + pid_b * stride_xb + pid_h * stride_xh
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs * stride_xs, mask=offs < hi, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that has seen only -inf keeps z = 0
        z = z * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    if pid_p == 0:
        ebase = e_ptr + pid_b * stride_eb + pid_h * stride_eh
        for start in range(0, E, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(ebase + offs * stride_es, mask=offs < E, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            z = z * tl.exp(m - safe) + tl.exp(x - safe)
            m = m_new
    row_m = tl.max(m, axis=0)
    safe_row = tl.where(row_m == float("-inf"), 0.0, row_m)
    safe_lane = tl.where(m == float("-inf"), 0.0, m)
    row_z = tl.sum(z * tl.exp(safe_lane - safe_row), axis=0)
    out = part_ptr + ((pid_b * tl.num_programs(1) + pid_h) * P + pid_p) * 2
    tl.store(out, row_m)
    tl.store(out + 1, row_z)


@triton.jit
def block_topk_kernel(
    x_ptr, part_ptr, cand_val_ptr, cand_idx_ptr,
    S, P, HQ,
    stride_xb, stride_xh, stride_xs,
    REP: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grid (nblocks, Hkv, B). Writes the block's K best (mean probability, position) to cand[b, hkv, block, :K]
    # (probability 0 and position -1 past the block's valid columns).
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < S
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for r in range(REP):
        h = pid_g * REP + r
        pbase = part_ptr + ((pid_b * HQ + h) * P) * 2
        pm = tl.load(pbase + offs_p * 2, mask=offs_p < P, other=float("-inf"))
        pz = tl.load(pbase + offs_p * 2 + 1, mask=offs_p < P, other=0.0)
        row_m = tl.max(pm, axis=0)
        safe_row = tl.where(row_m == float("-inf"), 0.0, row_m)
        safe_p = tl.where(pm == float("-inf"), 0.0, pm)
        row_z = tl.sum(pz * tl.exp(safe_p - safe_row), axis=0)
        inv = tl.where(row_z > 0, 1.0 / row_z, 0.0)
        x = tl.load(x_ptr + pid_b * stride_xb + h * stride_xh + offs * stride_xs, mask=valid,
                    other=float("-inf")).to(tl.float32)
        acc += tl.exp(x - safe_row) * inv
    prob = acc / REP
    bits = prob.to(tl.int32, bitcast=True).to(tl.int64)  # >= 0: ordered like the probabilities
    key = tl.where(valid, (bits << 32) | offs.to(tl.int64), -1)
    key = tl.sort(key, descending=True)
    keep = tl.arange(0, BLOCK_N) < K
    top_bits = (key >> 32).to(tl.int32)
    top_val = tl.where(key >= 0, top_bits.to(tl.float32, bitcast=True), 0.0)
    top_idx = tl.where(key >= 0, key & 0xFFFFFFFF, -1)
    n_blocks = tl.num_programs(0)
    out = ((pid_b * tl.num_programs(1) + pid_g) * n_blocks + pid_n) * K + tl.arange(0, BLOCK_N)
    tl.store(cand_val_ptr + out, top_val, mask=keep)
    tl.store(cand_idx_ptr + out, top_idx, mask=keep)
