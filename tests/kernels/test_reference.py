"""Tests of specache_compile/kernels/reference.py, the pure-torch oracle the Triton kernels are held to.

Every check compares against something computed independently: hand-packed bytes, a float64 quantizer bound,
float64 attention, brute-force top-k, fancy indexing, and torch's own SDPA at the test dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from specache_compile.kernels.reference import (
    dequantize_keys,
    dequantize_values,
    gather_rows,
    lowbit_scores,
    pack_codes,
    quantize_keys,
    quantize_values,
    sparse_attention,
    topk_positions,
    unpack_codes,
)

# House rule (shared/STYLE.md): ours may err at most this many times the eager reference at the test dtype, both
# measured against a float64 oracle. The one tolerance table of this file.
EAGER_FACTOR = {torch.float32: 10.0, torch.bfloat16: 1.1, torch.float16: 1.1}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [1, 2, 4]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# pack / unpack
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(16,), (3, 5, 64), (2, 1, 7, 128)])
def test_pack_unpack_roundtrip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=_gen(bits), dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    back = unpack_codes(packed, bits, shape[-1])
    assert back.dtype == torch.uint8
    assert torch.equal(back.long(), codes)


@pytest.mark.parametrize(
    "bits, codes, byte",
    [
        (1, [1, 0, 1, 1, 0, 0, 0, 1], 0b10001101),  # code j at bit j
        (2, [1, 2, 3, 0], 1 | 2 << 2 | 3 << 4),  # code j at bits 2j..2j+1
        (4, [0xA, 0x3], 0x3A),  # low nibble first
    ],
)
def test_pack_bit_layout_is_little_endian(bits, codes, byte):
    packed = pack_codes(torch.tensor([codes, codes[::-1]], dtype=torch.uint8), bits)
    assert packed[0].tolist() == [byte]
    # reversed codes give a different byte: the layout is not symmetric by accident
    assert unpack_codes(packed, bits, len(codes))[1].tolist() == codes[::-1]


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="divisible"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([0, 1, 2, 4]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.zeros(8), 1)
    with pytest.raises(ValueError, match="last dim"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 16)


# ----------------------------------------------------------------------------------------------------------------------
# KIVI quantization
# ----------------------------------------------------------------------------------------------------------------------


def _levels(bits: int) -> int:
    return 2**bits - 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("which", ["keys", "values"])
def test_quantize_error_bounded_by_half_step(which, bits, dtype):
    b, h, s, d, group = 2, 3, 64, 64, 32
    x = (_randn(b, h, s, d, seed=10 + bits) * 2 + 0.5).to(dtype)
    if which == "keys":
        packed, scale, zero = quantize_keys(x, bits, group)
        assert scale.shape == zero.shape == (b, h, s // group, d)
        x_hat = dequantize_keys(packed, scale, zero, bits, group, torch.float32)
        s_el = scale.float().repeat_interleave(group, dim=2)  # [B, H, S, D]: each token's step
        z_el = zero.float().repeat_interleave(group, dim=2)
    else:
        packed, scale, zero = quantize_values(x, bits, group)
        assert scale.shape == zero.shape == (b, h, s, d // group)
        x_hat = dequantize_values(packed, scale, zero, bits, group, torch.float32)
        s_el = scale.float().repeat_interleave(group, dim=3)
        z_el = zero.float().repeat_interleave(group, dim=3)
    assert packed.shape == (b, h, s, d * bits // 8) and packed.dtype == torch.uint8
    assert scale.dtype == zero.dtype == dtype
    err = (x_hat.double() - x.double()).abs()
    # s/2 is the quantizer's bound; the slack covers only storing s and z in `dtype` (values past the rounded range
    # clamp to the end level), which is a few ulps, far below s/2.
    eps = torch.finfo(dtype).eps
    tol = s_el.double() / 2 + eps * (z_el.double().abs() + _levels(bits) * s_el.double()) + 1e-6
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    # the bound is not vacuous: the steps are a real fraction of the data range
    assert s_el.max() < x.float().abs().max()
    # dequantize in the storage dtype is the float32 result rounded once
    x_hat_dt = (dequantize_keys if which == "keys" else dequantize_values)(packed, scale, zero, bits, group, dtype)
    assert x_hat_dt.dtype == dtype and torch.equal(x_hat_dt, x_hat.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_bit_levels_are_quarter_points(dtype):
    # one group in [0, 4]: z = (3*0 + 4)/4 = 1, s = (4 - 0)/2 = 2, levels 1 and 3; threshold at the midpoint 2
    vals = torch.tensor([0.0, 0.5, 1.0, 1.9, 2.1, 3.0, 3.5, 4.0])
    expect = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    # keys: the group runs along tokens of one channel
    k = torch.zeros(1, 1, 8, 8)
    k[0, 0, :, 2] = vals
    packed, scale, zero = quantize_keys(k.to(dtype), 1, 8)
    assert scale[0, 0, 0, 2].item() == 2.0 and zero[0, 0, 0, 2].item() == 1.0
    k_hat = dequantize_keys(packed, scale, zero, 1, 8, torch.float32)
    assert torch.equal(k_hat[0, 0, :, 2], expect)
    assert torch.equal(k_hat[0, 0, :, 0], torch.zeros(8))  # a constant channel stays exact
    # values: the group runs along channels of one token
    v = torch.zeros(1, 1, 2, 8)
    v[0, 0, 1] = vals
    packed, scale, zero = quantize_values(v.to(dtype), 1, 8)
    assert scale[0, 0, 1, 0].item() == 2.0 and zero[0, 0, 1, 0].item() == 1.0
    assert torch.equal(dequantize_values(packed, scale, zero, 1, 8, torch.float32)[0, 0, 1], expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_constant_groups_reconstruct_exactly(bits, dtype):
    x = _randn(1, 2, 32, 16, seed=3, dtype=dtype)
    # keys: channel 5 constant over the second token group (16..31); values: token 7 constant over channels 8..15
    x[:, :, 16:, 5] = 0.3
    x[:, :, 7, 8:] = -1.7
    x[1:, :, :, :] = 0
    k_hat = dequantize_keys(*quantize_keys(x, bits, 16), bits, 16, dtype)
    assert torch.equal(k_hat[:, :, 16:, 5], x[:, :, 16:, 5])
    v_hat = dequantize_values(*quantize_values(x, bits, 8), bits, 8, dtype)
    assert torch.equal(v_hat[:, :, 7, 8:], x[:, :, 7, 8:])
    # an all-zero tensor (every group constant) round-trips exactly too
    z = torch.zeros(1, 1, 16, 16, dtype=dtype)
    assert torch.equal(dequantize_keys(*quantize_keys(z, bits, 16), bits, 16, dtype), z)
    assert torch.equal(dequantize_values(*quantize_values(z, bits, 16), bits, 16, dtype), z)


@pytest.mark.parametrize("bits", [2, 4])
def test_key_groups_run_along_tokens(bits):
    # A wild outlier channel (std 100) must not touch the other channels: per-channel groups isolate it, whereas any
    # per-token group would contain it and give every channel a step of ~100 / (2^b - 1).
    b, h, s, d, group = 1, 2, 64, 16, 32
    k = _randn(b, h, s, d, seed=4) * 0.1
    k[..., 3] = _randn(b, h, s, seed=5) * 100
    packed, scale, zero = quantize_keys(k, bits, group)
    err = (dequantize_keys(packed, scale, zero, bits, group, torch.float32) - k).abs()
    normal = torch.ones(d, dtype=torch.bool)
    normal[3] = False
    assert err[..., normal].max() < 0.2
    # scale/zero of every (token group, channel) from the definition, slice by slice
    for g in range(s // group):
        for c in range(d):
            col = k[0, 1, g * group : (g + 1) * group, c]
            assert scale[0, 1, g, c].item() == pytest.approx((col.max() - col.min()).item() / _levels(bits), rel=1e-6)
            assert zero[0, 1, g, c].item() == col.min().item()


@pytest.mark.parametrize("bits", [2, 4])
def test_value_groups_run_along_channels(bits):
    # Mirror image: a wild outlier token must not touch the other tokens under per-token value groups.
    b, h, s, d, group = 1, 2, 32, 64, 32
    v = _randn(b, h, s, d, seed=6) * 0.1
    v[:, :, 9, :] = _randn(b, h, d, seed=7) * 100
    packed, scale, zero = quantize_values(v, bits, group)
    err = (dequantize_values(packed, scale, zero, bits, group, torch.float32) - v).abs()
    normal = torch.ones(s, dtype=torch.bool)
    normal[9] = False
    assert err[:, :, normal].max() < 0.2
    for t in range(s):
        for g in range(d // group):
            row = v[0, 0, t, g * group : (g + 1) * group]
            assert scale[0, 0, t, g].item() == pytest.approx((row.max() - row.min()).item() / _levels(bits), rel=1e-6)
            assert zero[0, 0, t, g].item() == row.min().item()


def test_value_group_clamped_to_head_dim():
    v = _randn(1, 1, 4, 16, seed=8)
    packed, scale, zero = quantize_values(v, 2, 64)  # group 64 > D = 16: one group per token
    assert scale.shape == (1, 1, 4, 1)
    assert torch.equal(zero[..., 0], v.amin(dim=-1))
    assert dequantize_values(packed, scale, zero, 2, 64, torch.float32).shape == v.shape


def test_quantize_errors():
    with pytest.raises(ValueError, match="divisible by group"):
        quantize_keys(torch.zeros(1, 1, 17, 16), 2, 16)
    with pytest.raises(ValueError, match="divisible by group"):
        quantize_values(torch.zeros(1, 1, 4, 48), 2, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(torch.zeros(1, 1, 16, 16), 8, 16)
    with pytest.raises(ValueError, match="floating"):
        quantize_values(torch.zeros(1, 1, 4, 16, dtype=torch.int32), 2, 16)
    with pytest.raises(ValueError, match="4 dims"):
        quantize_keys(torch.zeros(16, 16), 2, 16)
    packed, scale, zero = quantize_keys(torch.zeros(1, 1, 32, 16), 2, 16)
    with pytest.raises(ValueError, match="scale"):
        dequantize_keys(packed, scale, zero, 2, 8, torch.float32)  # wrong group


# ----------------------------------------------------------------------------------------------------------------------
# low-bit scores
# ----------------------------------------------------------------------------------------------------------------------


def _unpack64(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # independent unpack: peel the codes off each byte one at a time, in float64
    p = packed.long()
    codes = [(p >> (j * bits)) & (2**bits - 1) for j in range(8 // bits)]
    return torch.stack(codes, dim=-1).flatten(-2).double()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("s", [1, 17, 64])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_lowbit_scores_match_float64(gqa, d, s, bits):
    b, hkv, sq = 2, 2, 3
    hq = hkv * gqa
    group = s if s < 32 else 32  # keys quantize whole token groups only
    q = _randn(b, hq, sq, d, seed=s + d)
    k = _randn(b, hkv, s, d, seed=s + d + 1)
    packed, scale, zero = quantize_keys(k, bits, group)
    sm = 1.0 / math.sqrt(d)
    ours = lowbit_scores(q, packed, scale, zero, bits, group, sm)
    assert ours.dtype == torch.float32 and ours.shape == (b, hq, sq, s)
    # float64 oracle: unpack, expand each group's scale/zero over its tokens, repeat KV heads for GQA
    k_hat = _unpack64(packed, bits) * scale.double().repeat_interleave(group, 2) + zero.double().repeat_interleave(
        group, 2
    )
    k_rep = k_hat.repeat_interleave(gqa, dim=1)  # query head h reads KV head h // gqa
    ref = sm * q.double() @ k_rep.transpose(-1, -2)
    # float32 dot products of length d: error <= ~d * eps32 * sum|q_i k_i|
    bound = 2 * d * torch.finfo(torch.float32).eps * (sm * q.double().abs() @ k_rep.abs().transpose(-1, -2)) + 1e-12
    assert ((ours.double() - ref).abs() <= bound).all()
    # and the low-bit copy matters: a wrong GQA mapping (tile instead of interleave) would not pass
    if gqa > 1:
        wrong = sm * q.double() @ k_hat.repeat(1, gqa, 1, 1).transpose(-1, -2)
        assert not torch.allclose(ours.double(), wrong, atol=1e-3)


def test_lowbit_scores_bf16_query():
    q = _randn(1, 4, 2, 64, seed=20, dtype=torch.bfloat16)
    packed, scale, zero = quantize_keys(_randn(1, 2, 32, 64, seed=21, dtype=torch.bfloat16), 2, 32)
    ours = lowbit_scores(q, packed, scale, zero, 2, 32, 0.125)
    k_hat = dequantize_keys(packed, scale, zero, 2, 32, torch.float64).repeat_interleave(2, 1)
    ref = 0.125 * q.double() @ k_hat.transpose(-1, -2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_lowbit_scores_rejects_bad_gqa():
    packed, scale, zero = quantize_keys(torch.zeros(1, 3, 16, 64), 2, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        lowbit_scores(torch.zeros(1, 4, 1, 64), packed, scale, zero, 2, 16, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------------------------------


def _topk_brute(scores: torch.Tensor, k: int) -> list[list[list[int]]]:
    # highest score first, lower position first among ties, NaN ranked as -inf; then sorted by position
    out = []
    for row_b in scores.double().tolist():
        out.append([])
        for row in row_b:
            key = [(-(x if not math.isnan(x) else -math.inf), i) for i, x in enumerate(row)]
            out[-1].append(sorted(i for _, i in sorted(key)[: max(0, k)]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s", [1, 17, 64])
@pytest.mark.parametrize("k", [-1, 0, 1, 5, 17, 100])
def test_topk_matches_brute_force(k, s, dtype):
    b, h = 2, 3
    # few distinct values so ties are everywhere, plus -inf entries (more than k in some rows)
    scores = torch.randint(0, 4, (b, h, s), generator=_gen(s)).to(dtype)
    neg = torch.rand(b, h, s, generator=_gen(s + 1)) < 0.4
    scores[neg] = float("-inf")
    scores[0, 0] = float("-inf")  # a row of only -inf: positions in order
    ours = topk_positions(scores, k)
    assert ours.dtype == torch.int64 and ours.shape == (b, h, max(0, min(k, s)))
    assert ours.tolist() == _topk_brute(scores, k)


def test_topk_tie_rule_and_inf():
    scores = torch.tensor([[[1.0, 3.0, 3.0, float("-inf"), 3.0, 2.0, float("nan"), 3.0]]])
    assert topk_positions(scores, 2).tolist() == [[[1, 2]]]  # four 3.0s: the two lowest positions win
    assert topk_positions(scores, 6).tolist() == [[[0, 1, 2, 4, 5, 7]]]
    # -inf and NaN come last; between them the lower position wins
    assert topk_positions(scores, 7).tolist() == [[[0, 1, 2, 3, 4, 5, 7]]]
    assert topk_positions(torch.tensor([[[float("inf"), 0.0, float("inf")]]]), 1).tolist() == [[[0]]]


# ----------------------------------------------------------------------------------------------------------------------
# gather
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_out", [False, True])
def test_gather_rows_matches_fancy_indexing(with_out, dtype):
    b, h, s, d, kk = 2, 3, 40, 16, 9
    src = _randn(b, s, h, d, seed=30, dtype=dtype).transpose(1, 2)  # non-contiguous [B, H, S, D]
    assert not src.is_contiguous()
    idx = torch.randint(0, s, (b, h, kk), generator=_gen(31))
    idx[0, 0, :2] = s - 1  # duplicates and the last row
    ref = src[torch.arange(b)[:, None, None], torch.arange(h)[None, :, None], idx]
    if with_out:
        out = torch.full((b, kk, h, d), float("nan"), dtype=dtype).transpose(1, 2)  # non-contiguous out too
        got = gather_rows(src, idx, out)
        assert got is out
    else:
        got = gather_rows(src, idx)
    assert got.shape == (b, h, kk, d) and got.dtype == dtype
    assert torch.equal(got, ref)
    assert gather_rows(src, idx[:, :, :0]).shape == (b, h, 0, d)


def test_gather_rows_errors():
    src = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        gather_rows(src, torch.tensor([[[0, 8]] * 2]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        gather_rows(src, torch.tensor([[[-1, 0]] * 2]))
    with pytest.raises(ValueError, match="out"):
        gather_rows(src, torch.zeros(1, 2, 3, dtype=torch.int64), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="int64"):
        gather_rows(src, torch.zeros(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------------------
# sparse attention
# ----------------------------------------------------------------------------------------------------------------------


def _attention64(q, k, v, bias, sm):
    # float64 oracle with GQA by repeat_interleave; fully masked rows -> 0
    gqa = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(gqa, 1)
    v64 = v.double().repeat_interleave(gqa, 1)
    logits = sm * q.double() @ k64.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.double()
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    p = torch.softmax(logits.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return p @ v64


def _mask(b, hq, sq, n, seed, dtype):
    # random -inf masking (keeping one live key per row so SDPA stays finite) plus a finite additive part
    g = _gen(seed)
    bias = torch.randn(b, hq, sq, n, generator=g) * 0.5
    bias[torch.rand(b, hq, sq, n, generator=g) < 0.3] = float("-inf")
    keep = torch.randint(0, n, (b, hq, sq, 1), generator=g)
    bias.scatter_(-1, keep, 0.0)
    return bias.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 64])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_sparse_attention_vs_float64_and_sdpa(gqa, d, n, dtype):
    b, hkv, sq = 2, 2, 2
    hq = hkv * gqa
    seed = gqa * 1000 + d + n
    q = _randn(b, hq, sq, d, seed=seed, dtype=dtype)
    k = _randn(b, hkv, n, d, seed=seed + 1, dtype=dtype)
    v = _randn(b, hkv, n, d, seed=seed + 2, dtype=dtype)
    bias = _mask(b, hq, sq, n, seed + 3, dtype)
    sm = 1.0 / math.sqrt(d)
    ours = sparse_attention(q, k, v, bias, sm)
    assert ours.dtype == dtype and ours.shape == (b, hq, sq, d)
    oracle = _attention64(q, k, v, bias, sm)
    eager = F.scaled_dot_product_attention(
        q, k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1), attn_mask=bias, scale=sm
    )
    err_ours = (ours.double() - oracle).abs().max().item()
    err_eager = (eager.double() - oracle).abs().max().item()
    assert err_ours <= EAGER_FACTOR[dtype] * err_eager, f"ours {err_ours:.3g} vs eager {err_eager:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_non_contiguous_and_dv(dtype):
    b, hkv, gqa, sq, n, d, dv = 2, 2, 4, 3, 33, 64, 32
    hq = hkv * gqa
    q = _randn(b, sq, hq, d, seed=40, dtype=dtype).transpose(1, 2)
    k = _randn(b, n, hkv, d, seed=41, dtype=dtype).transpose(1, 2)
    v = _randn(b, hkv, n, 2 * dv, seed=42, dtype=dtype)[..., ::2]  # strided last dim, Dv != D
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    ours = sparse_attention(q, k, v, None, 0.1)
    assert ours.shape == (b, hq, sq, dv)
    oracle = _attention64(q, k, v, None, 0.1)
    eager = F.scaled_dot_product_attention(
        q.contiguous(), k.repeat_interleave(gqa, 1).contiguous(), v.repeat_interleave(gqa, 1).contiguous(), scale=0.1
    )
    err_ours = (ours.double() - oracle).abs().max().item()
    err_eager = (eager.double() - oracle).abs().max().item()
    assert err_ours <= EAGER_FACTOR[dtype] * err_eager
    # same bits as the contiguous call: layout must not change the result
    assert torch.equal(ours, sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), None, 0.1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_attention_fully_masked_rows_are_zero(dtype):
    b, hkv, gqa, sq, n, d = 1, 2, 2, 3, 10, 64
    q = _randn(b, hkv * gqa, sq, d, seed=50, dtype=dtype)
    k = _randn(b, hkv, n, d, seed=51, dtype=dtype)
    v = _randn(b, hkv, n, d, seed=52, dtype=dtype) + 3  # nonzero mean: a zero output is not an accident
    bias = torch.zeros(b, 1, sq, n, dtype=dtype)  # broadcast over heads
    bias[:, :, 1] = float("-inf")  # query row 1 sees nothing
    bias[:, :, 2, 5:] = float("-inf")
    ours = sparse_attention(q, k, v, bias, 0.125)
    assert not ours.isnan().any()
    assert torch.equal(ours[:, :, 1], torch.zeros_like(ours[:, :, 1]))
    oracle = _attention64(q, k, v, bias, 0.125)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(ours.double(), oracle, rtol=0, atol=tol)
    assert ours[:, :, 0].abs().min() > 0.5


def test_sparse_attention_empty_and_bias_shapes():
    q = _randn(2, 4, 2, 16, seed=60)
    k = _randn(2, 2, 5, 16, seed=61)
    v = _randn(2, 2, 5, 8, seed=62)
    empty = sparse_attention(q, k[:, :, :0], v[:, :, :0], None, 0.25)
    assert empty.shape == (2, 4, 2, 8) and torch.equal(empty, torch.zeros_like(empty))
    full = sparse_attention(q, k, v, None, 0.25)
    for shape in [(5,), (2, 5), (2, 1, 1, 5), (1, 4, 2, 5)]:
        assert torch.equal(sparse_attention(q, k, v, torch.zeros(shape), 0.25), full)
    with pytest.raises(ValueError, match="broadcastable"):
        sparse_attention(q, k, v, torch.zeros(3, 5), 0.25)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        sparse_attention(q[:, :3], k, v, None, 0.25)
    with pytest.raises(ValueError, match="floating"):
        sparse_attention(q, k, v, torch.ones(5, dtype=torch.bool), 0.25)


# ----------------------------------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------------------------------


def test_deterministic():
    x = _randn(2, 4, 64, 64, seed=70, dtype=torch.bfloat16)
    for fn in (quantize_keys, quantize_values):
        a, b_ = fn(x, 2, 32), fn(x, 2, 32)
        assert all(torch.equal(u, w) for u, w in zip(a, b_))
    scores = torch.randint(0, 3, (2, 4, 64), generator=_gen(71)).float()
    assert torch.equal(topk_positions(scores, 16), topk_positions(scores, 16))
    q = _randn(2, 8, 2, 64, seed=72, dtype=torch.bfloat16)
    assert torch.equal(sparse_attention(q, x, x, None, 0.125), sparse_attention(q, x, x, None, 0.125))
