"""Ops that score the low-bit copy, pick the top-k, and attend over the chosen tokens.

- ``lowbit_scores``: ``torch.library.triton_op``; CUDA runs kernels/triton/score.py (scores straight from the packed
  codes, one program per GQA group and key tile), the CPU kernel is reference.py.
- ``lowbit_decode_attention``: ``triton_op``; CUDA runs kernels/triton/decode_attention.py (flash-decoding over the
  low-bit copy with the full-precision columns substituted in), the CPU kernel is
  :func:`lowbit_decode_attention_reference` (pure torch, defined here).
- ``topk_positions``: ``custom_op``; the reference everywhere but CUDA, where an exact equivalent built on
  ``torch.topk`` runs (same set, same tie rule, see :func:`_topk_positions_cuda`).
- ``sparse_attention``: the reference on every device.

Without Triton (``import triton`` fails) the triton_ops are plain ``custom_op``s over the references. A CUDA input the
kernels do not cover (a dtype, a key group below 16 tokens, a head dim over 256, mixed dtypes) runs the reference too.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from . import reference as ref

try:
    import triton
    from torch.library import wrap_triton

    from .triton.decode_attention import (
        lowbit_decode_split_kernel,
        merge_splits_kernel,
        substitution_bitmap_kernel,
    )
    from .triton.score import lowbit_scores_kernel
    from .triton.select import block_topk_kernel, row_stats_kernel

    HAS_TRITON = True
except ImportError:  # keep `import specache` working without Triton: the reference ops below
    HAS_TRITON = False

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256  # a [16, 256] fp32 query tile plus a [256, 64] code tile is what 4 warps hold in registers
_MAX_ROWS = 64  # REP * Sq query rows of one GQA group in one tile
_MIN_TILE = 16  # tl.dot's smallest K (16-bit operands): a key tile must hold 16 tokens of one key group
_MAX_TILE = 64  # tokens per tile, at most (a [128, 64] code tile per K and V per step: 4 warps hold it)
_NUM_WARPS = 4
_NUM_STAGES = 2
_MIN_TILES_PER_SPLIT = 4  # a split's partial output (REP*Sq*(Dv+2) fp32) stays small next to what it reads
_PROGRAMS_PER_SM = 4
# lowbit_scores: small programs (2 warps, about 128 registers a thread) and many of them: the kernel is latency-bound
# on its packed-code loads, so more resident programs hide more of it (the sweep: bench/results/kernels*.log)
_SCORE_NUM_WARPS = 2
_SCORE_PROGRAMS_PER_SM = 8
_TOPK_CHUNK = 2048  # the exact CUDA top-k selects per chunk first (_topk_positions_cuda): enough chunks to fill the SMs


def _interpreted() -> bool:
    # Triton's interpreter (TRITON_INTERPRET=1) multiplies bf16 tl.dot operands as raw bits: the kernels then emulate
    # the bf16 products in fp32 (exact, see kernels/triton/score.py)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parts(*dtypes: torch.dtype) -> int:
    # fp16 terms the fp32 operand of a low-bit product is split into (score.py's split_dot): 1 for bf16 inputs (2^-12
    # relative error per product, 8x below the eager bf16 computation's), 2 for fp16 inputs (exact: fp16 x fp16 has
    # 22 significant bits); 0 = fp32 inputs, one IEEE fp32 product
    if torch.float32 in dtypes:
        return 0
    return 1 if all(dt == torch.bfloat16 for dt in dtypes) else 2


def _key_tile(group: int) -> int:
    # tokens per key tile: the largest power of two <= _MAX_TILE dividing group, so a tile never straddles two key
    # groups
    return math.gcd(group, _MAX_TILE)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(x: torch.Tensor) -> int:
    # SMs of x's GPU (4 for CPU tensors: the interpreter, where it only sets how the work is split)
    if not x.is_cuda:
        return 4
    return _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------------------------------
# lowbit_scores
# ----------------------------------------------------------------------------------------------------------------------


def _scores_shapes_ok(q, packed, scale, zero, bits, group) -> bool:
    # the shapes the reference accepts (it raises on the rest; the launcher then calls it for its ValueError)
    if not (isinstance(q, torch.Tensor) and q.is_floating_point() and q.dim() == 4 and packed.dim() == 4):
        return False
    if bits not in (1, 2, 4) or isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        return False
    b, hkv, s, nb = packed.shape
    d = nb * 8 // bits
    return (
        packed.dtype == torch.uint8 and s % group == 0 and tuple(scale.shape) == (b, hkv, s // group, d)
        and scale.shape == zero.shape and q.shape[0] == b and q.shape[3] == d and hkv > 0 and q.shape[1] % hkv == 0
        and scale.is_floating_point() and zero.is_floating_point()
    )


def _scores_kernel_ok(q, packed, scale, zero, bits, group) -> bool:
    if not (HAS_TRITON and _scores_shapes_ok(q, packed, scale, zero, bits, group)):
        return False
    rows = (q.shape[1] // packed.shape[1]) * q.shape[2]
    return (
        q.dtype in _KERNEL_DTYPES and scale.dtype in _KERNEL_DTYPES and zero.dtype == scale.dtype
        and _key_tile(group) >= _MIN_TILE and q.shape[3] <= _MAX_HEAD_DIM and rows <= _MAX_ROWS
    )


def _lowbit_scores_triton(q, packed, scale, zero, bits: int, group: int, softmax_scale: float) -> torch.Tensor:
    # q: [B, Hq, Sq, D] any strides; packed: [B, Hkv, S, D*bits//8]; scale, zero: [B, Hkv, S//group, D]
    if not _scores_kernel_ok(q, packed, scale, zero, bits, group):
        return ref.lowbit_scores(q, packed, scale, zero, bits, group, softmax_scale)  # the reference's path / errors
    b, hq, sq, d = q.shape
    hkv, s = packed.shape[1], packed.shape[2]
    rep = hq // hkv
    out = torch.empty((b, hq, sq, s), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    block_n = _key_tile(group)
    n_tiles = triton.cdiv(s, block_n)
    # Enough tiles per program to stream (the loads of the next tile overlap this one's product), enough programs to
    # fill the GPU: about _PROGRAMS_PER_SM per SM over the whole grid.
    target = max(1, _SCORE_PROGRAMS_PER_SM * _device_sms(q) // (b * hkv))
    tiles_per_prog = triton.cdiv(n_tiles, target)
    wrap_triton(lowbit_scores_kernel)[(triton.cdiv(n_tiles, tiles_per_prog), hkv, b)](
        q, packed, scale, zero, out,
        s, d, float(softmax_scale), n_tiles, tiles_per_prog,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        packed.stride(0), packed.stride(1), packed.stride(2), packed.stride(3),
        scale.stride(0), scale.stride(1), scale.stride(2), scale.stride(3),
        zero.stride(0), zero.stride(1), zero.stride(2), zero.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        REP=rep, SQ=sq, GROUP=group, BITS=bits,
        BLOCK_M=max(16, triton.next_power_of_2(rep * sq)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        PARTS=_parts(q.dtype, scale.dtype), EMULATE=_interpreted(), num_warps=_SCORE_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# lowbit_decode_attention: reference
# ----------------------------------------------------------------------------------------------------------------------


def _check_decode(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias):
    """Shape checks (no host sync). Returns (b, hq, sq, d, hkv, nq, dv, f, w or None, rep)."""
    for t, name in ((q, "q"), (ks, "ks"), (kz, "kz"), (vs, "vs"), (vz, "vz"), (k_fp, "k_fp"), (v_fp, "v_fp")):
        ref._check_float(t, name)
    ref._check_ndim(q, 4, "q", "[B, Hq, Sq, D]")
    ref._check_bits(bits)
    ref._check_group(group)
    ref._check_uint8(kq, "kq")
    ref._check_uint8(vq, "vq")
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
        raise ValueError(f"lo: expected a non-negative int (the first attended position), got {lo!r}; fix: pass lo=0")
    b, hq, sq, d = q.shape
    if kq.dim() != 4 or kq.shape[0] != b or kq.shape[3] * 8 // bits != d:
        raise ValueError(
            f"kq: expected packed keys [B={b}, Hkv, nq, D*bits//8={d * bits // 8}], got {tuple(kq.shape)}; "
            "fix: pass quantize_keys' codes for the same batch and head dim as q"
        )
    hkv, nq = kq.shape[1], kq.shape[2]
    rep = ref._gqa_group(hq, hkv, "lowbit_decode_attention")
    if nq % group != 0 or tuple(ks.shape) != (b, hkv, nq // group, d) or ks.shape != kz.shape:
        raise ValueError(
            f"ks, kz: expected [B, Hkv, nq // group, D] = {(b, hkv, nq // group, d)} with nq={nq} divisible by "
            f"group={group}, got ks {tuple(ks.shape)}, kz {tuple(kz.shape)}; fix: pass whole key groups"
        )
    if vq.dim() != 4 or tuple(vq.shape[:3]) != (b, hkv, nq):
        raise ValueError(f"vq: expected [B, Hkv, nq, Dv*bits//8] = [{b}, {hkv}, {nq}, ..], got {tuple(vq.shape)}; "
                         "fix: pass the values quantized with the keys")
    dv = vq.shape[3] * 8 // bits
    gv = min(group, dv)
    if dv == 0 or dv % gv != 0 or tuple(vs.shape) != (b, hkv, nq, dv // gv) or vs.shape != vz.shape:
        raise ValueError(
            f"vs, vz: expected [B, Hkv, nq, Dv // min(group, Dv)] = {(b, hkv, nq, dv // max(gv, 1))}, got vs "
            f"{tuple(vs.shape)}, vz {tuple(vz.shape)}; fix: pass quantize_values' scale and zero"
        )
    ref._check_ndim(k_fp, 4, "k_fp", "[B, Hkv, F, D]")
    ref._check_ndim(v_fp, 4, "v_fp", "[B, Hkv, F, Dv]")
    f = k_fp.shape[2]
    if tuple(k_fp.shape) != (b, hkv, f, d) or tuple(v_fp.shape) != (b, hkv, f, dv):
        raise ValueError(
            f"k_fp, v_fp: expected [B, Hkv, F, D] = {(b, hkv, f, d)} and [B, Hkv, F, Dv] = {(b, hkv, f, dv)}, got "
            f"{tuple(k_fp.shape)}, {tuple(v_fp.shape)}; fix: pass the full-precision columns of every KV head"
        )
    if not isinstance(fp_pos, torch.Tensor) or fp_pos.dtype not in (torch.int64, torch.int32) or (
        tuple(fp_pos.shape) != (b, hkv, f)
    ):
        got = (fp_pos.dtype, tuple(fp_pos.shape)) if isinstance(fp_pos, torch.Tensor) else type(fp_pos).__name__
        raise ValueError(f"fp_pos: expected int64 [B, Hkv, F] = {(b, hkv, f)}, got {got}; "
                         "fix: pass the absolute position of each full-precision column")
    w = None
    if bias is not None:
        ref._check_float(bias, "bias")
        w = bias.shape[-1] if bias.dim() > 0 else 0
        try:
            ok = torch.broadcast_shapes(bias.shape, (b, hq, sq, w)) == (b, hq, sq, w)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"bias: expected a shape broadcastable to [B, Hq, Sq, W] = {(b, hq, sq, w)} over positions "
                f"[lo, lo + W), got {tuple(bias.shape)}; fix: pass an additive mask with size-1 or matching dims"
            )
    return b, hq, sq, d, hkv, nq, dv, f, w, rep


def _substitution_map(fp_pos: torch.Tensor, nq: int) -> torch.Tensor:
    """int8 [B, Hkv, nq + 1]: 1 at each low-bit position listed in fp_pos (slot nq collects the others). No sync."""
    b, hkv, _ = fp_pos.shape
    pos = fp_pos.long()
    idx = torch.where((pos >= 0) & (pos < nq), pos, torch.full_like(pos, nq))
    return torch.zeros((b, hkv, nq + 1), dtype=torch.int8, device=fp_pos.device).scatter_(2, idx, 1)


def lowbit_decode_attention_reference(
    q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
    vz: torch.Tensor, bits: int, group: int, lo: int, k_fp: torch.Tensor, v_fp: torch.Tensor, fp_pos: torch.Tensor,
    bias: torch.Tensor | None, softmax_scale: float,
) -> torch.Tensor:
    """Attention of q over the low-bit copy with full-precision columns substituted in, in float32. [B, Hq, Sq, Dv].

    Columns attended, per (batch, KV head):

    - each low-bit position ``p`` in ``[lo, hi_q)`` NOT listed in ``fp_pos``, through its dequantized key and value
      (float32, ``z + c * s``). The low-bit copy covers ``[0, nq)``, ``nq = kq.shape[2]``; ``hi_q = nq``, or
      ``min(nq, lo + W)`` with a bias;
    - each full-precision column ``k_fp[.., i, :]``, ``v_fp[.., i, :]`` at its absolute position ``fp_pos[.., i]``,
      if that position is ``>= lo`` (and ``< lo + W`` with a bias). Entries below ``lo`` are ignored: ``-1`` pads.
      Each position appears at most once per (batch, KV head); any order.

    ``bias``: additive float mask broadcastable to ``[B, Hq, Sq, W]`` over absolute positions ``[lo, lo + W)``
    (-inf = masked), applied to every column by its position; positions at or past ``lo + W`` are not attended (pass
    a zero bias of width ``hi - lo`` to attend exactly ``[lo, hi)``). None: every column above counts. A row with
    nothing attended returns zeros. Output in ``q.dtype``. This is what ``SpeCachePolicy.decode`` computes with
    ``fp_pos`` = sinks ∪ fetched top-k ∪ window positions, up to the policy rounding the dequantized copy to q.dtype.
    """
    # q: [B, Hq, Sq, D]; kq: [B, Hkv, nq, D*bits//8]; ks, kz: [B, Hkv, nq//group, D]; vq: [B, Hkv, nq, Dv*bits//8];
    # vs, vz: [B, Hkv, nq, Dv//min(group, Dv)]; k_fp: [B, Hkv, F, D]; v_fp: [B, Hkv, F, Dv]; fp_pos: [B, Hkv, F]
    b, hq, sq, d, hkv, nq, dv, f, w, rep = _check_decode(
        q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias
    )
    hi_q = nq if w is None else min(nq, lo + w)
    n_low = max(0, hi_q - lo)
    g0, g1 = lo // group, -(-hi_q // group)
    if n_low > 0:
        k_low = ref.dequantize_keys(
            kq[:, :, g0 * group : g1 * group], ks[:, :, g0:g1], kz[:, :, g0:g1], bits, group, torch.float32
        )[:, :, lo - g0 * group : hi_q - g0 * group]
        v_low = ref.dequantize_values(vq[:, :, lo:hi_q], vs[:, :, lo:hi_q], vz[:, :, lo:hi_q], bits, group,
                                      torch.float32)
    else:
        k_low = q.new_zeros((b, hkv, 0, d), dtype=torch.float32)
        v_low = q.new_zeros((b, hkv, 0, dv), dtype=torch.float32)
    keep_low = _substitution_map(fp_pos, nq)[:, :, lo : lo + n_low] == 0  # [B, Hkv, n_low]
    pos = fp_pos.long()
    keep_fp = pos >= lo
    if w is not None:
        keep_fp &= pos < lo + w
    keep = torch.cat([keep_low, keep_fp], dim=2)  # [B, Hkv, n_low + F]
    k = torch.cat([k_low, k_fp.float()], dim=2)
    v = torch.cat([v_low, v_fp.float()], dim=2)
    mask = torch.zeros(keep.shape, dtype=torch.float32, device=q.device).masked_fill_(~keep, float("-inf"))
    mask = mask.repeat_interleave(rep, dim=1).unsqueeze(2)  # [B, Hq, 1, N]: query head h reads KV head h // rep
    if bias is not None:
        be = bias.float().expand(b, hq, sq, w)
        idx = (pos - lo).clamp(0, max(w - 1, 0)).repeat_interleave(rep, dim=1).unsqueeze(2).expand(b, hq, sq, f)
        b_fp = be.gather(3, idx) if w > 0 else torch.zeros(b, hq, sq, f, device=q.device)
        mask = mask + torch.cat([be[..., :n_low], b_fp], dim=3)
    return ref.sparse_attention(q, k, v, mask, softmax_scale)


# ----------------------------------------------------------------------------------------------------------------------
# lowbit_decode_attention: kernel launcher
# ----------------------------------------------------------------------------------------------------------------------


def split_plan(q, n_tiles: int, n_fp_tiles: int, hkv: int, d: int, dv: int, bits: int,
               tiles_per_split: int | None = None) -> tuple[int, int, int, int]:
    """How flash-decoding splits the keys of each (batch, KV head): (low-bit tiles per split, low-bit splits,
    full-precision tiles per split, splits in all). ``tiles_per_split`` overrides the heuristic (tests)."""
    if tiles_per_split is None:
        # About _PROGRAMS_PER_SM programs per SM over the whole grid, but at least _MIN_TILES_PER_SPLIT tiles each.
        target = max(1, _PROGRAMS_PER_SM * _device_sms(q) // (q.shape[0] * hkv))
        tiles_per_split = max(_MIN_TILES_PER_SPLIT, triton.cdiv(n_tiles, target))
    n_lb = triton.cdiv(n_tiles, tiles_per_split)
    # A full-precision tile reads (D + Dv) * elem bytes a token, a low-bit one about (D + Dv) * bits / 8 + 8: give
    # each full-precision split about the bytes of a low-bit one.
    lb_bytes = (d + dv) * bits / 8 + 8
    fp_bytes = (d + dv) * q.element_size()
    fp_tiles_per_split = max(1, int(tiles_per_split * lb_bytes / fp_bytes))
    ns = max(1, n_lb + triton.cdiv(n_fp_tiles, fp_tiles_per_split))  # one (empty) split at least: every row a partial
    return tiles_per_split, n_lb, fp_tiles_per_split, ns


def bias_args(bias, q) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(tensor, 4 strides) a kernel reads a bias [.., W] broadcastable to [B, Hq, Sq, W] through: the strides of the
    caller's tensor, 0 along broadcast dims. Not those of a bias.expand(...) view: under torch.compile a view made
    here may be materialised with a layout of Inductor's choosing. No bias: q, never read (HAS_BIAS=False)."""
    if bias is None:
        return q, (0, 0, 0, 0)
    pad = (1,) * (4 - bias.dim())
    shape, strides = (*pad, *bias.shape), (*(0,) * len(pad), *bias.stride())
    return bias, tuple(0 if n == 1 else st for n, st in zip(shape, strides))


def _decode_kernel_ok(q, ks, vs, k_fp, v_fp, group, d, dv, rep, sq) -> bool:
    dt = q.dtype
    return (
        HAS_TRITON and dt in _KERNEL_DTYPES
        and all(t.dtype == dt for t in (ks, vs, k_fp, v_fp))
        and _key_tile(group) >= _MIN_TILE and 16 <= dv and d <= _MAX_HEAD_DIM and dv <= _MAX_HEAD_DIM
        and rep * sq <= _MAX_ROWS
    )


def _lowbit_decode_attention_triton(
    q, kq, ks, kz, vq, vs, vz, bits: int, group: int, lo: int, k_fp, v_fp, fp_pos, bias, softmax_scale: float,
    tiles_per_split: int | None = None,
) -> torch.Tensor:
    """The kernels (kernels/triton/decode_attention.py); ``tiles_per_split`` overrides the split heuristic (tests)."""
    b, hq, sq, d, hkv, nq, dv, f, w, rep = _check_decode(
        q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias
    )
    if not _decode_kernel_ok(q, ks, vs, k_fp, v_fp, group, d, dv, rep, sq):
        return lowbit_decode_attention_reference(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias,
                                                 softmax_scale)
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    m = rep * sq
    gv = min(group, dv)
    block_n = _key_tile(group)
    hi_q = nq if w is None else min(nq, lo + w)
    # Low-bit tiles are aligned to absolute multiples of block_n (so each lies in one key group); the first and last
    # are clipped to [lo, hi_q) in the kernel.
    tile0 = lo // block_n
    n_tiles = max(0, triton.cdiv(hi_q, block_n) - tile0)
    n_fp_tiles = triton.cdiv(f, block_n)
    tiles_per_split, n_lb, fp_tiles_per_split, ns = split_plan(q, n_tiles, n_fp_tiles, hkv, d, dv, bits,
                                                               tiles_per_split)

    n_words = triton.cdiv(nq, 32)
    sub = torch.empty((b, hkv, max(n_words, 1)), dtype=torch.int32, device=q.device)
    wrap_triton(substitution_bitmap_kernel)[(hkv, b)](
        fp_pos, sub,
        nq, f, n_words,
        fp_pos.stride(0), fp_pos.stride(1), fp_pos.stride(2),
        sub.stride(0), sub.stride(1),
        BLOCK_W=1024, BLOCK_F=128, num_warps=_NUM_WARPS,
    )
    po = torch.empty((b, hkv, ns, m, dv), dtype=torch.float32, device=q.device)
    pm = torch.empty((b, hkv, ns, m), dtype=torch.float32, device=q.device)
    pl = torch.empty((b, hkv, ns, m), dtype=torch.float32, device=q.device)
    bias_t, bias_strides = bias_args(bias, q)
    wrap_triton(lowbit_decode_split_kernel)[(ns, hkv, b)](
        q, kq, ks, kz, vq, vs, vz, sub,
        k_fp, v_fp, fp_pos, bias_t,
        po, pm, pl,
        lo, hi_q, f, w or 0, d, dv, float(softmax_scale) * math.log2(math.e),
        tile0, n_tiles, tiles_per_split, n_lb, n_fp_tiles, fp_tiles_per_split,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        kq.stride(0), kq.stride(1), kq.stride(2), kq.stride(3),
        ks.stride(0), ks.stride(1), ks.stride(2), ks.stride(3),
        kz.stride(0), kz.stride(1), kz.stride(2), kz.stride(3),
        vq.stride(0), vq.stride(1), vq.stride(2), vq.stride(3),
        vs.stride(0), vs.stride(1), vs.stride(2), vs.stride(3),
        vz.stride(0), vz.stride(1), vz.stride(2), vz.stride(3),
        sub.stride(0), sub.stride(1),
        k_fp.stride(0), k_fp.stride(1), k_fp.stride(2), k_fp.stride(3),
        v_fp.stride(0), v_fp.stride(1), v_fp.stride(2), v_fp.stride(3),
        fp_pos.stride(0), fp_pos.stride(1), fp_pos.stride(2),
        *bias_strides,
        po.stride(0), po.stride(1), po.stride(2), po.stride(3),
        pm.stride(0), pm.stride(1), pm.stride(2),
        REP=rep, SQ=sq, GROUP=group, GV=gv, NGV=dv // gv, BITS=bits,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)), BLOCK_NGV=triton.next_power_of_2(dv // gv),
        HAS_BIAS=bias is not None, PARTS=_parts(q.dtype), QPARTS=0 if q.dtype == torch.float32 else 1,
        FP_PARTS=0 if q.dtype == torch.float32 else 2, EMULATE=_interpreted(), num_warps=_NUM_WARPS,
        num_stages=_NUM_STAGES,
    )
    wrap_triton(merge_splits_kernel)[(m, hkv, b)](
        po, pm, pl, out,
        ns, dv,
        po.stride(0), po.stride(1), po.stride(2), po.stride(3),
        pm.stride(0), pm.stride(1), pm.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        REP=rep, SQ=sq, BLOCK_S=16, BLOCK_DV=triton.next_power_of_2(dv), num_warps=_NUM_WARPS,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# top-k on CUDA
# ----------------------------------------------------------------------------------------------------------------------


def _topk_positions_cuda(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``reference.topk_positions`` exactly (same set, lower position wins ties), with torch.topk, no full sort.

    torch.topk leaves the choice among equal scores unspecified. Making every key unique fixes it: the score's
    order-preserving int32 image in the high 32 bits, ``S - 1 - position`` in the low 32 (so among equal scores the
    lower position is the larger key). NaN counts as -inf and -0.0 as +0.0, as in the reference's sort. Long rows
    select in two stages (the top k of each _TOPK_CHUNK positions, then the top k of those): torch.topk parallelises
    over rows, and a few rows of 100K+ positions leave most of the GPU idle. The union of the chunks' top k holds the
    row's top k, and unique keys make both stages exact.
    """
    # scores: [B, Hkv, S]
    ref._check_float(scores, "scores")
    ref._check_ndim(scores, 3, "scores", "[B, Hkv, S]")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int, got {k!r}; fix: pass k as a Python int")
    b, h, s = scores.shape
    kk = max(0, min(k, s))
    if kk == 0 or scores.dtype == torch.float64 or s >= 2**31:
        return ref.topk_positions(scores, k)
    x = torch.nan_to_num(scores.float(), nan=float("-inf")) + 0.0  # + 0.0: -0.0 becomes +0.0
    bits = x.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # int order == float order
    rank = s - 1 - torch.arange(s, device=scores.device, dtype=torch.int64)
    key = (key << 32) | rank  # [B, Hkv, S], all distinct
    chunk = _TOPK_CHUNK
    if s > 2 * chunk and kk <= chunk // 4:
        n_chunks = triton.cdiv(s, chunk) if HAS_TRITON else -(-s // chunk)
        pad = torch.full((b, h, n_chunks * chunk - s), torch.iinfo(torch.int64).min, dtype=torch.int64,
                         device=scores.device)  # below every real key: never chosen over one
        key = torch.cat([key, pad], dim=2).view(b, h, n_chunks, chunk)
        key = torch.topk(key, kk, dim=-1, sorted=False).values.view(b, h, n_chunks * kk)
    top = torch.topk(key, kk, dim=-1, sorted=False).values
    pos = (s - 1) - (top & 0xFFFFFFFF)
    return torch.sort(pos, dim=-1).values


# ----------------------------------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------------------------------


def _use_kernel(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.device.type == "cuda"


if HAS_TRITON:
    # Opaque reference ops for the triton_ops' non-CUDA branch: AOTAutograd traces a triton_op's body, and the
    # references are meant to run as written (see quant_ops.py), not be decomposed into the graph.
    @torch.library.custom_op("specache::lowbit_scores_ref", mutates_args=())
    def _lowbit_scores_ref(
        q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
        softmax_scale: float,
    ) -> torch.Tensor:
        return ref.lowbit_scores(q, packed, scale, zero, bits, group, softmax_scale)

    @torch.library.custom_op("specache::lowbit_decode_attention_ref", mutates_args=())
    def _lowbit_decode_attention_ref(
        q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
        vz: torch.Tensor, bits: int, group: int, lo: int, k_fp: torch.Tensor, v_fp: torch.Tensor,
        fp_pos: torch.Tensor, bias: torch.Tensor | None, softmax_scale: float,
    ) -> torch.Tensor:
        return lowbit_decode_attention_reference(
            q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale
        )

    @torch.library.triton_op("specache::lowbit_scores", mutates_args=())
    def lowbit_scores(
        q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
        softmax_scale: float,
    ) -> torch.Tensor:
        # Also what AOTAutograd traces: on CUDA the kernel, elsewhere the opaque reference.
        if not _use_kernel(q):
            return _lowbit_scores_ref(q, packed, scale, zero, bits, group, softmax_scale)
        return _lowbit_scores_triton(q, packed, scale, zero, bits, group, softmax_scale)

    @torch.library.triton_op("specache::lowbit_decode_attention", mutates_args=())
    def lowbit_decode_attention(
        q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
        vz: torch.Tensor, bits: int, group: int, lo: int, k_fp: torch.Tensor, v_fp: torch.Tensor,
        fp_pos: torch.Tensor, bias: torch.Tensor | None, softmax_scale: float,
    ) -> torch.Tensor:
        if not _use_kernel(q):
            return _lowbit_decode_attention_ref(
                q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale
            )
        return _lowbit_decode_attention_triton(
            q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale
        )

    @lowbit_scores.register_kernel("cpu")
    def _(q, packed, scale, zero, bits, group, softmax_scale):
        return ref.lowbit_scores(q, packed, scale, zero, bits, group, softmax_scale)

    @lowbit_decode_attention.register_kernel("cpu")
    def _(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale):
        return lowbit_decode_attention_reference(
            q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale
        )

else:

    @torch.library.custom_op("specache::lowbit_scores", mutates_args=())
    def lowbit_scores(
        q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
        softmax_scale: float,
    ) -> torch.Tensor:
        return ref.lowbit_scores(q, packed, scale, zero, bits, group, softmax_scale)

    @torch.library.custom_op("specache::lowbit_decode_attention", mutates_args=())
    def lowbit_decode_attention(
        q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
        vz: torch.Tensor, bits: int, group: int, lo: int, k_fp: torch.Tensor, v_fp: torch.Tensor,
        fp_pos: torch.Tensor, bias: torch.Tensor | None, softmax_scale: float,
    ) -> torch.Tensor:
        return lowbit_decode_attention_reference(
            q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale
        )


def _fake_scores(q, packed, scale, zero, bits, group, softmax_scale):
    return q.new_empty((*q.shape[:3], packed.shape[2]), dtype=torch.float32)


def _fake_decode(q, kq, ks, kz, vq, vs, vz, bits, group, lo, k_fp, v_fp, fp_pos, bias, softmax_scale):
    return q.new_empty((*q.shape[:3], v_fp.shape[-1]))


lowbit_scores.register_fake(_fake_scores)
lowbit_decode_attention.register_fake(_fake_decode)
if HAS_TRITON:
    _lowbit_scores_ref.register_fake(_fake_scores)
    _lowbit_decode_attention_ref.register_fake(_fake_decode)


@torch.library.custom_op("specache::topk_positions", mutates_args=())
def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    return ref.topk_positions(scores, k)


@topk_positions.register_kernel("cuda")
def _(scores, k):
    return _topk_positions_cuda(scores, k)


@topk_positions.register_fake
def _(scores, k):
    return scores.new_empty((*scores.shape[:2], max(0, min(k, scores.shape[2]))), dtype=torch.int64)


@torch.library.custom_op("specache::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, softmax_scale: float
) -> torch.Tensor:
    return ref.sparse_attention(q, k, v, bias, softmax_scale)


@sparse_attention.register_fake
def _(q, k, v, bias, softmax_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# An explicit mask's elements per SDPA call in exact_attention (2^30: 2 GiB as a bf16 bias). SDPA's CUDA kernels
# take a boolean mask as a bias of the query's dtype, a copy of the mask's whole shape: a one-call prefill of 128K
# tokens (the policies that keep no full-precision KV prefill in one call) would ask for 32 GiB of it. The chunked
# prefill of the decode bench (8K rows against at most 128K columns, batch 1) stays within one call.
EXACT_MASK_ELEMS = 1 << 30


def exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float
) -> torch.Tensor:
    """SDPA over full-precision k, v [B, Hkv, N, D] (GQA through enable_gqa): prefill attention. With an explicit
    mask of more than EXACT_MASK_ELEMS elements that varies along the query rows, SDPA runs over pieces of the query
    rows (and the mask's matching rows): every row's output is the same computation, and no temporary is larger than
    a piece's bias."""
    hq, hkv = q.shape[1], k.shape[1]

    def sdpa(q_, m_):
        return torch.nn.functional.scaled_dot_product_attention(
            q_, k, v, attn_mask=m_, is_causal=is_causal, scale=scale, enable_gqa=hq != hkv
        )

    sq = q.shape[2]
    if mask is None or mask.dim() < 2 or mask.shape[-2] != sq or sq == 1 or mask.numel() <= EXACT_MASK_ELEMS:
        return sdpa(q, mask)
    rows = max(1, EXACT_MASK_ELEMS // (mask.numel() // sq))
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for a in range(0, sq, rows):
        e = min(sq, a + rows)
        out[:, :, a:e] = sdpa(q[:, :, a:e], mask[..., a:e, :])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# select_topk: softmax + GQA mean + top-k, two passes (kernels/triton/select.py)
# ----------------------------------------------------------------------------------------------------------------------

_SELECT_BLOCK = 1024  # columns per step of the row-stats loop
# Both passes are latency-bound at short contexts: with 8192 columns per row-stats program, a pass at 8K would run
# 32 programs, a quarter of an H100/H200's SMs. Smaller pieces: 256 programs per pass at 8K (Llama-3-8B shape, k = 64).
_SELECT_COLS_PER_PART = 2048  # columns per row-stats program
_SELECT_BLOCK_N = 2048  # the largest top-k block (one bitonic sort of this many int64 keys per program)
_SELECT_MAX_CANDIDATES = 8192  # per KV head, for the final torch.topk over the blocks' candidates


def _select_block_n(k: int, s: int) -> int:
    """Positions per top-k block: 4 * k rounded up to a power of two, at least 256, and large enough that the blocks'
    candidates (k each) stay within _SELECT_MAX_CANDIDATES; at most _SELECT_BLOCK_N, no more than the positions there
    are, never fewer than k."""
    want = max(256, 4 * triton.next_power_of_2(k), triton.next_power_of_2(-(-s * k // _SELECT_MAX_CANDIDATES)))
    return max(triton.next_power_of_2(k), min(_SELECT_BLOCK_N, want, triton.next_power_of_2(s)))


def select_topk_reference(logits: torch.Tensor, extra: torch.Tensor, rep: int, k: int) -> torch.Tensor:
    """Positions [B, Hkv, k] (any order) of the k largest ``mean over each group of rep query heads of
    softmax([logits, extra])[:S]``. logits [B, Hq, S] and extra [B, Hq, E] (columns that count in the softmax's
    denominator only, e.g. the window), additive masks already applied (-inf = masked); Hq = Hkv * rep."""
    b, hq, s = logits.shape
    p = torch.softmax(torch.cat([logits, extra], dim=-1).float(), dim=-1)[..., :s]
    p = p.reshape(b, hq // rep, rep, s).mean(dim=2)
    return torch.topk(p, k, dim=-1, sorted=False).indices


def select_topk(logits: torch.Tensor, extra: torch.Tensor, rep: int, k: int) -> torch.Tensor:
    """:func:`select_topk_reference`; on CUDA with Triton, two kernels and a small ``torch.topk`` over the blocks'
    candidates (kernels/triton/select.py). Ties go to the larger position there. The static decode path ranks with
    it (policies/specache_static.py); the default path keeps the unfused selection until bench/kernel_bench.py has
    measured the two side by side."""
    b, hq, s = logits.shape
    if not (HAS_TRITON and (logits.is_cuda or _interpreted())) or not 0 < k <= min(s, _SELECT_BLOCK_N) or hq % rep:
        return select_topk_reference(logits, extra, rep, k)
    hkv, e = hq // rep, extra.shape[-1]
    parts = triton.cdiv(s, _SELECT_COLS_PER_PART)
    chunk = triton.cdiv(s, parts)
    part = torch.empty((b, hq, parts, 2), dtype=torch.float32, device=logits.device)
    wrap_triton(row_stats_kernel)[(parts, hq, b)](
        logits, extra, part, s, e, chunk,
        logits.stride(0), logits.stride(1), logits.stride(2),
        extra.stride(0), extra.stride(1), extra.stride(2),
        parts, BLOCK=min(_SELECT_BLOCK, triton.next_power_of_2(max(s, e, 1))),
    )
    block_n = _select_block_n(k, s)
    n_blocks = triton.cdiv(s, block_n)
    cand_val = torch.empty((b, hkv, n_blocks, k), dtype=torch.float32, device=logits.device)
    cand_idx = torch.empty((b, hkv, n_blocks, k), dtype=torch.int64, device=logits.device)
    wrap_triton(block_topk_kernel)[(n_blocks, hkv, b)](
        logits, part, cand_val, cand_idx, s, parts, hq,
        logits.stride(0), logits.stride(1), logits.stride(2),
        REP=rep, K=k, BLOCK_N=block_n, BLOCK_P=max(2, triton.next_power_of_2(parts)),
    )
    top = torch.topk(cand_val.reshape(b, hkv, -1), k, dim=-1, sorted=False).indices
    return cand_idx.reshape(b, hkv, -1).gather(-1, top)
