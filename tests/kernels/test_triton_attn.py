"""Tests of the Triton attention kernels (kernels/triton/score.py, decode_attention.py) and the ops around them.

Three-way numerics (shared/STYLE.md): a float64 oracle written here independently (codes peeled off the bytes, the
attended column set built with Python sets), the eager computation at the test dtype (dequantize to the dtype, SDPA
at the dtype), and ours (the Triton kernel, and the pure-torch reference op). Ours may err at most FACTOR[dtype] times
what eager errs, both measured against the oracle with ``numerics.norm_err``.

CPU: the kernels run under Triton's interpreter in a child process (as tests/kernels/test_triton_quant.py does, and
for the same reason: ``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, and setting it for the session
would change every other test). The child computes every case of ``SCORE_CASES``, ``DECODE_CASES`` and
``POLICY_CASES`` with the kernels and saves inputs and outputs; the tests here hold them to the oracle.

GPU (``gpu`` marker, skipped without CUDA): the same checks at Llama-3-8B shapes, the exact CUDA top-k, no host sync in
the decode op, and Inductor inlining both kernels into a compiled function's code.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from interpreted import run_interpreted  # noqa: E402
from numerics import LOWP_FACTOR, norm_err  # noqa: E402

from specache_compile.kernels import attn_ops as ao  # noqa: E402
from specache_compile.kernels import reference as ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the lent GPU)")
# -n 2 --dist loadgroup (README): every test of this module on one worker, so the interpreted run (a module
# fixture, in a child process) happens once rather than once per worker
pytestmark = pytest.mark.xdist_group("interpreted_attn")
# slow: the `interpreted` fixture runs every case's kernels under Triton's interpreter in a child process
# (~15 s on 2 cores before the first of its tests); `-m slow` (CI) runs them, the GPU session runs the kernels
slow_interpreted = pytest.mark.slow
# House rule: ours errs at most this times the eager computation at the test dtype (both against float64).
FACTOR = {torch.float32: 10.0, **LOWP_FACTOR}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _query(b, hq, sq, d, dtype, g, noncontig=False):
    if not noncontig:
        return torch.randn(b, hq, sq, d, generator=g).to(dtype)
    # [B, Sq, Hq, D + 8] storage seen as [B, Hq, Sq, D]: strided in every dim but the last
    return torch.randn(b, sq, hq, d + 8, generator=g).to(dtype)[..., 4 : 4 + d].transpose(1, 2)


def _keys(b, h, s, d, g):
    # a few outlier channels, as real keys have (what per-channel quantization is for)
    return torch.randn(b, h, s, d, generator=g) * (1.0 + 4.0 * (torch.arange(d) % 13 == 2))


# ----------------------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------------------


def _score_inputs(b, hkv, rep, sq, d, nq, group, bits, dtype, seed, noncontig=False):
    g = _gen(seed)
    q = _query(b, hkv * rep, sq, d, dtype, g, noncontig)
    kq, ks, kz = ref.quantize_keys(_keys(b, hkv, nq, d, g).to(dtype), bits, group)
    return q, kq, ks, kz, bits, group, 1.0 / math.sqrt(d)


SCORE_CASES = {}
for _i, (_bits, _d, _hkv, _rep, _sq, _n, _dt, _nc) in enumerate([
    (1, 64, 1, 8, 1, 1, "fp32", False),
    (2, 128, 4, 4, 2, 3, "bf16", False),
    (4, 64, 8, 1, 2, 1, "fp16", False),
    (2, 64, 1, 8, 2, 3, "fp32", True),
    (1, 128, 4, 1, 1, 3, "bf16", True),
    (4, 128, 1, 4, 2, 1, "bf16", False),
    (2, 128, 8, 4, 1, 1, "fp16", True),
    (4, 64, 4, 8, 1, 3, "fp32", False),
]):
    _group = 32 if _i % 2 else 16
    SCORE_CASES[f"b{_bits}-d{_d}-hkv{_hkv}-rep{_rep}-sq{_sq}-n{_n}g-{_dt}{'-nc' if _nc else ''}"] = (
        lambda a: lambda: _score_inputs(*a)
    )((1 + _i % 2, _hkv, _rep, _sq, _d, _n * _group, _group, _bits, DT[_dt], 100 + _i, _nc))
# a key group of 128: two 64-token tiles per group
SCORE_CASES["group128"] = lambda: _score_inputs(1, 2, 2, 1, 64, 256, 128, 2, torch.bfloat16, 7)


def _decode_inputs(b, hkv, rep, sq, d, dv, nq, group, bits, dtype, n_fp, seed, *, lo=0, bias="none",
                   masked_rows=False, noncontig=False, width=None, tiles=None):
    """Op inputs: a low-bit copy of nq tokens, n_fp full-precision columns (window tokens past nq, substituted
    low-bit tokens, some below lo, one -1 pad) in shuffled order, and a bias over [lo, lo + W)."""
    g = _gen(seed)
    hq = hkv * rep
    q = _query(b, hq, sq, d, dtype, g, noncontig)
    kq, ks, kz = ref.quantize_keys(_keys(b, hkv, nq, d, g).to(dtype), bits, group)
    vq, vs, vz = ref.quantize_values(torch.randn(b, hkv, nq, dv, generator=g).to(dtype), bits, group)
    n_win = max(1, n_fp // 3)
    pos = torch.empty(b, hkv, n_fp, dtype=torch.int64)
    for i in range(b):
        for h in range(hkv):
            cols = list(range(nq, nq + n_win))  # the window
            sub = torch.randperm(nq, generator=g).tolist()  # substituted low-bit positions, some of them < lo
            cols += sub[: n_fp - n_win - (1 if n_fp >= 17 else 0)]
            if n_fp >= 17:
                cols.append(-1)  # padding
            cols = cols[:n_fp]
            pos[i, h] = torch.tensor(cols)[torch.randperm(n_fp, generator=g)]
    k_fp = (torch.randn(b, hkv, n_fp, d, generator=g) * 1.5).to(dtype)
    v_fp = torch.randn(b, hkv, n_fp, dv, generator=g).to(dtype)
    w = (nq + n_win - lo) if width is None else width
    bias_t = None
    if bias != "none":
        shape = (b, 1, sq, w) if bias == "heads" else (b, hq, sq, w)
        bias_t = torch.randn(*shape, generator=g) * 0.5
        bias_t[torch.rand(*shape, generator=g) < 0.25] = float("-inf")
        if masked_rows:
            bias_t[0, 0, sq - 1] = float("-inf")  # a fully masked row (a whole GQA group when bias == "heads")
    return dict(q=q, kq=kq, ks=ks, kz=kz, vq=vq, vs=vs, vz=vz, bits=bits, group=group, lo=lo, k_fp=k_fp, v_fp=v_fp,
                fp_pos=pos, bias=bias_t, softmax_scale=1.0 / math.sqrt(d)), tiles


DECODE_CASES = {}
for _i, (_bits, _d, _hkv, _rep, _sq, _n, _nfp, _dt, _kw) in enumerate([
    (2, 64, 1, 8, 1, 1, 1, "fp32", {}),
    (2, 128, 4, 4, 2, 3, 17, "bf16", {"bias": "heads", "lo": 5}),
    (1, 64, 8, 1, 2, 3, 17, "fp16", {"bias": "full", "masked_rows": True}),
    (4, 128, 1, 4, 1, 3, 1, "bf16", {"tiles": 1}),
    (1, 128, 4, 1, 2, 1, 17, "fp32", {"bias": "full", "lo": 3, "noncontig": True}),
    (4, 64, 1, 8, 2, 3, 17, "bf16", {"bias": "heads", "masked_rows": True, "tiles": 1}),
    (2, 64, 8, 1, 1, 3, 17, "fp16", {"lo": 40, "noncontig": True}),
    (1, 64, 4, 4, 2, 1, 1, "bf16", {"bias": "full", "lo": 2}),
    (4, 128, 4, 4, 1, 3, 17, "fp32", {"bias": "heads", "tiles": 1}),
    (2, 128, 1, 4, 2, 3, 17, "fp16", {"bias": "full", "width": 50, "lo": 4}),  # W ends inside the low-bit copy
]):
    _group = 32 if _i % 2 else 16
    _name = f"b{_bits}-d{_d}-hkv{_hkv}-rep{_rep}-sq{_sq}-n{_n}g-f{_nfp}-{_dt}"
    DECODE_CASES["-".join([_name, *(f"{k}{v}" for k, v in _kw.items())])] = (
        lambda a, kw: lambda: _decode_inputs(*a, **kw)
    )(
        (1 + _i % 2, _hkv, _rep, _sq, _d, _d, _n * _group, _group, _bits, DT[_dt], _nfp, 200 + _i), _kw
    )
# Dv != D, and value groups narrower than Dv (two channel groups of 64 per token)
DECODE_CASES["dv64-d128-group64"] = lambda: _decode_inputs(1, 2, 4, 1, 128, 64, 128, 64, 2, torch.bfloat16, 17, 9)
DECODE_CASES["dv128-group32-ngv4"] = lambda: _decode_inputs(1, 1, 8, 2, 64, 128, 96, 32, 2, torch.bfloat16, 17, 11,
                                                            bias="heads")
# a head dim that is not a power of two: 5 value channel groups of 16, padded tiles
DECODE_CASES["d80-ngv5"] = lambda: _decode_inputs(1, 2, 2, 1, 80, 80, 32, 16, 2, torch.bfloat16, 17, 13, bias="full")
# nothing attended at all: every low-bit position substituted away or masked and the columns below lo
DECODE_CASES["empty"] = lambda: _decode_inputs(1, 2, 2, 1, 64, 64, 32, 16, 2, torch.float32, 1, 12, lo=32,
                                               bias="full", width=0)


def _policy_case(bits, group, topk, window, sinks, n, lo, dtype, seed, with_bias):
    """SpeCachePolicy.decode on a CPU site, and the op inputs that describe the same step: returns (inputs, want)."""
    from specache_compile.config import Config
    from specache_compile.policies.specache import SpeCachePolicy
    from specache_compile.runtime.store import Site

    b, hkv, rep, d = 2, 2, 4, 64
    g = _gen(seed)
    pol = SpeCachePolicy(Config(bits=bits, group_size=group, topk=topk, window=window, sinks=sinks))
    cpu = torch.device("cpu")
    site = Site("layer0", b, hkv, d, d, dtype, cpu, cpu, pin=False)
    pol.reset(site)
    k = _keys(b, hkv, n, d, g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    site.write(0, k, v)
    pol.append(site, k, v, 0)
    seen = {}
    fetch = site.fetch

    def spy(idx, out_k=None, out_v=None):
        seen["idx"] = idx.clone()
        return fetch(idx, out_k, out_v)

    site.fetch = spy
    q = torch.randn(b, hkv * rep, 1, d, generator=g).to(dtype)
    bias = None
    if with_bias:
        bias = torch.randn(b, 1, 1, n - lo, generator=g) * 0.5
        bias[torch.rand(b, 1, 1, n - lo, generator=g) < 0.2] = float("-inf")
    scale = 1.0 / math.sqrt(d)
    want = pol.decode(site, q, bias, lo, n, scale)

    t = site.tier
    nq = t["nq"]
    c_lo = max(lo, min(sinks, nq))
    idx = seen["idx"]  # absolute positions of the fetched rows
    bi = torch.arange(b)[:, None, None]
    hi = torch.arange(hkv)[None, :, None]
    fp_pos = torch.cat([torch.arange(lo, c_lo).expand(b, hkv, -1), idx, torch.arange(nq, n).expand(b, hkv, -1)], 2)
    sink_k = t["sink_k"].view(lo, c_lo) if c_lo > lo else k[:, :, :0]
    sink_v = t["sink_v"].view(lo, c_lo) if c_lo > lo else v[:, :, :0]
    k_fp = torch.cat([sink_k, k[bi, hi, idx], t["win_k"].view()], dim=2)
    v_fp = torch.cat([sink_v, v[bi, hi, idx], t["win_v"].view()], dim=2)
    inputs = dict(q=q, kq=t["kq"].view(), ks=t["ks"].view(), kz=t["kz"].view(), vq=t["vq"].view(),
                  vs=t["vs"].view(), vz=t["vz"].view(), bits=bits, group=group, lo=lo, k_fp=k_fp, v_fp=v_fp,
                  fp_pos=fp_pos, bias=bias, softmax_scale=scale)
    return inputs, want


POLICY_CASES = {
    # bits, group, topk, window, sinks, n, lo, dtype, seed, bias
    "sinks-topk-window": (2, 16, 8, 16, 4, 100, 0, torch.float32, 1, True),
    "lo-inside-a-group": (1, 16, 8, 16, 4, 90, 7, torch.float32, 2, False),
    "topk-covers-all": (4, 32, 64, 32, 0, 90, 0, torch.float32, 3, True),
}


# ----------------------------------------------------------------------------------------------------------------------
# the interpreted child
# ----------------------------------------------------------------------------------------------------------------------


def _run_interpreted(path: str, shard: int, shards: int) -> None:
    """In a child (TRITON_INTERPRET=1): every ``shards``-th case through the kernels, saved with its inputs."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # wrap_triton returns an interpreted kernel as is on torch >= 2.13 and raises on older torch; outside a trace it
    # only launches the kernel anyway
    ao.wrap_triton = lambda kernel: kernel
    results = {"scores": {}, "decode": {}, "policy": {}}
    jobs = [("scores", c) for c in SCORE_CASES] + [("decode", c) for c in DECODE_CASES]
    jobs += [("policy", c) for c in POLICY_CASES]
    for i, (kind, cid) in enumerate(jobs):
        if i % shards != shard:
            continue
        try:
            if kind == "scores":
                args = SCORE_CASES[cid]()
                results[kind][cid] = (args, ao._lowbit_scores_triton(*args))
            elif kind == "decode":
                inputs, tiles = DECODE_CASES[cid]()
                results[kind][cid] = (inputs, ao._lowbit_decode_attention_triton(**inputs, tiles_per_split=tiles))
            else:
                inputs, want = _policy_case(*POLICY_CASES[cid])
                results[kind][cid] = (inputs, want, ao._lowbit_decode_attention_triton(**inputs))
        except Exception as e:  # recorded, so one failing case does not hide the others
            results[kind][cid] = (None, f"{type(e).__name__}: {e}")
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpreted_attn")
    return run_interpreted("test_triton_attn", tmp, ("scores", "decode", "policy"))


def _got(entry):
    if isinstance(entry[-1], str):
        raise AssertionError(f"the kernel raised {entry[-1]}")
    return entry


# ----------------------------------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------------------------------


def _codes64(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # independent unpack: peel the codes off each byte one at a time
    p = packed.long()
    return torch.stack([(p >> (j * bits)) & (2**bits - 1) for j in range(8 // bits)], dim=-1).flatten(-2).double()


def _keys64(kq, ks, kz, bits, group):
    return _codes64(kq, bits) * ks.double().repeat_interleave(group, 2) + kz.double().repeat_interleave(group, 2)


def _values64(vq, vs, vz, bits, group):
    gv = min(group, vq.shape[-1] * 8 // bits)
    return _codes64(vq, bits) * vs.double().repeat_interleave(gv, 3) + vz.double().repeat_interleave(gv, 3)


def _scores_oracle(q, kq, ks, kz, bits, group, sm):
    k = _keys64(kq, ks, kz, bits, group).repeat_interleave(q.shape[1] // kq.shape[1], 1)
    return sm * q.double() @ k.transpose(-1, -2)


def _scores_eager(q, kq, ks, kz, bits, group, sm):
    # at the test dtype: dequantize to it and multiply in it (for fp32 that is the reference itself)
    k = ref.dequantize_keys(kq, ks, kz, bits, group, q.dtype).repeat_interleave(q.shape[1] // kq.shape[1], 1)
    return (q @ k.transpose(-1, -2) * sm).float()


def _columns(inp):
    """Per (b, kv): the attended columns as (low-bit positions, fp column indices), from Python sets."""
    nq, lo, bias = inp["kq"].shape[2], inp["lo"], inp["bias"]
    hi_q = nq if bias is None else min(nq, lo + bias.shape[-1])
    cols = {}
    for b in range(inp["q"].shape[0]):
        for h in range(inp["kq"].shape[1]):
            pos = inp["fp_pos"][b, h].tolist()
            listed = set(pos)
            low = [p for p in range(lo, hi_q) if p not in listed]
            fp = [i for i, p in enumerate(pos) if p >= lo and (bias is None or p < lo + bias.shape[-1])]
            cols[b, h] = (low, fp, [pos[i] for i in fp])
    return cols


def _decode_dense(inp, dtype):
    """The attended K, V, position list per (b, kv), dequantized in float64 (dtype=None) or at ``dtype``."""
    bits, group = inp["bits"], inp["group"]
    if dtype is None:
        k_low = _keys64(inp["kq"], inp["ks"], inp["kz"], bits, group)
        v_low = _values64(inp["vq"], inp["vs"], inp["vz"], bits, group)
        k_fp, v_fp = inp["k_fp"].double(), inp["v_fp"].double()
    else:
        k_low = ref.dequantize_keys(inp["kq"], inp["ks"], inp["kz"], bits, group, dtype)
        v_low = ref.dequantize_values(inp["vq"], inp["vs"], inp["vz"], bits, group, dtype)
        k_fp, v_fp = inp["k_fp"].to(dtype), inp["v_fp"].to(dtype)
    out = {}
    for (b, h), (low, fp, fp_p) in _columns(inp).items():
        k = torch.cat([k_low[b, h, low], k_fp[b, h, fp]])
        v = torch.cat([v_low[b, h, low], v_fp[b, h, fp]])
        out[b, h] = (k, v, low + fp_p)
    return out


def _decode_oracle(inp):
    """float64 attention over the attended columns; fully masked rows are zero. Also returns that row mask."""
    q, bias, lo = inp["q"], inp["bias"], inp["lo"]
    b_, hq, sq, _ = q.shape
    hkv = inp["kq"].shape[1]
    rep = hq // hkv
    out = torch.zeros(b_, hq, sq, inp["v_fp"].shape[-1], dtype=torch.float64)
    dead = torch.zeros(b_, hq, sq, dtype=torch.bool)
    for (b, h), (k, v, pos) in _decode_dense(inp, None).items():
        for r in range(rep):
            hh = h * rep + r
            logits = inp["softmax_scale"] * q[b, hh].double() @ k.T  # [Sq, N]
            if bias is not None and pos:
                bb = bias.double().expand(b_, hq, sq, bias.shape[-1])[b, hh]
                logits = logits + bb[:, [p - lo for p in pos]]
            for s in range(sq):
                row = logits[s]
                if len(pos) == 0 or torch.isinf(row).all():
                    dead[b, hh, s] = True
                    continue
                out[b, hh, s] = torch.softmax(row, dim=0) @ v
    return out, dead


def _decode_eager(inp):
    """SDPA at the test dtype over the columns dequantized to it (what a plain torch decode step would run)."""
    q, bias, lo = inp["q"], inp["bias"], inp["lo"]
    dtype = q.dtype
    b_, hq, sq, _ = q.shape
    rep = hq // inp["kq"].shape[1]
    out = torch.full((b_, hq, sq, inp["v_fp"].shape[-1]), float("nan"), dtype=dtype)
    for (b, h), (k, v, pos) in _decode_dense(inp, dtype).items():
        if not pos:
            continue
        qq = q[b, h * rep : (h + 1) * rep]  # [rep, Sq, D]
        mask = None
        if bias is not None:
            bb = bias.expand(b_, hq, sq, bias.shape[-1])[b, h * rep : (h + 1) * rep]
            mask = bb[..., [p - lo for p in pos]].to(dtype)
        out[b, h * rep : (h + 1) * rep] = F.scaled_dot_product_attention(
            qq, k.expand(rep, -1, -1), v.expand(rep, -1, -1), attn_mask=mask, scale=inp["softmax_scale"]
        )
    return out


def _assert_house_rule(ours, eager, oracle, dtype, what):
    err_ours, err_eager = norm_err(ours, oracle), norm_err(eager, oracle)
    assert err_ours <= FACTOR[dtype] * err_eager, f"{what}: ours {err_ours:.3g} vs eager {err_eager:.3g}"


def _verify_decode(inp, got):
    dtype = inp["q"].dtype
    assert got.dtype == dtype and got.shape == (*inp["q"].shape[:3], inp["v_fp"].shape[-1])
    oracle, dead = _decode_oracle(inp)
    assert torch.equal(got[dead], torch.zeros_like(got[dead])), "a fully masked row is not zero"
    live = ~dead
    if live.any():
        eager = _decode_eager(inp)
        _assert_house_rule(got[live], eager[live], oracle[live], dtype, "kernel")
        want = ao.lowbit_decode_attention_reference(**inp)
        assert torch.equal(want[dead], torch.zeros_like(want[dead]))
        _assert_house_rule(want[live], eager[live], oracle[live], dtype, "reference op")
    return oracle, dead


# ----------------------------------------------------------------------------------------------------------------------
# interpreted kernels against the oracles
# ----------------------------------------------------------------------------------------------------------------------


@slow_interpreted
@pytest.mark.parametrize("cid", list(SCORE_CASES))
def test_scores_kernel(interpreted, cid):
    args, got = _got(interpreted["scores"][cid])
    q = args[0]
    assert got.dtype == torch.float32 and got.shape == (*q.shape[:3], args[1].shape[2])
    oracle = _scores_oracle(*args)
    _assert_house_rule(got, _scores_eager(*args), oracle, q.dtype, "kernel")
    want = ref.lowbit_scores(*args)
    _assert_house_rule(want, _scores_eager(*args), oracle, q.dtype, "reference")
    # and the error is bounded: float32 sums (a few ulps of sum |q_d k_d|), plus for bf16 inputs the fp16 rounding of
    # q_d * s_d (2^-11 relative, see kernels/triton/score.py; 2^-10 here for margin) times the code c_d
    kq, ks, _, bits, group, sm = args[1:]
    rep = q.shape[1] // kq.shape[1]
    k_abs = _keys64(*args[1:6]).abs().repeat_interleave(rep, 1)
    bound = 4 * q.shape[-1] * torch.finfo(torch.float32).eps * (sm * q.double().abs() @ k_abs.transpose(-1, -2))
    if q.dtype == torch.bfloat16 and ks.dtype == torch.bfloat16:
        sc = (_codes64(kq, bits) * ks.double().abs().repeat_interleave(group, 2)).repeat_interleave(rep, 1)
        bound += 2**-10 * sm * q.double().abs() @ sc.transpose(-1, -2)
    assert ((got.double() - oracle).abs() <= bound + 1e-12).all()


def test_score_cases_cover_the_layouts():
    assert not SCORE_CASES["b2-d64-hkv1-rep8-sq2-n3g-fp32-nc"]()[0].is_contiguous()
    inputs, _ = DECODE_CASES["b1-d128-hkv4-rep1-sq2-n1g-f17-fp32-biasfull-lo3-noncontigTrue"]()
    assert not inputs["q"].is_contiguous()


@slow_interpreted
@pytest.mark.parametrize("cid", list(DECODE_CASES))
def test_decode_kernel(interpreted, cid):
    inp, got = _got(interpreted["decode"][cid])
    oracle, dead = _verify_decode(inp, got)
    if cid == "empty":
        assert dead.all()
    if "masked_rowsTrue" in cid:
        assert dead.any() and not dead.all()


@slow_interpreted
@pytest.mark.parametrize("cid", list(POLICY_CASES))
def test_decode_matches_specache_policy(interpreted, cid):
    # The op's inputs built from the policy's own device tier and the rows it fetched give the policy's output.
    inp, want, got = _got(interpreted["policy"][cid])
    assert ((inp["fp_pos"] < inp["kq"].shape[2]) & (inp["fp_pos"] >= inp["lo"])).any(), "nothing substituted"
    ours_ref = ao.lowbit_decode_attention_reference(**inp)
    # float32 throughout: the policy dequantizes to q.dtype = float32 as the reference does; only sums reorder
    torch.testing.assert_close(ours_ref, want, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------------------------------
# in this process: the ops on CPU, errors, fakes, registration, the exact top-k
# ----------------------------------------------------------------------------------------------------------------------


def test_cpu_ops_are_the_references():
    args = _score_inputs(1, 2, 4, 2, 64, 64, 32, 2, torch.bfloat16, 1)
    assert torch.equal(torch.ops.specache.lowbit_scores(*args), ref.lowbit_scores(*args))
    inp, _ = DECODE_CASES["b2-d128-hkv4-rep4-sq2-n3g-f17-bf16-biasheads-lo5"]()
    want = ao.lowbit_decode_attention_reference(**inp)
    assert torch.equal(torch.ops.specache.lowbit_decode_attention(*inp.values()), want)


@pytest.mark.slow  # Inductor's C++ codegen on CPU: ~16 s warm on 2 cores, ~30 s with a cold cache
def test_cpu_op_compiles_with_inductor():
    inp, _ = DECODE_CASES["b2-d128-hkv4-rep4-sq2-n3g-f17-bf16-biasheads-lo5"]()
    want = ao.lowbit_decode_attention_reference(**inp)

    def fn(*xs):
        return torch.ops.specache.lowbit_decode_attention(*xs) * 2

    got = torch.compile(fn, fullgraph=True)(*inp.values())
    assert torch.equal(got, want * 2)


def test_decode_errors():
    inp, _ = DECODE_CASES["b2-d128-hkv4-rep4-sq2-n3g-f17-bf16-biasheads-lo5"]()
    with pytest.raises(ValueError, match="fp_pos"):
        ao.lowbit_decode_attention_reference(**{**inp, "fp_pos": inp["fp_pos"].float()})
    with pytest.raises(ValueError, match="k_fp, v_fp"):
        ao.lowbit_decode_attention_reference(**{**inp, "k_fp": inp["k_fp"][..., :32]})
    with pytest.raises(ValueError, match="bias"):
        ao.lowbit_decode_attention_reference(**{**inp, "bias": torch.zeros(3, 1, 1, 5)})
    with pytest.raises(ValueError, match="lo"):
        ao.lowbit_decode_attention_reference(**{**inp, "lo": -1})
    with pytest.raises(ValueError, match="nq // group"):
        ao.lowbit_decode_attention_reference(**{**inp, "group": 24})
    with pytest.raises(ValueError, match="multiple of KV heads"):
        ao.lowbit_decode_attention_reference(**{**inp, "q": inp["q"][:, :3]})
    # the kernel launcher raises the same errors before any launch
    with pytest.raises(ValueError, match="fp_pos"):
        ao._lowbit_decode_attention_triton(**{**inp, "fp_pos": inp["fp_pos"][..., :0]})


def test_decode_reference_semantics_by_hand():
    # one KV head, one query, 2-bit codes of constant groups (dequantize exactly), keys zero: uniform attention
    q = torch.zeros(1, 1, 1, 16)
    kq, ks, kz = ref.quantize_keys(torch.zeros(1, 1, 32, 16), 2, 16)
    vals = torch.arange(32.0)[None, None, :, None].expand(1, 1, 32, 16)
    vq, vs, vz = ref.quantize_values(vals.contiguous(), 2, 16)  # one group per token: v = position, exactly
    k_fp = torch.zeros(1, 1, 3, 16)
    v_fp = torch.full((1, 1, 3, 16), 100.0)
    fp_pos = torch.tensor([[[3, 40, -1]]])  # substitutes position 3, adds 40 (a window token), one pad
    out = ao.lowbit_decode_attention_reference(q, kq, ks, kz, vq, vs, vz, 2, 16, 2, k_fp, v_fp, fp_pos, None, 1.0)
    # attended: low-bit 2, 4..31 (29 tokens), fp columns at 3 and 40 (value 100 each); the pad is ignored
    want = (sum([2] + list(range(4, 32))) + 200.0) / 31
    torch.testing.assert_close(out, torch.full_like(out, want))
    # a bias of width 10 over [2, 12): low-bit 2, 4..11 and the fp column at 3; position 40 is past it
    bias = torch.zeros(1, 1, 1, 10)
    out = ao.lowbit_decode_attention_reference(q, kq, ks, kz, vq, vs, vz, 2, 16, 2, k_fp, v_fp, fp_pos, bias, 1.0)
    torch.testing.assert_close(out, torch.full_like(out, (sum([2] + list(range(4, 12))) + 100.0) / 10))


def test_fakes_and_triton_op_registration():
    from torch._library.triton import get_triton_kernels_for_op
    from torch._subclasses.fake_tensor import FakeTensorMode

    inp, _ = DECODE_CASES["dv64-d128-group64"]()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        out = torch.ops.specache.lowbit_decode_attention(*fake.values())
        assert out.shape == (1, 8, 1, 64) and out.dtype == torch.bfloat16
        s = torch.ops.specache.lowbit_scores(fake["q"], fake["kq"], fake["ks"], fake["kz"], 2, 64, 0.1)
        assert s.shape == (1, 8, 1, 128) and s.dtype == torch.float32
    assert ao.HAS_TRITON
    names = {k.fn.__name__ for k in get_triton_kernels_for_op("specache::lowbit_decode_attention")}
    assert {"lowbit_decode_split_kernel", "merge_splits_kernel"} <= names
    assert "lowbit_scores_kernel" in {k.fn.__name__ for k in get_triton_kernels_for_op("specache::lowbit_scores")}


@pytest.mark.parametrize("k", [0, 1, 5, 64, 300])
def test_cuda_topk_rule_is_the_reference(k):
    # _topk_positions_cuda is plain torch: run it on the CPU against the reference, with ties, NaN, ±0, ±inf
    g = _gen(k)
    x = torch.randint(-3, 4, (2, 3, 257), generator=g).float()  # many ties
    x[0, 0, :40] = float("nan")
    x[0, 1, 5:60] = float("-inf")
    x[1, 0, ::7] = -0.0
    x[1, 1, 3] = float("inf")
    x[1, 2] = torch.randn(257, generator=g)
    assert torch.equal(ao._topk_positions_cuda(x, k), ref.topk_positions(x, k))
    assert torch.equal(ao._topk_positions_cuda(x.bfloat16(), k), ref.topk_positions(x.bfloat16(), k))


@pytest.mark.parametrize("k", [1, 5, 8])
def test_cuda_topk_two_stage_is_exact(monkeypatch, k):
    # rows longer than 2 chunks select per chunk first; small chunks here, many ties across chunk boundaries
    monkeypatch.setattr(ao, "_TOPK_CHUNK", 32)
    x = torch.randint(-2, 3, (2, 3, 1000), generator=_gen(k)).float()
    x[0, 0, 500:] = float("nan")
    x[1, 2, :] = 1.0  # one value everywhere: the k lowest positions
    assert torch.equal(ao._topk_positions_cuda(x, k), ref.topk_positions(x, k))


# ----------------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------------


def _cuda(inp):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inp.items()}


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_scores_llama_shape(bits, dtype):
    for sq, nq in ((1, 8192), (2, 4096 + 64)):
        args = _score_inputs(1, 8, 4, sq, 128, nq, 64, bits, DT[dtype], bits + nq)
        got = torch.ops.specache.lowbit_scores(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        oracle = _scores_oracle(*args)
        _assert_house_rule(got.cpu(), _scores_eager(*args), oracle, DT[dtype], f"sq={sq}")


def _gpu_decode_inputs(bits, dtype, seed, **kw):
    # Llama-3-8B layer: Hq 32, Hkv 8, D 128; 4 sinks + 64 top-k + a 80-token window as full-precision columns
    g = _gen(seed)
    b, hkv, rep, d, nq, group, sq = 2, 8, 4, 128, 4096, 64, kw.pop("sq", 1)
    inp, _ = _decode_inputs(b, hkv, rep, sq, d, d, nq, group, bits, dtype, 1, seed)
    n_win, lo = 80, kw.pop("lo", 0)
    pos = torch.cat([
        torch.arange(4).expand(b, hkv, 4),
        torch.stack([torch.randperm(nq - 4, generator=g)[:64] + 4 for _ in range(b * hkv)]).reshape(b, hkv, 64),
        torch.arange(nq, nq + n_win).expand(b, hkv, n_win),
    ], dim=2)
    f = pos.shape[2]
    inp.update(fp_pos=pos[..., torch.randperm(f, generator=g)], k_fp=torch.randn(b, hkv, f, d, generator=g).to(dtype),
               v_fp=torch.randn(b, hkv, f, d, generator=g).to(dtype), lo=lo)
    w = nq + n_win - lo
    bias = torch.zeros(b, 1, sq, w)
    bias[torch.rand(b, 1, sq, w, generator=g) < 0.1] = float("-inf")
    if kw.pop("masked_rows", False):
        bias[1, :, -1] = float("-inf")
    inp["bias"] = bias if kw.pop("bias", True) else None
    return inp


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_decode_llama_shape(bits, dtype):
    for kw in ({}, {"sq": 2, "lo": 100, "masked_rows": True}, {"bias": False}):
        inp = _gpu_decode_inputs(bits, DT[dtype], bits * 10 + len(kw), **kw)
        got = torch.ops.specache.lowbit_decode_attention(*_cuda(inp).values()).cpu()
        _verify_decode(inp, got)


@gpu
@needs_cuda
def test_gpu_decode_non_contiguous_and_splits():
    inp = _gpu_decode_inputs(2, torch.bfloat16, 5)
    q = inp["q"]
    inp["q"] = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3] + 8, dtype=q.dtype)[..., :-8].transpose(1, 2)
    inp["q"].copy_(q)
    assert not inp["q"].is_contiguous()
    c = _cuda(inp)
    want = torch.ops.specache.lowbit_decode_attention(*c.values())
    for tiles in (1, 3, 1000):  # many splits, uneven splits, one split
        got = ao._lowbit_decode_attention_triton(**c, tiles_per_split=tiles)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * 2**-8)
    _verify_decode(inp, want.cpu())


@gpu
@needs_cuda
def test_gpu_policy_equivalence():
    for cid, case in POLICY_CASES.items():
        inp, want = _policy_case(*case)
        got = torch.ops.specache.lowbit_decode_attention(*_cuda(inp).values()).cpu()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=cid)


@gpu
@needs_cuda
def test_gpu_topk_exact_and_decode_without_host_sync():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(-50, 50, (2, 8, 131072), device="cuda", generator=g).float()  # ties everywhere
    for k in (1, 64, 2048):
        assert torch.equal(torch.ops.specache.topk_positions(x, k).cpu(), ref.topk_positions(x.cpu(), k))
    c = _cuda(_gpu_decode_inputs(2, torch.bfloat16, 3))
    torch.ops.specache.lowbit_decode_attention(*c.values())  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.specache.lowbit_decode_attention(*c.values())
        torch.ops.specache.lowbit_scores(c["q"], c["kq"], c["ks"], c["kz"], 2, 64, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@gpu
@needs_cuda
def test_gpu_compile_lowers_the_triton_kernels():
    from torch._inductor.utils import run_and_get_code

    c = _cuda(_gpu_decode_inputs(2, torch.bfloat16, 4))

    sm = c["softmax_scale"]

    def fn(q, kq, ks, kz, vq, vs, vz, k_fp, v_fp, fp_pos, bias):
        scores = torch.ops.specache.lowbit_scores(q * 1.0, kq, ks, kz, 2, 64, sm)
        out = torch.ops.specache.lowbit_decode_attention(q, kq, ks, kz, vq, vs, vz, 2, 64, 0, k_fp, v_fp, fp_pos,
                                                         bias, sm)
        return scores.amax(-1), out + 1

    args = [c[k] for k in ("q", "kq", "ks", "kz", "vq", "vs", "vz", "k_fp", "v_fp", "fp_pos", "bias")]
    (smax, out), codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    code = "\n".join(codes)
    for name in ("lowbit_scores_kernel", "lowbit_decode_split_kernel", "merge_splits_kernel"):
        assert name in code, f"Inductor did not inline {name}"
    want = torch.ops.specache.lowbit_decode_attention(*[c[k] for k in c]) + 1
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(smax, torch.ops.specache.lowbit_scores(c["q"], c["kq"], c["ks"], c["kz"], 2, 64,
                                                                      sm).amax(-1))
