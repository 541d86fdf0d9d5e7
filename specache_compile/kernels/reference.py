"""Pure-PyTorch reference kernels for specache: low-bit KV copy, scoring, top-k, gather, sparse attention.

These are the semantics the Triton kernels must reproduce, the CPU implementations behind ``kernels/ops.py`` and
the oracle of the kernel tests. They favour clarity over speed: every function computes in float32 (or wider),
works on CPU and CUDA tensors of any float dtype, and is deterministic (no atomics, stable sorts only).

Layouts
-------
- Activations and caches are ``[B, H, S, D]``: batch, heads, sequence (tokens), head dim.
- GQA: ``Hq`` query heads share ``Hkv`` KV heads, ``Hq % Hkv == 0``; query head ``h`` reads KV head
  ``h // (Hq // Hkv)`` (the ``repeat_interleave`` convention of HF ``repeat_kv``).
- Packed codes: ``b``-bit codes (b in 1, 2, 4) packed along the LAST dim into uint8, ``8 // b`` codes per byte,
  code ``j`` of a byte at bit offset ``j * b`` (little-endian within the byte). ``[..., D]`` codes become
  ``[..., D * b // 8]`` bytes.
- Low-bit keys (KIVI, per channel): each quantization group spans ``group`` consecutive TOKENS of one channel,
  because key outliers live in a few fixed channels; a per-token group would let one outlier channel set the step
  for every channel of the token. codes ``[B, H, S, D*b//8]``, scale/zero ``[B, H, S // group, D]``.
- Low-bit values (KIVI, per token): each group spans ``group`` consecutive CHANNELS of one token (``group`` is
  clamped to ``D``). codes ``[B, H, S, D*b//8]``, scale/zero ``[B, H, S, D // group]``.
- Scale and zero are returned in the input dtype (what the runtime stores: an fp16/bf16 pair per group).

Quantizer (KIVI, Liu et al. 2024; SpeCache, Jie et al., ICML 2025, §3), computed in float32 per group:

- b-bit KIVI, b in (2, 4): ``z = min``, ``s = (max - min) / (2^b - 1)``, ``q = clamp(round((x - z) / s), 0, 2^b - 1)``,
  ``x_hat = z + q * s``.
- 1-bit, SpeCache's modified quantizer: ``z = (3 * min + max) / 4``, ``s = (max - min) / 2``,
  ``q = clamp(round((x - z) / s), 0, 1)``, ``x_hat = z + q * s``. The two levels are the quarter points
  ``(3 min + max) / 4`` and ``(min + 3 max) / 4`` rather than min and max (plain 1-bit KIVI collapses the model).
  The clamp matters: without it ``x = max`` rounds to q = 2.

In both cases ``|x - x_hat| <= s / 2`` (up to the rounding of s and z to the storage dtype). ``round`` is
``torch.round`` (half to even), so a value exactly halfway between two levels takes the even code. A constant group
(``s == 0``) gets q = 0 and reconstructs exactly: there ``z == min == x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "pack_codes",
    "unpack_codes",
    "quantize_keys",
    "quantize_values",
    "dequantize_keys",
    "dequantize_values",
    "lowbit_scores",
    "topk_positions",
    "gather_rows",
    "sparse_attention",
    "fused_decode",
]

_BITS = (1, 2, 4)


# ----------------------------------------------------------------------------------------------------------------------
# argument checks (ValueError: expected, got, fix)
# ----------------------------------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _BITS:
        raise ValueError(f"bits: expected one of {_BITS}, got {bits!r}; fix: pass bits=1, 2 or 4")


def _check_group(group: int, name: str = "group") -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"{name}: expected a positive int, got {group!r}; fix: pass e.g. group=64")


def _check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a floating-point tensor, got {got}; fix: pass fp32, bf16 or fp16")


def _check_ndim(t: Tensor, ndim: int, name: str, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {layout}, got shape {tuple(t.shape)}; fix: reshape to {layout}")


def _check_uint8(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a uint8 tensor of packed codes, got {got}; fix: pass pack_codes' output")


def _gqa_group(hq: int, hkv: int, what: str) -> int:
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(
            f"{what}: expected query heads to be a multiple of KV heads (GQA), got Hq={hq}, Hkv={hkv}; "
            "fix: pass KV tensors with Hkv dividing Hq"
        )
    return hq // hkv


# ----------------------------------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------------------------------


def _pack(codes: Tensor, bits: int) -> Tensor:
    # codes: [..., D] integers already known to lie in [0, 2**bits)
    per = 8 // bits
    d = codes.shape[-1]
    assert d % per == 0
    # int32 so the shifted codes cannot overflow before they are summed into one byte (disjoint bits: sum == OR)
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], d // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``bits``-bit codes along the last dim into uint8: ``[..., D]`` -> ``[..., D * bits // 8]``.

    Code ``j`` of each byte sits at bit offset ``j * bits``. ``D`` must be divisible by ``8 // bits``. Values must
    lie in ``[0, 2**bits)``; the check costs a host sync, which is fine for a reference.
    """
    # codes: [..., D]
    _check_bits(bits)
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise ValueError(f"codes: expected an integer tensor, got {got}; fix: pass codes.to(torch.uint8)")
    if codes.dim() == 0:
        raise ValueError("codes: expected at least 1 dim [..., D], got a 0-d tensor; fix: pass codes[None]")
    per = 8 // bits
    d = codes.shape[-1]
    if d % per != 0:
        raise ValueError(
            f"codes: expected the last dim divisible by 8 // bits = {per} for bits={bits}, got D={d}; "
            f"fix: pad the last dim to a multiple of {per}"
        )
    if codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"codes: expected values in [0, {1 << bits}) for bits={bits}, got range [{lo}, {hi}]; "
                "fix: clamp the codes or raise bits"
            )
    return _pack(codes, bits)


def unpack_codes(packed: Tensor, bits: int, d: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``[..., d * bits // 8]`` uint8 -> ``[..., d]`` uint8 codes."""
    # packed: [..., d * bits // 8]
    _check_bits(bits)
    _check_uint8(packed, "packed")
    per = 8 // bits
    if isinstance(d, bool) or not isinstance(d, int) or d < 0 or d % per != 0:
        raise ValueError(
            f"d: expected a non-negative int divisible by 8 // bits = {per}, got {d!r}; fix: pass the unpacked D"
        )
    if packed.dim() == 0 or packed.shape[-1] != d // per:
        raise ValueError(
            f"packed: expected last dim d * bits // 8 = {d // per}, got shape {tuple(packed.shape)}; "
            "fix: pass the d and bits the codes were packed with"
        )
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], d).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# KIVI quantization
# ----------------------------------------------------------------------------------------------------------------------


def _quantize_groups(x: Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    # x: float32, groups reduced along `dim`; returns (codes like x as uint8, scale, zero) with `dim` kept as size 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    if bits == 1:
        # SpeCache's modified 1-bit quantizer: levels at the quarter points of [min, max]
        zero = (3.0 * lo + hi) / 4.0
        scale = (hi - lo) / 2.0
    else:
        zero = lo
        scale = (hi - lo) / float((1 << bits) - 1)
    # Round scale/zero to the storage dtype FIRST and pick codes against the rounded values, so dequantization with
    # the stored pair is what the codes were chosen for (otherwise bf16 rounding of s would add to every error).
    zero = zero.to(dtype).float()
    scale = scale.to(dtype).float()
    # s == 0 (a constant group, or a range below the storage dtype's resolution): q = 0 and x_hat = z, which is
    # exactly x for a constant group because z == min (bits > 1) or z == (3x + x)/4 == x (bits == 1).
    nonzero = scale > 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    q = torch.round((x - zero) / safe).clamp_(0, (1 << bits) - 1)
    q = torch.where(nonzero, q, torch.zeros_like(q))
    return q.to(torch.uint8), scale.to(dtype), zero.to(dtype)


def quantize_keys(k: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """KIVI per-channel key quantization: each group is ``group`` consecutive tokens of one channel.

    Returns ``(packed [B, H, S, D*bits//8] uint8, scale [B, H, S//group, D], zero [B, H, S//group, D])`` with
    scale/zero in ``k.dtype``. Requires ``S % group == 0``: the runtime quantizes keys only in whole token groups and
    keeps the ragged tail in its full-precision window.
    """
    # k: [B, H, S, D]
    _check_float(k, "k")
    _check_ndim(k, 4, "k", "[B, H, S, D]")
    _check_bits(bits)
    _check_group(group)
    b, h, s, d = k.shape
    if s % group != 0:
        raise ValueError(
            f"k: expected the token dim S divisible by group={group}, got S={s}; "
            "fix: quantize only whole groups of tokens and keep the tail in full precision"
        )
    per = 8 // bits
    if d % per != 0:
        raise ValueError(
            f"k: expected head dim D divisible by 8 // bits = {per}, got D={d}; fix: use a head dim that packs evenly"
        )
    x = k.float().reshape(b, h, s // group, group, d)
    q, scale, zero = _quantize_groups(x, bits, dim=3, dtype=k.dtype)
    packed = _pack(q.reshape(b, h, s, d), bits)
    return packed, scale.squeeze(3), zero.squeeze(3)


def quantize_values(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """KIVI per-token value quantization: each group is ``group`` consecutive channels of one token.

    ``group`` is clamped to ``D`` (so a large group means one group per token). Returns
    ``(packed [B, H, S, D*bits//8] uint8, scale [B, H, S, D//group], zero [B, H, S, D//group])`` in ``v.dtype``.
    """
    # v: [B, H, S, D]
    _check_float(v, "v")
    _check_ndim(v, 4, "v", "[B, H, S, D]")
    _check_bits(bits)
    _check_group(group)
    b, h, s, d = v.shape
    g = min(group, d)
    if d % g != 0:
        raise ValueError(f"v: expected head dim D divisible by group={g}, got D={d}; fix: pass a group that divides D")
    per = 8 // bits
    if d % per != 0:
        raise ValueError(
            f"v: expected head dim D divisible by 8 // bits = {per}, got D={d}; fix: use a head dim that packs evenly"
        )
    x = v.float().reshape(b, h, s, d // g, g)
    q, scale, zero = _quantize_groups(x, bits, dim=4, dtype=v.dtype)
    packed = _pack(q.reshape(b, h, s, d), bits)
    return packed, scale.squeeze(4), zero.squeeze(4)


def _check_dequant_args(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, dtype) -> int:
    _check_bits(bits)
    _check_group(group)
    _check_uint8(packed, "packed")
    _check_ndim(packed, 4, "packed", "[B, H, S, D*bits//8]")
    _check_float(scale, "scale")
    _check_float(zero, "zero")
    if scale.shape != zero.shape:
        raise ValueError(
            f"zero: expected the shape of scale {tuple(scale.shape)}, got {tuple(zero.shape)}; "
            "fix: pass the scale and zero returned by the same quantize call"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}; fix: pass e.g. torch.bfloat16")
    return packed.shape[-1] * 8 // bits


def dequantize_keys(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, dtype) -> Tensor:
    """Inverse of :func:`quantize_keys`: ``x_hat = zero + code * scale`` in float32, as ``[B, H, S, D]`` dtype."""
    # packed: [B, H, S, D*bits//8]; scale, zero: [B, H, S//group, D]
    d = _check_dequant_args(packed, scale, zero, bits, group, dtype)
    b, h, s, _ = packed.shape
    if s % group != 0 or tuple(scale.shape) != (b, h, s // group, d):
        raise ValueError(
            f"scale: expected shape [B, H, S // group, D] = [{b}, {h}, {s}/{group}, {d}] for per-channel keys "
            f"(S divisible by group), got {tuple(scale.shape)} (packed {tuple(packed.shape)}); "
            "fix: pass the group and bits used by quantize_keys"
        )
    codes = unpack_codes(packed, bits, d).float().reshape(b, h, s // group, group, d)
    x = zero.float().unsqueeze(3) + codes * scale.float().unsqueeze(3)
    return x.reshape(b, h, s, d).to(dtype)


def dequantize_values(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, dtype) -> Tensor:
    """Inverse of :func:`quantize_values`: ``x_hat = zero + code * scale`` in float32, as ``[B, H, S, D]`` dtype."""
    # packed: [B, H, S, D*bits//8]; scale, zero: [B, H, S, D//group]
    d = _check_dequant_args(packed, scale, zero, bits, group, dtype)
    b, h, s, _ = packed.shape
    g = min(group, d)
    if d % g != 0 or tuple(scale.shape) != (b, h, s, d // g):
        raise ValueError(
            f"scale: expected shape {(b, h, s, d // g)} for per-token values with group={g}, "
            f"got {tuple(scale.shape)} (packed {tuple(packed.shape)}); fix: pass the group and bits used by "
            "quantize_values"
        )
    codes = unpack_codes(packed, bits, d).float().reshape(b, h, s, d // g, g)
    x = zero.float().unsqueeze(4) + codes * scale.float().unsqueeze(4)
    return x.reshape(b, h, s, d).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# scoring, selection, gather, attention
# ----------------------------------------------------------------------------------------------------------------------


def lowbit_scores(
    q: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, bits: int, group: int, softmax_scale: float
) -> Tensor:
    """float32 attention logits of ``q`` against the low-bit keys: ``softmax_scale * q @ dequant(K)^T``.

    Returns ``[B, Hq, Sq, S]``. The reference dequantizes the whole key copy; a kernel reads the packed bits. On
    CUDA the float32 matmul follows ``torch.backends.cuda.matmul`` (TF32 if the caller enabled it).
    """
    # q: [B, Hq, Sq, D]; packed: [B, Hkv, S, D*bits//8]; scale, zero: [B, Hkv, S//group, D]
    _check_float(q, "q")
    _check_ndim(q, 4, "q", "[B, Hq, Sq, D]")
    k = dequantize_keys(packed, scale, zero, bits, group, torch.float32)  # [B, Hkv, S, D]
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"packed: expected keys [B={b}, Hkv, S, D={d}] after unpacking, got {tuple(k.shape)}; "
            "fix: pass keys of the same batch and head dim as q"
        )
    hkv, s = k.shape[1], k.shape[2]
    rep = _gqa_group(hq, hkv, "lowbit_scores")
    # Query head h = kv * rep + r, so a plain reshape groups the rep query heads of each KV head without copying K.
    qg = q.float().reshape(b, hkv, rep * sq, d)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * float(softmax_scale)  # [B, Hkv, rep*Sq, S]
    return logits.reshape(b, hq, sq, s)


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest scores per row, sorted ascending by position: ``[B, Hkv, min(k, S)]`` int64.

    Tie rule: among equal scores the lower position wins (a stable descending sort), so the result is deterministic
    and identical on every device. -inf scores are only chosen once every finite score is taken. NaN scores are
    treated as -inf (never preferred over a real score). ``k <= 0`` returns an empty ``[B, Hkv, 0]`` tensor.
    """
    # scores: [B, Hkv, S]
    _check_float(scores, "scores")
    _check_ndim(scores, 3, "scores", "[B, Hkv, S]")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k: expected an int, got {k!r}; fix: pass k as a Python int")
    b, h, s = scores.shape
    kk = max(0, min(k, s))
    if kk == 0:
        return torch.empty(b, h, 0, dtype=torch.int64, device=scores.device)
    # Upcast (exactly) so sort has one well-supported dtype everywhere; NaN -> -inf so it never outranks a score.
    x = scores.to(torch.promote_types(scores.dtype, torch.float32))
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :kk]
    return torch.sort(order, dim=-1).values


def gather_rows(src: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
    """Rows of ``src`` at positions ``idx``: ``[B, H, K, D]`` on ``out``'s device (``src``'s if ``out`` is None).

    ``src`` may live in host memory while ``out`` is on the GPU: the gather runs where ``src`` lives and only the
    ``K`` selected rows cross the bus. ``idx`` may be on any device. Out-of-range positions raise ValueError
    when the gather runs on the CPU (the check is free there); on CUDA they hit torch.gather's device-side assert
    instead, because a Python-side check would cost a host sync on the decode path.
    ``out``, if given, must have shape ``[B, H, K, D]`` and ``src``'s dtype; it is written and returned.
    """
    # src: [B, H, S, D]; idx: [B, H, K] int64
    _check_ndim(src, 4, "src", "[B, H, S, D]")
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx: expected an int64 tensor [B, H, K], got {got}; fix: pass topk_positions' output")
    _check_ndim(idx, 3, "idx", "[B, H, K]")
    b, h, s, d = src.shape
    if idx.shape[0] != b or idx.shape[1] != h:
        raise ValueError(
            f"idx: expected shape [B={b}, H={h}, K], got {tuple(idx.shape)}; fix: index with one row list per head"
        )
    kk = idx.shape[2]
    if out is not None:
        if tuple(out.shape) != (b, h, kk, d) or out.dtype != src.dtype:
            raise ValueError(
                f"out: expected shape {(b, h, kk, d)} and dtype {src.dtype}, got {tuple(out.shape)} {out.dtype}; "
                "fix: allocate out like src with K rows"
            )
    idx = idx.to(device=src.device, dtype=torch.int64)
    # NOTE: CPU only. int(idx.min()) on a CUDA tensor would synchronize the host with the device on every step.
    if idx.device.type == "cpu" and idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= s:
            raise ValueError(
                f"idx: expected positions in [0, {s}), got range [{lo}, {hi}]; fix: clamp or filter the positions"
            )
    rows = torch.gather(src, 2, idx.unsqueeze(-1).expand(b, h, kk, d))  # [B, H, K, D] on src's device
    if out is None:
        return rows
    out.copy_(rows)
    return out


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, softmax_scale: float) -> Tensor:
    """Softmax attention of ``q`` over the ``N`` selected keys/values, in float32, cast to ``q.dtype``.

    ``bias`` is an additive float mask broadcastable to ``[B, Hq, Sq, N]`` (-inf = masked) or None. A query row whose
    keys are all masked returns zeros instead of NaN (no key attended, nothing contributed), and ``N == 0`` returns
    zeros: a policy may select nothing for a head. Returns ``[B, Hq, Sq, Dv]``.
    """
    # q: [B, Hq, Sq, D]; k: [B, Hkv, N, D]; v: [B, Hkv, N, Dv]; bias: broadcastable to [B, Hq, Sq, N]
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_float(t, name)
    _check_ndim(q, 4, "q", "[B, Hq, Sq, D]")
    _check_ndim(k, 4, "k", "[B, Hkv, N, D]")
    _check_ndim(v, 4, "v", "[B, Hkv, N, Dv]")
    b, hq, sq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    dv = v.shape[3]
    if k.shape[0] != b or k.shape[3] != d or tuple(v.shape[:3]) != (b, hkv, n):
        raise ValueError(
            f"k, v: expected k [B={b}, Hkv, N, D={d}] and v [B={b}, Hkv, N, Dv] with matching Hkv and N, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}; fix: pass k and v selected with the same positions"
        )
    rep = _gqa_group(hq, hkv, "sparse_attention")
    if bias is not None:
        _check_float(bias, "bias")
        try:
            shape = torch.broadcast_shapes(bias.shape, (b, hq, sq, n))
        except RuntimeError:
            shape = None
        if shape != (b, hq, sq, n):
            raise ValueError(
                f"bias: expected a shape broadcastable to {(b, hq, sq, n)}, got {tuple(bias.shape)}; "
                "fix: pass an additive mask with size-1 or matching dims"
            )
    if n == 0:
        return torch.zeros(b, hq, sq, dv, dtype=q.dtype, device=q.device)

    qg = q.float().reshape(b, hkv, rep * sq, d)  # query head h = kv * rep + r (see lowbit_scores)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * float(softmax_scale)  # [B, Hkv, rep*Sq, N]
    logits = logits.reshape(b, hq, sq, n)
    if bias is not None:
        logits = logits + bias.float()
    # Safe softmax: subtract a finite row max so a fully masked row (max = -inf) gives exp(-inf) = 0, not NaN.
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)  # [B, Hq, Sq, N]
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.reshape(b, hkv, rep * sq, n), v.float()).reshape(b, hq, sq, dv)
    # denom == 0 only for fully masked rows, whose numerator is 0 too: return 0 there.
    out = torch.where(denom > 0, out / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(out))
    return out.to(q.dtype)


def fused_decode(
    q: Tensor, kq: Tensor, ks: Tensor, kz: Tensor, vq: Tensor, vs: Tensor, vz: Tensor, bits: int, group: int, lo: int,
    k_fp: Tensor, v_fp: Tensor, fp_pos: Tensor, k_win: Tensor, v_win: Tensor, win_pos: Tensor, bias: Tensor | None,
    limit: Tensor | None, softmax_scale: float, rank_row: int, k: int, attend: bool = True,
) -> tuple[Tensor, Tensor]:
    """One decode step of one layer over a low-bit copy: attention of every query row, and the top-k of one row.

    Computed in float32 (float64 for float64 inputs).

    Attention (``[B, Hq, Sq, Dv]`` in ``q.dtype``; ``[B, Hq, Sq, 0]`` when ``attend`` is False), per (batch, KV head)
    over:

    - each low-bit position ``p`` in ``[lo, hi)`` not listed in ``fp_pos``, through its dequantized key and value
      (float32). ``hi = min(nq, lo + W)`` with a bias (``nq``: rows of the copy), ``nq`` without, and below ``limit``
      (an int64 device scalar, e.g. the tokens quantized so far; None: no limit);
    - the fetched rows ``k_fp``/``v_fp`` at positions ``fp_pos`` and the window ``k_win``/``v_win`` at ``win_pos``,
      each where its position is ``>= lo`` (and ``< lo + W`` with a bias): ``-1`` pads. Window positions must not
      be low-bit positions below ``limit`` (they would count twice).

    ``bias``: additive float mask broadcastable to ``[B, Hq, Sq, W]`` over positions ``[lo, lo + W)``, applied to
    every column by its position. A row with nothing attended is zeros.

    Ranking (``rank_row`` >= 0): row ``rank_row`` of each query head, softmax over its logits at every low-bit
    position of ``[lo, hi)`` below ``limit`` (substituted ones too, through their low-bit keys) and at the window
    columns, averaged over the ``Hq / Hkv`` heads of each GQA group; returns the ``k`` low-bit positions of largest
    mean probability, int64 ``[B, Hkv, k]`` in any order, ``-1`` where fewer than ``k`` positions have a nonzero
    probability. ``rank_row < 0``: ``[B, Hkv, 0]``.

    This is what the static decode path computes per layer per step (policies/specache_static.py): attention with
    the previous step's top-k substituted, and the speculative row's top-k for the next step's prefetch.
    """
    # q: [B, Hq, Sq, D]; kq: [B, Hkv, nq, D*bits//8]; ks, kz: [B, Hkv, nq//group, D]; vq: [B, Hkv, nq, Dv*bits//8];
    # vs, vz: [B, Hkv, nq, Dv//min(group, Dv)]; k_fp: [B, Hkv, F, D]; v_fp: [B, Hkv, F, Dv]; fp_pos: [B, Hkv, F];
    # k_win: [B, Hkv, Fw, D]; v_win: [B, Hkv, Fw, Dv]; win_pos: [B, Hkv, Fw]
    _check_float(q, "q")
    _check_ndim(q, 4, "q", "[B, Hq, Sq, D]")
    b, hq, sq, d = q.shape
    hkv, nq = kq.shape[1], kq.shape[2]
    rep = _gqa_group(hq, hkv, "fused_decode")
    dv = v_fp.shape[-1]
    w = None if bias is None else bias.shape[-1]
    hi = nq if w is None else min(nq, lo + w)
    n_low = max(0, hi - lo)
    dev = q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 inputs: a float64 oracle
    g0, g1 = lo // group, -(-hi // group)
    if n_low > 0:
        k_low = dequantize_keys(kq[:, :, g0 * group : g1 * group], ks[:, :, g0:g1], kz[:, :, g0:g1], bits, group,
                                ct)[:, :, lo - g0 * group : hi - g0 * group]
        v_low = dequantize_values(vq[:, :, lo:hi], vs[:, :, lo:hi], vz[:, :, lo:hi], bits, group, ct)
    else:
        k_low = torch.zeros((b, hkv, 0, d), dtype=ct, device=dev)
        v_low = torch.zeros((b, hkv, 0, dv), dtype=ct, device=dev)
    low_pos = torch.arange(lo, lo + n_low, device=dev)
    low_ok = low_pos < limit.to(dev).reshape(()) if limit is not None else torch.ones_like(low_pos, dtype=torch.bool)
    low_ok = low_ok.expand(b, hkv, n_low)
    # substitution: low-bit positions listed in fp_pos
    listed = torch.zeros((b, hkv, nq + 1), dtype=torch.bool, device=dev)
    fpl = fp_pos.long()
    listed.scatter_(2, torch.where((fpl >= 0) & (fpl < nq), fpl, torch.full_like(fpl, nq)), True)
    keep_low = low_ok & ~listed[:, :, lo : lo + n_low]

    def col_ok(pos):
        pos = pos.long()
        ok = pos >= lo
        return ok & (pos < lo + w) if w is not None else ok

    keep_fp, keep_win = col_ok(fp_pos), col_ok(win_pos)
    kk = torch.cat([k_low, k_fp.to(ct), k_win.to(ct)], dim=2)  # [B, Hkv, N, D], N = n_low + F + Fw
    vv = torch.cat([v_low, v_fp.to(ct), v_win.to(ct)], dim=2)
    pos = torch.cat([low_pos.expand(b, hkv, n_low), fpl, win_pos.long()], dim=2)
    logits = (float(softmax_scale) * q.to(ct).reshape(b, hkv, rep * sq, d) @ kk.transpose(-1, -2))
    logits = logits.reshape(b, hkv, rep, sq, -1)
    if bias is not None:
        be = bias.to(ct).expand(b, hq, sq, w).reshape(b, hkv, rep, sq, w)
        idx = (pos - lo).clamp(0, max(w - 1, 0))[:, :, None, None, :].expand(b, hkv, rep, sq, pos.shape[-1])
        logits = logits + (be.gather(4, idx) if w > 0 else torch.zeros_like(logits))

    def softmax(x, keep):
        # safe softmax over the last dim of x [..., N] with keep broadcast to it: fully masked rows give zeros
        x = x.masked_fill(~keep, float("-inf"))
        mx = x.amax(dim=-1, keepdim=True)
        p = torch.exp(x - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
        den = p.sum(dim=-1, keepdim=True)
        return torch.where(den > 0, p / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(p))

    if attend:
        keep = torch.cat([keep_low, keep_fp, keep_win], dim=2)[:, :, None, None, :]
        out = (softmax(logits, keep) @ vv[:, :, None]).reshape(b, hq, sq, dv).to(q.dtype)
    else:
        out = q.new_zeros((b, hq, sq, 0))
    if rank_row < 0:
        return out, torch.empty((b, hkv, 0), dtype=torch.int64, device=dev)
    keep_r = torch.cat([low_ok, torch.zeros_like(keep_fp), keep_win], dim=2)[:, :, None, :]
    prob = softmax(logits[:, :, :, rank_row], keep_r)[..., :n_low].mean(dim=2)  # [B, Hkv, n_low]
    top = torch.full((b, hkv, k), -1, dtype=torch.int64, device=dev)
    kk_ = min(k, n_low)
    if kk_ > 0:
        val, i = torch.topk(prob, kk_, dim=-1)
        top[..., :kk_] = torch.where(val > 0, i + lo, torch.full_like(i, -1))
    return out, top
