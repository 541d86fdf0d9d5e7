"""Tests of ``fused_decode`` (kernels/fused_ops.py, kernels/triton/fused_decode.py): one pass per layer per step.

- CPU, always: ``reference.fused_decode`` against the unfused references the static path composed before
  (``lowbit_decode_attention_reference`` with the window substituted, ``lowbit_scores`` + ``select_topk_reference``
  for the ranking, as ``specache_static._rank_rows`` did), and the static path wired to the op (its reference on CPU)
  against the unfused static path.
- CPU, interpreted (slow): the Triton kernels under ``TRITON_INTERPRET=1`` in a child process on tiny shapes
  (lengths 1, 17, 130; head dim 64; GQA 1 and 4; bits 2 and 1), held to a float64 oracle with the house rule
  (tests/numerics.py): ours errs at most FACTOR[dtype] times the eager computation at the test dtype.
- GPU (``gpu``): the same checks at Llama-3-8B shapes, ragged batches, GQA 8, head dim 128, bits 1/2/4, CUDA graph
  capture and no host sync.

The ranking is checked against float64 probabilities: an fp32 kernel must pick the oracle's set (where the k-th and
next probabilities are apart), a bf16 one positions whose oracle probability is within 2% of the k-th largest.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from interpreted import run_interpreted
from numerics import LOWP_FACTOR, norm_err
from test_triton_attn import _keys

from specache_compile.kernels import attn_ops as ao
from specache_compile.kernels import ops
from specache_compile.kernels import reference as ref

HAS_CUDA = torch.cuda.is_available()
# -n 2 --dist loadgroup (README): the interpreted run (a module fixture, in a child process) happens once
pytestmark = pytest.mark.xdist_group("interpreted_fused")
FACTOR = {torch.float32: 10.0, **LOWP_FACTOR}  # the house rule (shared/STYLE.md): ours <= FACTOR x eager's error
BF16_RANK_SLACK = 0.02  # a bf16 kernel's choice: oracle probability within 2% of the oracle's k-th largest


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(b, hkv, rep, sq, d, length, group, bits, dtype, n_fp, n_win, seed, *, lo=0, bias="heads", k=8,
                rank_row=None, attend=True, ragged=False, dv=None, device="cpu"):
    """Op inputs laid out as the static path lays them: a low-bit copy of whole groups covering ``length`` tokens
    (``limit = length``), the window: n_win columns, at positions [length, length + n_win - 1) and one -1 pad; n_fp
    fetched rows at random positions below ``length`` (some below lo, one -1 pad); a bias over [lo, length + n_win -
    1), the positions written (what the model's mask covers). ragged: batch
    row i masks its last 3 * i positions (sequences of different lengths)."""
    g = _gen(seed)
    hq, dv = hkv * rep, dv or d
    nq = (-(-length // group) + 1) * group  # one group more than the tokens: rows past the limit hold data too
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    kq, ks, kz = ref.quantize_keys(_keys(b, hkv, nq, d, g).to(dtype), bits, group)  # with outlier channels
    vq, vs, vz = ref.quantize_values(torch.randn(b, hkv, nq, dv, generator=g).to(dtype), bits, group)
    fp_pos = torch.stack([torch.randperm(length, generator=g)[:n_fp] for _ in range(b * hkv)]).reshape(b, hkv, -1)
    fp_pos = torch.cat([fp_pos, torch.full((b, hkv, n_fp - fp_pos.shape[-1]), -1)], dim=2)
    fp_pos[..., -1] = -1
    win_pos = (length + torch.arange(n_win)).expand(b, hkv, n_win).clone()
    win_pos[..., -1] = -1
    w = length + n_win - 1 - lo
    bias_t = None
    if bias != "none":
        shape = (b, 1, sq, w) if bias == "heads" else (b, hq, sq, w)
        bias_t = torch.randn(*shape, generator=g) * 0.5
        bias_t[torch.rand(*shape, generator=g) < 0.15] = float("-inf")
        if ragged:
            for i in range(b):
                if 3 * i:
                    bias_t[i, ..., max(0, w - n_win - 3 * i) : w - n_win] = float("-inf")
        bias_t = bias_t.to(dtype)
    inp = dict(q=q, kq=kq, ks=ks, kz=kz, vq=vq, vs=vs, vz=vz, bits=bits, group=group, lo=lo,
               k_fp=torch.randn(b, hkv, n_fp, d, generator=g).to(dtype) * 1.5,
               v_fp=torch.randn(b, hkv, n_fp, dv, generator=g).to(dtype), fp_pos=fp_pos,
               k_win=torch.randn(b, hkv, n_win, d, generator=g).to(dtype) * 1.5,
               v_win=torch.randn(b, hkv, n_win, dv, generator=g).to(dtype), win_pos=win_pos, bias=bias_t,
               limit=torch.tensor(length), softmax_scale=1.0 / math.sqrt(d),
               rank_row=sq - 1 if rank_row is None else rank_row, k=k, attend=attend)
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in inp.items()}


# ----------------------------------------------------------------------------------------------------------------------
# oracles
# ----------------------------------------------------------------------------------------------------------------------


def _as64(inp):
    return {n: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in inp.items()}


def _columns(inp, dtype):
    """(K, V, keep, rank_keep, pos) over [low-bit positions lo..hi, fetched rows, window], dequantized at dtype."""
    q, lo, bits, group, bias = inp["q"], inp["lo"], inp["bits"], inp["group"], inp["bias"]
    b, hkv, nq = q.shape[0], inp["kq"].shape[1], inp["kq"].shape[2]
    hi = nq if bias is None else min(nq, lo + bias.shape[-1])
    w = None if bias is None else bias.shape[-1]
    k_low = ref.dequantize_keys(inp["kq"], inp["ks"], inp["kz"], bits, group, dtype)[:, :, lo:hi]
    v_low = ref.dequantize_values(inp["vq"], inp["vs"], inp["vz"], bits, group, dtype)[:, :, lo:hi]
    low_pos = torch.arange(lo, hi).expand(b, hkv, -1)
    low_ok = low_pos < int(inp["limit"])
    listed = torch.zeros(b, hkv, hi - lo, dtype=torch.bool)
    for i in range(b):
        for h in range(hkv):
            for p in inp["fp_pos"][i, h].tolist():
                if lo <= p < hi:
                    listed[i, h, p - lo] = True

    def ok(pos):
        return (pos >= lo) & (pos < lo + w) if w is not None else pos >= lo

    fpk, wk = ok(inp["fp_pos"]), ok(inp["win_pos"])
    keep = torch.cat([low_ok & ~listed, fpk, wk], dim=2)
    rank_keep = torch.cat([low_ok, torch.zeros_like(fpk), wk], dim=2)
    K = torch.cat([k_low, inp["k_fp"].to(dtype), inp["k_win"].to(dtype)], dim=2)
    V = torch.cat([v_low, inp["v_fp"].to(dtype), inp["v_win"].to(dtype)], dim=2)
    pos = torch.cat([low_pos, inp["fp_pos"], inp["win_pos"]], dim=2)
    return K, V, keep, rank_keep, pos, hi - lo


def _mask(inp, keep, pos, dtype):
    """Additive [B, Hq, Sq, N] mask at dtype: the bias at each column's position, -inf where not kept."""
    q, bias, lo = inp["q"], inp["bias"], inp["lo"]
    b, hq, sq, _ = q.shape
    rep = hq // keep.shape[1]
    m = torch.zeros(b, hq, sq, keep.shape[-1], dtype=dtype)
    if bias is not None:
        be = bias.to(dtype).expand(b, hq, sq, bias.shape[-1])
        idx = (pos - lo).clamp(0, bias.shape[-1] - 1).repeat_interleave(rep, 1)[:, :, None].expand(b, hq, sq, -1)
        m = m + be.gather(3, idx)
    return m.masked_fill(~keep.repeat_interleave(rep, 1)[:, :, None], float("-inf"))


def eager_attention(inp):
    """SDPA at the test dtype over the columns dequantized to it (NaN for rows with nothing attended)."""
    dt = inp["q"].dtype
    K, V, keep, _, pos, _ = _columns(inp, dt)
    rep = inp["q"].shape[1] // K.shape[1]
    return F.scaled_dot_product_attention(inp["q"], K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1),
                                          attn_mask=_mask(inp, keep, pos, dt), scale=inp["softmax_scale"])


def rank_probs64(inp):
    """float64 mean ranking probability of each low-bit position [B, Hkv, n_low] (positions lo + i)."""
    i64 = _as64(inp)
    K, _, _, rank_keep, pos, n_low = _columns(i64, torch.float64)
    q, r = i64["q"], inp["rank_row"]
    b, hq, _, d = q.shape
    hkv = K.shape[1]
    rep = hq // hkv
    logits = inp["softmax_scale"] * q[:, :, r].reshape(b, hkv, rep, d) @ K.transpose(-1, -2)  # [B, Hkv, rep, N]
    mask = _mask(i64, rank_keep, pos, torch.float64)[:, :, r].reshape(b, hkv, rep, -1)
    p = torch.softmax(logits + mask, dim=-1).nan_to_num(0.0)
    return p[..., :n_low].mean(dim=2)


def assert_attention(inp, got):
    dtype = inp["q"].dtype
    b, hq, sq, _ = inp["q"].shape
    assert got.dtype == dtype and got.shape == (b, hq, sq, inp["v_fp"].shape[-1])
    oracle = ref.fused_decode(**{**_as64(inp), "rank_row": -1})[0]
    eager = eager_attention(inp)
    dead = eager.isnan().any(-1)
    assert torch.equal(got[dead].float(), torch.zeros_like(got[dead].float())), "a fully masked row is not zero"
    live = ~dead
    if live.any():
        err_ours, err_eager = norm_err(got[live], oracle[live]), norm_err(eager[live], oracle[live])
        assert err_ours <= FACTOR[dtype] * err_eager, f"ours {err_ours:.3g} vs eager {err_eager:.3g}"


def assert_ranking(inp, top):
    b, hkv, k = inp["q"].shape[0], inp["kq"].shape[1], inp["k"]
    assert top.shape == (b, hkv, k) and top.dtype == torch.int64
    probs = rank_probs64(inp)
    lo = inp["lo"]
    for i in range(b):
        for h in range(hkv):
            p = probs[i, h]
            chosen = [x for x in top[i, h].tolist() if x >= 0]
            assert len(set(chosen)) == len(chosen), "a position chosen twice"
            assert len(chosen) == min(k, int((p > 0).sum())), (chosen, int((p > 0).sum()))
            if not chosen:
                continue
            srt = p.sort(descending=True).values
            kth = srt[len(chosen) - 1]
            got = p[torch.tensor(chosen) - lo]
            if inp["q"].dtype == torch.float32:
                if len(srt) > len(chosen) and srt[len(chosen)] >= kth * (1 - 1e-4):
                    continue  # a near tie at the boundary: either choice is right
                want = set((torch.topk(p, len(chosen)).indices + lo).tolist())
                assert set(chosen) == want, (sorted(chosen), sorted(want))
            else:
                assert (got >= kth * (1 - BF16_RANK_SLACK)).all(), (got.min().item(), kth.item())


def _check(inp, out, top):
    if inp["attend"]:
        assert_attention(inp, out)
    else:
        assert out.shape[-1] == 0
    if inp["rank_row"] >= 0:
        assert_ranking(inp, top)
    else:
        assert top.shape[-1] == 0


# ----------------------------------------------------------------------------------------------------------------------
# the reference against the unfused composition (CPU, always)
# ----------------------------------------------------------------------------------------------------------------------

COMPOSE_CASES = {
    # b, hkv, rep, sq, d, length, group, bits, dtype, n_fp, n_win, seed, kwargs
    "gqa4-spec-2bit": (1, 2, 4, 2, 64, 100, 16, 2, torch.float32, 9, 5, 1, {}),
    "mha-1bit-lo": (2, 2, 1, 1, 64, 70, 16, 1, torch.float32, 5, 3, 2, {"lo": 7, "bias": "full"}),
    "gqa8-4bit-bf16-ragged": (3, 1, 8, 2, 128, 150, 32, 4, torch.bfloat16, 17, 9, 3, {"ragged": True, "k": 16}),
    "dv-differs": (1, 2, 2, 1, 128, 64, 64, 2, torch.float32, 4, 3, 4, {"dv": 64}),
}


def _composition(inp):
    """What the static path computed before fused_decode: the attention op with the window substituted (its
    positions listed) and the ranking of specache_static._rank_rows (scores, masked past the limit, softmax with the
    window columns, GQA mean, top-k)."""
    q, lo, lim, bias = inp["q"], inp["lo"], int(inp["limit"]), inp["bias"]
    b, hq, sq, _ = q.shape
    hkv = inp["kq"].shape[1]
    rep = hq // hkv
    low = [inp[n] for n in ("kq", "ks", "kz", "vq", "vs", "vz")]
    out = ao.lowbit_decode_attention_reference(
        q, *low, inp["bits"], inp["group"], lo, torch.cat([inp["k_fp"], inp["k_win"]], 2),
        torch.cat([inp["v_fp"], inp["v_win"]], 2), torch.cat([inp["fp_pos"], inp["win_pos"]], 2), bias,
        inp["softmax_scale"])
    r, w = inp["rank_row"], bias.shape[-1]
    hi = min(inp["kq"].shape[2], lo + w)
    br = bias[..., r : r + 1, :].float().expand(b, hq, 1, w)
    low_logits = ref.lowbit_scores(q[:, :, r : r + 1], *low[:3], inp["bits"], inp["group"], inp["softmax_scale"])
    low_logits = low_logits[..., lo:hi] + br[..., : hi - lo]
    low_logits = low_logits + torch.where(torch.arange(lo, hi) < lim, 0.0, float("-inf"))
    wp = inp["win_pos"]
    col = ops.attention_logits(q[:, :, r : r + 1], inp["k_win"], inp["softmax_scale"])
    col = col + br.gather(3, (wp - lo).clamp(0, w - 1).repeat_interleave(rep, 1).unsqueeze(2))
    col = col + torch.where((wp >= lo) & (wp < lo + w), 0.0, float("-inf")).repeat_interleave(rep, 1).unsqueeze(2)
    top = ao.select_topk_reference(low_logits[:, :, 0], col[:, :, 0], rep, inp["k"]) + lo
    return out, top


@pytest.mark.parametrize("cid", list(COMPOSE_CASES))
def test_reference_equals_the_unfused_composition(cid):
    *a, kw = COMPOSE_CASES[cid]
    inp = make_inputs(*a, **kw)
    out, top = ref.fused_decode(**inp)
    want_out, want_top = _composition(inp)
    tol = 1e-5 if inp["q"].dtype == torch.float32 else 2**-7  # both in float32; bf16: the output's last bit
    assert norm_err(out, want_out) <= tol
    probs = rank_probs64(inp)
    for i in range(top.shape[0]):
        for h in range(top.shape[1]):
            got, want = set(top[i, h].tolist()) - {-1}, set(want_top[i, h].tolist())
            p = probs[i, h]
            want = {x for x in want if p[x - inp["lo"]] > 0}  # the composition may also pick zero-probability ones
            assert got == want, (sorted(got), sorted(want))


def test_reference_modes():
    """attend=False returns no output; rank_row=-1 no positions; a top-k larger than the positions pads with -1."""
    inp = make_inputs(1, 2, 4, 2, 64, 20, 16, 2, torch.float32, 3, 3, 5, k=50)
    out, top = ref.fused_decode(**{**inp, "attend": False})
    assert out.shape == (1, 8, 2, 0) and top.shape == (1, 2, 50)
    assert ((top >= 0).sum(-1) == (rank_probs64(inp) > 0).sum(-1)).all() and (top[..., 40:] == -1).all()
    out, top = ref.fused_decode(**{**inp, "rank_row": -1})
    assert out.shape == (1, 8, 2, 64) and top.shape == (1, 2, 0)


def test_kernel_takes_rows_of_whole_words(monkeypatch):
    """The kernel reads a token's codes as int32 words: head dims whose codes end inside a word run the reference."""
    from specache_compile.kernels import fused_ops as fo

    if not fo.HAS_TRITON:
        pytest.skip("needs Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the kernel may run on CPU tensors
    for d, bits, want in ((64, 1, True), (48, 2, True), (16, 1, False), (16, 4, True), (48, 1, False)):
        inp = make_inputs(1, 1, 2, 1, d, 20, 16, bits, torch.float32, 3, 3, 7)
        got = fo.fused_decode_supported(inp["q"], inp["kq"], inp["ks"], inp["vs"], inp["k_fp"], inp["v_fp"],
                                        inp["k_win"], bits, 16, inp["rank_row"], inp["k"])
        assert got == want, (d, bits)


def test_op_fake_and_cpu_kernel():
    inp = make_inputs(2, 2, 2, 1, 64, 40, 16, 1, torch.float32, 4, 3, 6)
    got = torch.ops.specache.fused_decode(*inp.values())
    want = ref.fused_decode(**inp)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in inp.items()}
        out, top = torch.ops.specache.fused_decode(*fake.values())
    assert out.shape == want[0].shape and top.shape == want[1].shape and top.dtype == torch.int64


# four compiles and 30 float64 steps per case (~9 s on 2 cores): the speculative case stays in the fast set
@pytest.mark.parametrize("speculative", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_static_path_through_the_op_equals_the_unfused_path(speculative):
    """The static path wired to fused_decode (its reference on CPU: FUSED="always") gives the unfused path's tokens
    and prefetch bookkeeping: float64, a top-k far below the context, groups quantized during the decode, speculative
    and plain steps, hits sampled every step."""
    import hf_models
    from transformers import StaticCache

    import specache
    from specache_compile.policies import specache_static

    base = hf_models.build("llama", layers=2).double()
    ids = torch.randint(3, base.config.vocab_size, (1, 150), generator=_gen(1))
    outs, stats = [], []
    for fused in ("never", "always"):
        torch._dynamo.reset()
        specache_static.FUSED = fused
        try:
            m = specache.compile(hf_models.twin(base), topk=8, window=16, group_size=16,
                                 policy_options={"static": True, "hit_every": 1})
            outs.append(specache.generate(m, ids, 30, speculative=speculative,
                                          past_key_values=StaticCache(config=m.config, max_cache_len=200)))
        finally:
            specache_static.FUSED = "auto"
        site = next(iter(specache.runtime_of(m).sites.values()))
        assert site.static.fused == (fused == "always")
        stats.append(next(iter(specache.stats(m)["store"].values())))
    assert torch.equal(outs[0], outs[1])
    for key in ("length", "decode_steps", "prefetch_issued", "prefetch_consumed", "fetched_rows",
                "prefetch_hit_rate"):
        assert stats[0].get(key) == stats[1].get(key), key


# ----------------------------------------------------------------------------------------------------------------------
# the Triton kernels, interpreted (CPU)
# ----------------------------------------------------------------------------------------------------------------------

KERNEL_CASES = {}
for _i, (_len, _rep, _bits) in enumerate([(L, r, bt) for L in (1, 17, 130) for r in (1, 4) for bt in (2, 1)]):
    _dt = torch.bfloat16 if _i % 3 == 2 else torch.float32
    _kw = {"bias": ("heads", "full", "none")[_i % 3] if _len > 1 else "heads", "k": min(8, _len)}
    if _kw["bias"] == "none":
        _kw["bias"] = "heads"  # the window and limit need a bias width (the static path always has one)
    KERNEL_CASES[f"len{_len}-gqa{_rep}-{_bits}bit-{str(_dt)[6:]}"] = (
        (1 + _i % 2, 2 if _rep == 1 else 1, _rep, 1 + (_i // 2) % 2, 64, _len, 16, _bits, _dt, 5, 3, 300 + _i), _kw,
        1 if _i % 4 == 0 else None)
# the modes, a start offset, a ragged batch, head dim 128 with two value groups
KERNEL_CASES["rank-only"] = ((1, 1, 4, 2, 64, 40, 16, 2, torch.float32, 5, 3, 400), {"attend": False}, None)
KERNEL_CASES["attend-only"] = ((1, 2, 4, 2, 64, 40, 16, 1, torch.float32, 5, 3, 401), {"rank_row": -1}, None)
KERNEL_CASES["lo-ragged"] = ((3, 1, 4, 2, 64, 70, 16, 2, torch.bfloat16, 6, 4, 402), {"lo": 9, "ragged": True}, 1)
KERNEL_CASES["d128-ngv2"] = ((1, 1, 2, 1, 128, 100, 64, 4, torch.float32, 5, 3, 403), {"k": 16}, None)
# the fetched rows are the ranking's own top positions (the largest scores are substituted: attention's softmax
# maximum is then above every term it attends), and packed codes that are a strided, not word-aligned view
KERNEL_CASES["subst-top"] = ((2, 2, 4, 2, 64, 90, 16, 2, torch.float32, 9, 3, 404), {"subst": "top"}, 1)
KERNEL_CASES["codes-unaligned"] = ((1, 2, 4, 1, 64, 50, 16, 1, torch.bfloat16, 5, 3, 405), {"subst": "unaligned"},
                                   None)
# the ranking's top-k through torch.topk over every position (fused_ops._PROB_TOPK_MIN: long rows), not the per-block
# sort the short rows above take
for _cid in ("lo-ragged", "subst-top", "rank-only", "d128-ngv2"):
    _a, _kw, _t = KERNEL_CASES[_cid]
    KERNEL_CASES[f"{_cid}-select-all"] = (_a, {**_kw, "select": "all"}, _t)


def _variant(inp, how):
    """subst="top": fetched rows at the ranking's top positions, holding their dequantized keys and values (the
    static path fetches the full-precision rows of what the low-bit copy ranks first); "unaligned": the packed codes
    as views one byte into a wider buffer (rows not word-aligned)."""
    if how == "top":
        n = inp["fp_pos"].shape[-1] - 1
        _, top = ref.fused_decode(**{**inp, "k": n, "attend": False})
        inp["fp_pos"][..., :n] = top
        k_all = ref.dequantize_keys(inp["kq"], inp["ks"], inp["kz"], inp["bits"], inp["group"], torch.float32)
        v_all = ref.dequantize_values(inp["vq"], inp["vs"], inp["vz"], inp["bits"], inp["group"], torch.float32)
        idx = top.clamp(min=0)[..., None]
        inp["k_fp"][..., :n, :] = k_all.gather(2, idx.expand(-1, -1, -1, k_all.shape[-1])).to(inp["k_fp"].dtype)
        inp["v_fp"][..., :n, :] = v_all.gather(2, idx.expand(-1, -1, -1, v_all.shape[-1])).to(inp["v_fp"].dtype)
    elif how == "unaligned":
        for name in ("kq", "vq"):
            c = inp[name]
            wide = torch.zeros((*c.shape[:-1], c.shape[-1] + 1), dtype=c.dtype)
            wide[..., 1:] = c
            inp[name] = wide[..., 1:]
    return inp


def _run_interpreted(path: str, shard: int, shards: int) -> None:
    """In a child (TRITON_INTERPRET=1): every ``shards``-th case through the kernels, saved with its inputs."""
    import os

    from specache_compile.kernels import fused_ops as fo

    assert os.environ.get("TRITON_INTERPRET") == "1"
    fo.wrap_triton = lambda kernel: kernel  # outside a trace it only launches the kernel
    PROB_TOPK_MIN = fo._PROB_TOPK_MIN
    res = {"fused": {}}
    for i, (cid, (args, kw, tiles)) in enumerate(KERNEL_CASES.items()):
        if i % shards != shard:
            continue
        kw = dict(kw)
        subst = kw.pop("subst", None)
        fo._PROB_TOPK_MIN = 0 if kw.pop("select", None) == "all" else PROB_TOPK_MIN
        inp = _variant(make_inputs(*args, **kw), subst)
        try:
            assert fo.fused_decode_supported(inp["q"], inp["kq"], inp["ks"], inp["vs"], inp["k_fp"], inp["v_fp"],
                                             inp["k_win"], inp["bits"], inp["group"], inp["rank_row"], inp["k"])
            res["fused"][cid] = (inp, fo._fused_decode_triton(**inp, tiles_per_split=tiles))
        except Exception as e:  # recorded, so one failing case does not hide the others
            res["fused"][cid] = (inp, f"{type(e).__name__}: {e}")
    torch.save(res, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    return run_interpreted("test_fused_decode", tmp_path_factory.mktemp("interpreted_fused"), ("fused",))


# slow: the fixture runs every case's kernels under Triton's interpreter in a child process (~15 s on 2 cores)
@pytest.mark.slow
@pytest.mark.parametrize("cid", list(KERNEL_CASES))
def test_kernel_interpreted(interpreted, cid):
    inp, got = interpreted["fused"][cid]
    if cid == "codes-unaligned":
        assert inp["kq"].stride(-2) % 4 != 0  # the case tests what it says
    if isinstance(got, str):
        raise AssertionError(f"the kernel raised {got}")
    _check(inp, *got)


# ----------------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------------

GPU_CASES = {
    # Llama-3-8B layer (32 / 8 heads, D 128), a speculative step, 2 bits
    "llama8b-4099-2bit": ((1, 8, 4, 2, 128, 4099, 64, 2, torch.bfloat16, 64, 129, 11), {"k": 64}),
    "llama8b-batch8-ragged-1bit": ((8, 8, 4, 2, 128, 2050, 64, 1, torch.bfloat16, 64, 129, 12),
                                   {"k": 64, "ragged": True}),
    "gqa8-d64-4bit-fp16": ((2, 4, 8, 2, 64, 3001, 64, 4, torch.float16, 64, 65, 13), {"k": 32, "bias": "full"}),
    "mha-fp32-plain": ((1, 4, 1, 1, 128, 5000, 32, 2, torch.float32, 32, 33, 14), {"k": 32}),
    "rank-only-1bit": ((2, 8, 4, 2, 128, 4099, 64, 1, torch.bfloat16, 64, 129, 15), {"k": 64, "attend": False}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the lent GPU)")
@pytest.mark.parametrize("cid", list(GPU_CASES))
def test_kernel_cuda(cid):
    from specache_compile.kernels import fused_ops as fo

    args, kw = GPU_CASES[cid]
    inp = make_inputs(*args, **kw, device="cuda")
    assert fo.fused_decode_supported(inp["q"], inp["kq"], inp["ks"], inp["vs"], inp["k_fp"], inp["v_fp"],
                                     inp["k_win"], inp["bits"], inp["group"], inp["rank_row"], inp["k"])
    out, top = torch.ops.specache.fused_decode(*inp.values())
    torch.cuda.synchronize()
    _check({n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in inp.items()}, out.cpu(), top.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the lent GPU)")
def test_kernel_cuda_graph_and_no_host_sync():
    """One step as the static path runs it: captured in a CUDA graph and replayed (the same output and top-k on new
    inputs copied into the captured ones), and no host sync in an eager call."""
    args, kw = GPU_CASES["llama8b-4099-2bit"]
    inp = make_inputs(*args, **kw, device="cuda")
    args = list(inp.values())
    torch.ops.specache.fused_decode(*args)  # compile outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.specache.fused_decode(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, top = torch.ops.specache.fused_decode(*args)
    new = make_inputs(*GPU_CASES["llama8b-4099-2bit"][0][:-1], 99, **kw, device="cuda")
    for n, t in new.items():
        if isinstance(t, torch.Tensor):
            inp[n].copy_(t)
    graph.replay()
    want_out, want_top = torch.ops.specache.fused_decode(*inp.values())
    torch.cuda.synchronize()
    assert torch.equal(out, want_out)
    assert torch.equal(top.sort(-1).values, want_top.sort(-1).values)
