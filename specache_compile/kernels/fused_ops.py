"""``specache::fused_decode``: one pass over the low-bit copy per layer per decode step (triton/fused_decode.py).

What it replaces on the static decode path: ``lowbit_scores`` + ``select_topk`` (the ranking) and
``lowbit_decode_attention`` (the attention), which read the low-bit keys twice in three kernels. Semantics:
``reference.fused_decode`` (the CPU kernel and the tests' oracle). :func:`fused_decode_supported` says where the
Triton kernel runs; elsewhere the op runs the reference, so callers with a faster unfused path keep it there.

Registered by :func:`register_op`, which makes the three registrations an op needs (an opaque reference op for the
non-CUDA branch of the triton_op, the triton_op with its CPU kernel, the fake; or one custom_op without Triton).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor  # noqa: F401 (the op's annotations name it: schema inference resolves them here)

from . import reference as ref
from .attn_ops import _KERNEL_DTYPES, _MIN_TILE, _device_sms, _interpreted, _select_block_n, bias_args, split_plan

try:
    import triton
    from torch.library import wrap_triton

    from .triton.decode_attention import merge_splits_kernel, substitution_bitmap_kernel
    from .triton.fused_decode import fused_decode_kernel, rank_probs_kernel, rank_topk_kernel

    HAS_TRITON = True
except ImportError:  # keep `import specache` working without Triton: the reference op below
    HAS_TRITON = False

_MAX_HEAD_DIM = 256  # a [256, 16] fp32 query tile plus a [64, 256] code tile per K and V is what 4 warps hold
_MAX_ROWS = 64  # REP * Sq query rows of one GQA group in one tile
_MIN_ROWS = 8  # the smallest row tile: the N of a tensor-core product (wgmma / mma n8), no padding to 16
_MAX_TOPK = 2048  # the largest top-k the kernel path takes (larger ones run the reference)
_PROB_BLOCK = 1024  # positions per program of the ranking probabilities
# The ranking's top-k: from b * Hkv * n_low positions on, torch.topk over every position's probability (its
# multi-block radix select); below, a bitonic sort per block of positions and torch.topk over the blocks' candidates.
# Measured on the H200 (bench/kernel_bench.py fused rows of both, Llama-3-8B shape, top-64): at 8 rows of 32K
# the block sort (11 us) and a single-block torch.topk over 8192 candidates (27 us) beat the multi-block select
# (~26 us more in all: six short kernels); from 8 rows of 128K (90 + 27 us against ~55) and 64 rows of 32K up, the
# select over every position wins, at 64 rows of 128K by 658 + 28 us against ~170.
_PROB_TOPK_MIN = 1 << 19
# Launch shape of the fused pass: tokens per key tile at most (a tile lies in one key group), warps, pipeline depth.
# bench/kernel_bench.py sweeps them (fused_decode[...] rows): at the Llama-3-8B shape on the H200, 64 / 4 / 3 is the
# fastest measured (32-token tiles are ~30% slower: the per-tile products and reductions weigh more per token).
_TILE = 64
_NUM_WARPS = 4
_NUM_STAGES = 3
_MAXNREG = None  # a register cap a thread (bench/kernel_bench.py sweeps it; None: the compiler's choice)
# Flash-decoding split over the keys: about _PROGRAMS_PER_SM low-bit programs per SM over the grid (the pass is
# latency-bound: at ~200 registers a thread two 4-warp programs fit an SM, and more programs queued behind them keep
# it busy through the short full-precision splits), each at least _MIN_TILES_PER_SPLIT tiles (a split's partial
# output, REP*Sq*(Dv+2) fp32 written and merged, stays small next to what it reads). bench/kernel_bench.py sweeps both.
_PROGRAMS_PER_SM = 4
_MIN_TILES_PER_SPLIT = 4


def register_op(name: str, reference: Callable, kernel: Callable, use_kernel: Callable, fake: Callable):
    """``specache::<name>``: ``kernel(*args)`` where ``use_kernel(*args)`` (Triton on the inputs' device), else
    ``reference(*args)``, with ``fake`` for tracing. With Triton it is a ``torch.library.triton_op`` (Inductor sees
    the kernels it launches through ``wrap_triton``) whose other branch calls an opaque ``specache::<name>_ref`` op:
    AOTAutograd traces a triton_op's body, and the reference must run as written, not be decomposed into the graph.
    Its CPU kernel is the reference. Without Triton, one ``custom_op`` over the reference. The schema comes from
    ``reference``'s annotations."""
    if not HAS_TRITON:
        op = torch.library.custom_op(f"specache::{name}", reference, mutates_args=())
        op.register_fake(fake)
        return op
    ref_op = torch.library.custom_op(f"specache::{name}_ref", reference, mutates_args=())
    ref_op.register_fake(fake)

    @functools.wraps(reference)
    def body(*args, **kwargs):
        if use_kernel(*args, **kwargs):
            return kernel(*args, **kwargs)
        return ref_op(*args, **kwargs)

    op = torch.library.triton_op(f"specache::{name}", body, mutates_args=())
    op.register_kernel("cpu")(reference)
    op.register_fake(fake)
    return op


# ----------------------------------------------------------------------------------------------------------------------
# where the kernel runs
# ----------------------------------------------------------------------------------------------------------------------


def fused_decode_supported(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor,
                           k_fp: torch.Tensor, v_fp: torch.Tensor, k_win: torch.Tensor, bits: int, group: int,
                           rank_row: int, k: int) -> bool:
    """True where ``fused_decode`` runs its Triton kernel (CUDA, or Triton's interpreter on CPU tensors)."""
    if not (HAS_TRITON and (q.is_cuda or _interpreted()) and q.dim() == 4 and kq.dim() == 4):
        return False
    if bits not in (1, 2, 4) or not isinstance(group, int) or group <= 0:
        return False
    b, hq, sq, d = q.shape
    hkv = kq.shape[1]
    dv = v_fp.shape[-1]
    return (
        q.dtype in _KERNEL_DTYPES and all(t.dtype == q.dtype for t in (ks, vs, k_fp, v_fp, k_win))
        and _tile(group) >= _MIN_TILE and hkv > 0 and hq % hkv == 0 and (hq // hkv) * sq <= _MAX_ROWS
        and (d * bits) % 32 == 0 and (dv * bits) % 32 == 0 and 16 <= d <= _MAX_HEAD_DIM and 16 <= dv <= _MAX_HEAD_DIM
        and rank_row < sq and (rank_row < 0 or 0 < k <= _MAX_TOPK)
    )


def _word_aligned(codes: torch.Tensor) -> torch.Tensor:
    # the kernel reads packed codes as int32 words: rows of whole words, word-aligned (a copy otherwise)
    if codes.stride(-1) == 1 and codes.storage_offset() % 4 == 0 and all(st % 4 == 0 for st in codes.stride()[:-1]):
        return codes
    return codes.contiguous()


def _tile(group: int) -> int:
    # tokens per key tile: the largest power of two <= _TILE dividing group, so a tile never straddles two key groups
    return math.gcd(group, _TILE)


def _use_kernel(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, k_win, v_win, win_pos, bias, limit,
                softmax_scale, rank_row, k, attend=True) -> bool:
    return fused_decode_supported(q, kq, ks, vs, k_fp, v_fp, k_win, bits, group, rank_row, k)


# ----------------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------------


def _fused_decode_triton(
    q, kq, ks, kz, vq, vs, vz, bits: int, group: int, lo: int, k_fp, v_fp, fp_pos, k_win, v_win, win_pos, bias,
    limit, softmax_scale: float, rank_row: int, k: int, attend: bool = True, tiles_per_split: int | None = None,
):
    """The kernels: bitmap, fused pass, split merge, and the ranking's top-k (see _PROB_TOPK_MIN).
    ``tiles_per_split`` overrides the split heuristic (tests)."""
    b, hq, sq, d = q.shape
    hkv, nq = kq.shape[1], kq.shape[2]
    rep = hq // hkv
    dv = v_fp.shape[-1]
    dev = q.device
    m = rep * sq
    w = None if bias is None else bias.shape[-1]
    hi_q = nq if w is None else min(nq, lo + w)
    n_low = max(0, hi_q - lo)
    rank = rank_row >= 0
    out = torch.empty((b, hq, sq, dv if attend else 0), dtype=q.dtype, device=dev)
    top = torch.full((b, hkv, k if rank else 0), -1, dtype=torch.int64, device=dev)
    if b * hq * sq == 0 or not (attend or (rank and n_low > 0 and k > 0)):
        return out.zero_(), top

    kq, vq = _word_aligned(kq), _word_aligned(vq)
    gv = min(group, dv)
    block_n = _tile(group)
    tile0 = lo // block_n
    n_tiles = max(0, triton.cdiv(hi_q, block_n) - tile0)
    f = k_fp.shape[2] if attend else 0  # ranking alone reads no fetched rows
    fw = k_win.shape[2]
    n_f_tiles = triton.cdiv(f, block_n)
    n_fp_tiles = n_f_tiles + triton.cdiv(fw, block_n)
    if tiles_per_split is None:
        target = max(1, _PROGRAMS_PER_SM * _device_sms(q) // (b * hkv))
        tiles_per_split = max(_MIN_TILES_PER_SPLIT, triton.cdiv(n_tiles, target))
    tiles_per_split, n_lb, fp_tiles_per_split, ns = split_plan(q, n_tiles, n_fp_tiles, hkv, d, dv, bits,
                                                               tiles_per_split)

    f32 = dict(dtype=torch.float32, device=dev)
    if attend:
        n_words = max(1, triton.cdiv(nq, 32))
        sub = torch.empty((b, hkv, n_words), dtype=torch.int32, device=dev)
        wrap_triton(substitution_bitmap_kernel)[(hkv, b)](
            fp_pos, sub,
            nq, f, n_words,
            fp_pos.stride(0), fp_pos.stride(1), fp_pos.stride(2),
            sub.stride(0), sub.stride(1),
            BLOCK_W=1024, BLOCK_F=128, num_warps=_NUM_WARPS,
        )
        po = torch.empty((b, hkv, ns, m, dv), **f32)
    else:
        sub = torch.zeros((1, 1, 1), dtype=torch.int32, device=dev)  # never read (ATTEND=False)
        po = torch.empty((1, 1, 1, 1, 1), **f32)
    pm = torch.empty((b, hkv, ns, m), **f32)
    pl = torch.empty((b, hkv, ns, m), **f32)
    rm = torch.empty((b, hkv, ns, m), **f32) if rank else pm
    rl = torch.empty((b, hkv, ns, m), **f32) if rank else pl
    rx = torch.empty((b, hq, max(n_low, 1)), **f32) if rank else pm.new_empty((1, 1, 1))
    bias_t, bias_strides = bias_args(bias, q)
    lim = limit if limit is not None else top  # never read without a limit (HAS_LIMIT=False)
    wrap_triton(fused_decode_kernel)[(ns, hkv, b)](
        q, kq, ks, kz, vq, vs, vz, sub,
        k_fp, v_fp, fp_pos, k_win, v_win, win_pos, bias_t, lim,
        po, pm, pl, rx, rm, rl,
        lo, hi_q, f, fw, w or 0, float(softmax_scale) * math.log2(math.e),
        tile0, n_tiles, tiles_per_split, n_lb, n_f_tiles, n_fp_tiles, fp_tiles_per_split,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        *(st // 4 for st in kq.stride()[:3]), 1,
        ks.stride(0), ks.stride(1), ks.stride(2), ks.stride(3),
        *(st // 4 for st in vq.stride()[:3]), 1,
        vs.stride(0), vs.stride(1), vs.stride(2), vs.stride(3),
        sub.stride(0), sub.stride(1),
        k_fp.stride(0), k_fp.stride(1), k_fp.stride(2), k_fp.stride(3),
        v_fp.stride(0), v_fp.stride(1), v_fp.stride(2), v_fp.stride(3),
        fp_pos.stride(0), fp_pos.stride(1), fp_pos.stride(2),
        k_win.stride(0), k_win.stride(1), k_win.stride(2), k_win.stride(3),
        v_win.stride(0), v_win.stride(1), v_win.stride(2), v_win.stride(3),
        win_pos.stride(0), win_pos.stride(1), win_pos.stride(2),
        *bias_strides,
        po.stride(0), po.stride(1), po.stride(2), po.stride(3),
        pm.stride(0), pm.stride(1), pm.stride(2),
        rx.stride(0), rx.stride(1),
        D=d, DV=dv, REP=rep, SQ=sq, RANK_ROW=rank_row if rank else -1, GROUP=group, GV=gv, NGV=dv // gv, BITS=bits,
        BLOCK_M=max(_MIN_ROWS, triton.next_power_of_2(m)), BLOCK_N=block_n,
        BLOCK_NW=triton.next_power_of_2(d * bits // 32), BLOCK_NWV=triton.next_power_of_2(dv * bits // 32),
        HAS_BIAS=bias is not None, HAS_LIMIT=limit is not None, ATTEND=attend,
        PARTS=0 if q.dtype == torch.float32 else 2, QPARTS=0 if q.dtype == torch.float32 else 1,
        FP_PARTS=0 if q.dtype == torch.float32 else 2, EMULATE=_interpreted(), num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES, **({} if _MAXNREG is None else {"maxnreg": _MAXNREG}),
    )
    if attend:
        wrap_triton(merge_splits_kernel)[(m, hkv, b)](
            po, pm, pl, out,
            ns, dv,
            po.stride(0), po.stride(1), po.stride(2), po.stride(3),
            pm.stride(0), pm.stride(1), pm.stride(2),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            REP=rep, SQ=sq, BLOCK_S=16, BLOCK_DV=triton.next_power_of_2(dv), num_warps=_NUM_WARPS,
        )
    kk = min(k, n_low) if rank else 0
    if kk > 0 and b * hkv * n_low >= _PROB_TOPK_MIN:
        prob = torch.empty((b, hkv, n_low), **f32)
        wrap_triton(rank_probs_kernel)[(triton.cdiv(n_low, _PROB_BLOCK), hkv, b)](
            rx, rm, rl, lim, prob,
            n_low, lo, ns,
            rx.stride(0), rx.stride(1),
            rm.stride(0), rm.stride(1), rm.stride(2),
            prob.stride(0), prob.stride(1),
            REP=rep, SQ=sq, RANK_ROW=rank_row, BLOCK_N=_PROB_BLOCK, BLOCK_S=triton.next_power_of_2(ns),
            HAS_LIMIT=limit is not None, num_warps=_NUM_WARPS,
        )
        val, idx = torch.topk(prob, kk, dim=-1, sorted=False)
        top[..., :kk] = torch.where(val > 0, idx + lo, -1)  # fewer than kk positions of nonzero probability: -1
    elif kk > 0:
        block = _select_block_n(kk, n_low)
        n_blocks = triton.cdiv(n_low, block)
        cand_val = torch.empty((b, hkv, n_blocks, kk), **f32)
        cand_idx = torch.empty((b, hkv, n_blocks, kk), dtype=torch.int64, device=dev)
        wrap_triton(rank_topk_kernel)[(n_blocks, hkv, b)](
            rx, rm, rl, lim, cand_val, cand_idx,
            n_low, lo, ns,
            rx.stride(0), rx.stride(1),
            rm.stride(0), rm.stride(1), rm.stride(2),
            REP=rep, SQ=sq, RANK_ROW=rank_row, K=kk, BLOCK_N=block, BLOCK_S=triton.next_power_of_2(ns),
            HAS_LIMIT=limit is not None, num_warps=_NUM_WARPS,
        )
        # the merge: the step's top-k is among the blocks' candidates
        best = torch.topk(cand_val.reshape(b, hkv, -1), kk, dim=-1, sorted=False).indices
        top[..., :kk] = cand_idx.reshape(b, hkv, -1).gather(-1, best)
    return out, top


# ----------------------------------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------------------------------


def _fake(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, k_win, v_win, win_pos, bias, limit,
          softmax_scale, rank_row, k, attend=True):
    out = q.new_empty((*q.shape[:3], v_fp.shape[-1] if attend else 0))
    return out, q.new_empty((q.shape[0], kq.shape[1], k if rank_row >= 0 else 0), dtype=torch.int64)


fused_decode = register_op("fused_decode", ref.fused_decode, _fused_decode_triton, _use_kernel, _fake)
