"""KVComp's codec (kernels/kvcomp_ops.py) and its Triton decode kernels (kernels/triton/kvcomp.py).

Codec: Huffman round trip lossless on the quant ints, the length limit and Kraft's inequality, symbols the codebook
never saw still encode, the error bound |x - x_hat| <= scale / 2, and fewer bytes than uint8 on skewed data.

Kernels, three-way numerics (shared/STYLE.md): a float64 oracle built from the quant ints *before* encoding (so it
does not trust the decoder), the eager computation at the test dtype (decompress to the dtype, matmul in it), and ours
(the Triton kernel under the interpreter, and the CPU reference op). Ours may err at most FACTOR[dtype] times what
eager errs (plus an fp32-rounding floor where eager is exact). The kernels run in a child process with
``TRITON_INTERPRET=1`` (set before ``triton`` is imported, as tests/kernels/test_triton_attn.py does).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `import specache` uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared tolerance table
from interpreted import run_interpreted  # noqa: E402
from numerics import LOWP_FACTOR, norm_err  # noqa: E402

from specache_compile.config import Config  # noqa: E402
from specache_compile.kernels import kvcomp_ops as ko  # noqa: E402
from specache_compile.policies.kvcomp import KVCompPolicy, compression_stats  # noqa: E402
from specache_compile.runtime.store import Site  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the lent GPU)")
# -n 2 --dist loadgroup (README): every test of this module on one worker, so the interpreted run (a module
# fixture, in a child process) happens once rather than once per worker
pytestmark = pytest.mark.xdist_group("interpreted_kvcomp")
# slow: the `interpreted` fixture runs every case's kernels under Triton's interpreter in a child process
# (~11 s on 2 cores before the first of its tests); `-m slow` (CI) runs them, the GPU session runs the kernels
slow_interpreted = pytest.mark.slow
FACTOR = {torch.float32: 10.0, **LOWP_FACTOR}
FP32_FLOOR = 1e-6  # ours vs the float64 oracle when eager is exact to the last fp32 bit (different summation order)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kv(b, h, n, d, g, outliers=True):
    # keys/values as real ones are: a few outlier channels, so block ranges are wide and the ints skewed to the middle
    x = torch.randn(b, h, n, d, generator=g)
    if outliers:
        x = x * (1.0 + 6.0 * (torch.arange(d) % 17 == 3))
    return x


# ----------------------------------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel,max_len,vl", [(0.05, 12, 128), (0.1, 12, 64), (0.004, 12, 32), (0.05, 6, 16)])
def test_roundtrip_lossless(rel, max_len, vl):
    g = _gen(1)
    x = _kv(2, 3, 64, vl, g)
    q, scale, mn = ko.quantize_ints(x, (1, 3), rel)
    book = ko.build_codebook(q[:, :, :8], ko.n_symbols(rel), max_len)  # from a slice: later data has unseen ints
    grp = ko.group_size(vl, 2 * 3 * 64, max_len)
    words, base, rel16 = ko.encode_vectors(q.reshape(-1, vl), book, grp, word0=3)
    stream = torch.cat([torch.full((3,), -1, dtype=torch.int32), words])  # earlier words must not leak in
    sym = ko.decode_vectors(stream, ko.vector_starts(base, rel16, grp), vl, book.lut, max_len)
    assert torch.equal(sym, q.reshape(-1, vl).long())
    lengths = book.length.tolist()
    assert max(lengths) <= max_len and sum(2.0 ** -x for x in lengths) <= 1.0


def test_length_limit_on_a_very_skewed_histogram():
    # geometric counts make an unlimited Huffman tree as deep as the alphabet: the limit must hold and decode
    n = 40
    sym = torch.cat([torch.full((2 ** min(i, 20),), n - 1 - i, dtype=torch.uint8) for i in range(n)])
    book = ko.build_codebook(sym, n, 8)
    assert max(book.length.tolist()) == 8 and sum(2.0 ** -x for x in book.length.tolist()) <= 1.0
    vecs = sym[: sym.numel() // 16 * 16].view(-1, 16)[:64]
    words, base, rel = ko.encode_vectors(vecs, book, 16)
    got = ko.decode_vectors(words, ko.vector_starts(base, rel, 16), 16, book.lut, 8)
    assert torch.equal(got, vecs.long())


@pytest.mark.parametrize("dims,rel", [((1, 3), 0.1), ((3,), 0.1), ((1, 2, 3), 0.05)])
def test_error_bound(dims, rel):
    x = _kv(2, 4, 32, 64, _gen(2)) + 3.0  # an offset: min_int far from 0
    x[0, :, :4] = 0.7  # a constant region (zero range)
    q, scale, mn = ko.quantize_ints(x, dims, rel)
    x_hat = ko.dequantize_ints(q, scale, mn)
    assert ((x_hat - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-7).all()
    assert int(q.max()) < ko.n_symbols(rel)


def test_compressed_smaller_than_uint8_on_skewed_data():
    x = _kv(1, 8, 1024, 128, _gen(3)).to(torch.bfloat16)
    q, scale, mn = ko.quantize_ints(x.float().view(1, 8, 16, 64, 128), (1, 3, 4), 0.05)
    book = ko.build_codebook(q, ko.n_symbols(0.05), 12)
    grp = ko.group_size(128, 1024, 12)
    words, base, rel = ko.encode_vectors(q.reshape(-1, 128), book, grp)
    stored = sum(t.numel() * t.element_size() for t in (words, base, rel, scale, mn)) + book.nbytes
    assert stored < q.numel()  # under 8 bits a value, metadata and codebook included
    bits = words.numel() * 32 / q.numel()
    assert bits < math.log2(ko.n_symbols(0.05))  # entropy coding beats the fixed-width code of the alphabet


def test_compress_rows_reference_gather():
    x = _kv(2, 3, 37, 64, _gen(4)).to(torch.bfloat16)
    p = ko.compress_rows(x, rel=0.1)
    idx = torch.tensor([0, 36, 5, 5, -1, 37, 12]).expand(2, 3, 7)
    got = ko.gather_decompress(p, idx)
    q, scale, mn = ko.quantize_ints(x, (3,), 0.1)
    want = ko.dequantize_ints(q, scale, mn).to(torch.bfloat16)
    for j, i in enumerate(idx[0, 0].tolist()):
        if 0 <= i < 37:
            assert torch.equal(got[:, :, j], want[:, :, i])
        else:
            assert (got[:, :, j] == 0).all()
    # appended rows (the first payload's codebook) decompress like rows compressed at once
    p2 = ko.append_rows(ko.compress_rows(x[:, :, :32], rel=0.1), x[:, :, 32:], rel=0.1)
    assert torch.equal(ko.gather_decompress(p2, idx), got)
    with pytest.raises(ValueError, match="whole offset groups"):
        ko.append_rows(p2, x)
    # bf16 rows at rel 0.1 (at 512 tokens: the 8 KiB decode table is small next to the data)
    assert ko.compress_rows(_kv(1, 8, 512, 128, _gen(5)).to(torch.bfloat16), rel=0.1).compression_ratio() > 3.0


# ----------------------------------------------------------------------------------------------------------------------
# kernel cases (inputs built deterministically, with the quant ints kept for the oracle)
# ----------------------------------------------------------------------------------------------------------------------

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _keys_case(b, hkv, rep, sq, d, n, kb, dt, seed, max_len=12, rel=0.05):
    g = _gen(seed)
    dtype = DT[dt]
    k = _kv(b, hkv, n, d, g).to(dtype)
    q8, scale, mn = ko.quantize_ints(k.float().view(b, hkv, n // kb, kb, d), (1, 3, 4), rel)
    book = ko.build_codebook(q8, ko.n_symbols(rel), max_len)
    grp = ko.group_size(d, kb, max_len)
    words, base, rel16 = ko.encode_vectors(q8.reshape(-1, d), book, grp)
    # a transposed query (strided in every dim but the last)
    q = torch.randn(b, sq, hkv * rep, d, generator=g).to(dtype).transpose(1, 2)
    args = (q, words, base.view(b, hkv, n // grp), rel16.view(b, hkv, n), scale.reshape(b, n // kb),
            mn.reshape(b, n // kb), book.lut, grp, kb, max_len, 1.0 / math.sqrt(d))
    k64 = ((q8.double() + mn.double()) * scale.double()).reshape(b, hkv, n, d)
    return args, k64


def _values_case(b, hkv, rep, sq, dv, nvb, vb, dt, seed, max_len=10, rel=0.1):
    g = _gen(seed)
    dtype = DT[dt]
    n = nvb * vb
    v = _kv(b, hkv, n, dv, g).to(dtype)
    q8, scale, mn = ko.quantize_ints(v.float(), (1, 3), rel)
    book = ko.build_codebook(q8, ko.n_symbols(rel), max_len)
    grp = ko.group_size(vb, dv, max_len)
    sym = q8.reshape(b, hkv, nvb, vb, dv).transpose(-1, -2).reshape(-1, vb)
    words, base, rel16 = ko.encode_vectors(sym, book, grp)
    logits = torch.randn(b, hkv * rep, sq, n, generator=g) * 2
    p = torch.softmax(logits, -1)
    args = (p, words, base.view(b, hkv, nvb, dv // grp), rel16.view(b, hkv, nvb, dv), scale.reshape(b, n),
            mn.reshape(b, n), book.lut, grp, vb, max_len)
    v64 = (q8.double() + mn.double()) * scale.double()
    return args, v64, dtype


SCORE_CASES = {
    # b, hkv, rep, sq, d, n, kb, dtype, seed
    "mha-d64-b2-fp32": (2, 2, 1, 1, 64, 128, 64, "fp32", 10),
    "gqa4-d128-sq2-bf16": (1, 2, 4, 2, 128, 64, 32, "bf16", 11),
    "gqa8-d64-b2-bf16-n100": (2, 1, 8, 1, 64, 96, 32, "bf16", 12),
}
PV_CASES = {
    # b, hkv, rep, sq, dv, nvb, vb, dtype, seed
    "mha-d64-b2-fp32": (2, 2, 1, 1, 64, 2, 32, "fp32", 20),
    "gqa4-d128-vb128-bf16": (1, 1, 4, 1, 128, 1, 128, "bf16", 21),
    "gqa8-d64-sq2-fp16": (2, 1, 8, 2, 64, 3, 16, "fp16", 22),
}
ROW_CASES = {
    # b, h, n, d, k, dtype, seed
    "d64-bf16": (2, 2, 50, 64, 20, "bf16", 30),
    "d128-fp32": (1, 3, 40, 128, 9, "fp32", 31),
}
# the compressed host store's fetch (runtime/host_codec.py): b, h, d, dtype, writes (rows per write), k, seed
STORE_CASES = {
    "chunks-bf16": (2, 2, 64, "bf16", (70, 40, 1, 1, 33), 24, 33),
}
# policy decode through the kernels: b, hkv, rep, d, prefill, steps, options
POLICY_CASES = {
    "gqa4-d64": (2, 2, 4, 64, 70, 2, {"k_block": 16, "v_block": 32, "k_recent": 8, "v_recent": 16}),
}


def _rows_case(b, h, n, d, k, dt, seed):
    g = _gen(seed)
    x = _kv(b, h, n, d, g).to(DT[dt])
    p = ko.compress_rows(x, rel=0.1)
    idx = torch.randint(-2, n + 2, (b, h, k), generator=g)
    return p, idx


def _store_case(b, h, d, dt, writes, k, seed):
    """A host codec store written in several calls (several compressed chunks, a partial tail) and indices that hit
    every part: rows at chunk boundaries, the tail, and outside [0, N)."""
    from specache_compile.runtime.host_codec import KVCompHostStore

    g = _gen(seed)
    n = sum(writes)
    x = _kv(b, h, n, d, g).to(DT[dt])
    store, pos = KVCompHostStore(rel=0.05), 0
    for w in writes:
        store.write(pos, x[:, :, pos : pos + w], x[:, :, pos : pos + w])
        pos += w
    rows = store.k
    edges = torch.tensor([0, rows.group - 1, rows.group, 63, 64, 95, 96, rows.n_compressed - 1, n - 1])
    idx = torch.cat([edges, torch.randint(0, n, (k - len(edges) - 1,), generator=g), torch.tensor([-1])])
    idx = idx.expand(b, h, k).contiguous()
    return x, store, idx


def _store_kernel(rows, idx, dtype):
    """The compressed prefix's rows through the two kernels, from the store's own buffers and strides."""
    out = torch.empty((*idx.shape, rows.dim), dtype=dtype)
    view = [t.view().permute(1, 2, 0) for t in (rows.base, rows.rel16, rows.scale, rows.min_int)]
    return ko._gather_rows_into_triton(out, idx.clamp(max=rows.n_compressed - 1), rows.words.data, rows.words.length,
                                       *view, rows.book.lut, rows.group, rows.max_len)


def _policy_site(b, hkv, rep, d, n, steps, opts, seed=40, dtype=torch.float32):
    g = _gen(seed)
    pol = KVCompPolicy(Config(policy="kvcomp", policy_options=opts))
    site = Site(name="l0", batch=b, heads=hkv, head_dim=d, v_head_dim=d, dtype=dtype,
                device=torch.device("cpu"), host_device=torch.device("cpu"), pin=False, keep_full=False)
    pol.reset(site)
    k, v = _kv(b, hkv, n + steps, d, g).to(dtype), torch.randn(b, hkv, n + steps, d, generator=g).to(dtype)
    qs = torch.randn(steps, b, hkv * rep, 1, d, generator=g).to(dtype)
    return pol, site, k, v, qs


def _policy_run(pol, site, k, v, qs, n, no_sync=False):
    outs = []
    pol.append(site, k[:, :, :n], v[:, :, :n], 0)
    site._length = n
    for i in range(qs.shape[0]):
        pos = n + i
        nk, nv = site.tier["nk"], site.tier["nv"]
        if no_sync:  # a step that compresses nothing must not wait for the device (compressing a block does)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            pol.append(site, k[:, :, pos : pos + 1], v[:, :, pos : pos + 1], pos)
            site._length = pos + 1
            outs.append(pol.decode(site, qs[i], None, 0, pos + 1, 1.0 / math.sqrt(k.shape[-1])))
        finally:
            if no_sync:
                torch.cuda.set_sync_debug_mode("default")
        assert not no_sync or (site.tier["nk"], site.tier["nv"]) == (nk, nv)
    return outs


def _run_interpreted(path: str, shard: int = 0, shards: int = 1) -> None:
    """In a child (TRITON_INTERPRET=1): every case through the Triton kernels, saved (one child: no sharding)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    ko.wrap_triton = lambda kernel: kernel  # the interpreter launches the kernel object itself
    res = {"scores": {}, "pv": {}, "rows": {}, "store": {}, "policy": {}}
    for cid, a in SCORE_CASES.items():
        args, _ = _keys_case(*a)
        res["scores"][cid] = ko._kvcomp_scores_triton(*args)
    for cid, a in PV_CASES.items():
        args, _, _ = _values_case(*a)
        res["pv"][cid] = ko._kvcomp_pv_triton(*args)
    for cid, a in ROW_CASES.items():
        p, idx = _rows_case(*a)
        res["rows"][cid] = ko._kvcomp_gather_rows_triton(idx, p.words, p.base, p.rel, p.scale, p.min_int, p.book.lut,
                                                          p.group, p.book.max_len, p.shape[3], p.dtype)
    for cid, a in STORE_CASES.items():
        _, store, idx = _store_case(*a)
        res["store"][cid] = _store_kernel(store.k, idx, DT[a[3]])
    # the policy with the ops swapped for the launchers (on CPU the ops dispatch to the reference)
    ko.kvcomp_scores, ko.kvcomp_pv = ko._kvcomp_scores_triton, ko._kvcomp_pv_triton
    for cid, (b, hkv, rep, d, n, steps, opts) in POLICY_CASES.items():
        pol, site, k, v, qs = _policy_site(b, hkv, rep, d, n, steps, opts)
        res["policy"][cid] = _policy_run(pol, site, k, v, qs, n)
    torch.save(res, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    # one child: the policy cases carry state across steps, and the whole module runs in about a minute
    return run_interpreted("test_triton_kvcomp", tmp_path_factory.mktemp("interpreted_kvcomp"),
                           ("scores", "pv", "rows", "store", "policy"), shards=1, timeout=600)


REFERENCE_ONLY = object()  # the `got` of a check of the reference op alone (no kernel ran)


def _scores_three_way(args, k64, got):
    """The reference op against the float64 oracle, then (unless ``got`` is REFERENCE_ONLY) the kernel's output."""
    q = args[0]
    b, hq, sq, d = q.shape
    hkv = k64.shape[1]
    sm = args[-1]
    qg = q.double().reshape(b, hkv, (hq // hkv) * sq, d)
    oracle = (sm * qg @ k64.transpose(-1, -2)).reshape(b, hq, sq, -1)
    kd = k64.to(q.dtype).repeat_interleave(hq // hkv, 1)
    eager = (q @ kd.transpose(-1, -2) * sm).float()
    ref_op = ko.kvcomp_scores(*args)  # the registered op: on CPU the reference (decompress, then matmul)
    e_eager = norm_err(eager, oracle)
    bound = FACTOR[q.dtype] * e_eager + FP32_FLOOR
    assert norm_err(ref_op, oracle) <= bound, (norm_err(ref_op, oracle), e_eager)
    if got is not REFERENCE_ONLY:
        # a kernel that returned nothing (or something else) fails here rather than skipping the check
        assert isinstance(got, torch.Tensor), f"the kernel returned {got!r}"
        assert got.shape == oracle.shape and got.dtype == torch.float32
        assert norm_err(got, oracle) <= bound, (norm_err(got, oracle), e_eager)
        assert norm_err(got, ref_op) <= bound


def _pv_three_way(args, v64, dtype, got):
    """As _scores_three_way, for P @ V."""
    p = args[0]
    b, hq, sq, n = p.shape
    hkv = v64.shape[1]
    pg = p.double().reshape(b, hkv, (hq // hkv) * sq, n)
    oracle = (pg @ v64).reshape(b, hq, sq, -1)
    eager = (p.to(dtype).reshape(b, hkv, -1, n) @ v64.to(dtype)).float().reshape(b, hq, sq, -1)
    ref_op = ko.kvcomp_pv(*args)
    e_eager = norm_err(eager, oracle)
    bound = FACTOR[dtype] * e_eager + FP32_FLOOR
    assert norm_err(ref_op, oracle) <= bound, (norm_err(ref_op, oracle), e_eager)
    if got is not REFERENCE_ONLY:
        assert isinstance(got, torch.Tensor), f"the kernel returned {got!r}"
        assert got.shape == oracle.shape
        assert norm_err(got, oracle) <= bound, (norm_err(got, oracle), e_eager)


@slow_interpreted
@pytest.mark.parametrize("cid", list(SCORE_CASES))
def test_scores_kernel_interpreted(interpreted, cid):
    args, k64 = _keys_case(*SCORE_CASES[cid])
    _scores_three_way(args, k64, interpreted["scores"][cid])


@slow_interpreted
@pytest.mark.parametrize("cid", list(PV_CASES))
def test_pv_kernel_interpreted(interpreted, cid):
    args, v64, dtype = _values_case(*PV_CASES[cid])
    _pv_three_way(args, v64, dtype, interpreted["pv"][cid])


@slow_interpreted
@pytest.mark.parametrize("cid", list(ROW_CASES))
def test_gather_rows_kernel_interpreted(interpreted, cid):
    p, idx = _rows_case(*ROW_CASES[cid])
    got = interpreted["rows"][cid]
    want = ko.gather_decompress_reference(p, idx)
    assert got.dtype == p.dtype and got.shape == want.shape
    # both dequantize in fp32 then round to the dtype: equal up to one unit in the last place of the dtype (the
    # interpreter's fp32 -> bf16 cast need not round to nearest)
    tol = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[p.dtype]
    assert ((got.float() - want.float()).abs() <= tol * want.float().abs() + 1e-6).all()


@slow_interpreted
@pytest.mark.parametrize("cid", list(STORE_CASES))
def test_host_store_fetch_kernels_interpreted(interpreted, cid):
    # the staging kernel (each row's words copied from the store's buffers) then the row decoder, against the
    # quantization they must reproduce: every compressed row exactly (fp32 dequant, one rounding to the dtype)
    x, store, idx = _store_case(*STORE_CASES[cid])
    got = interpreted["store"][cid]
    c = idx.clamp(max=store.k.n_compressed - 1)  # what the kernels were given (the store clamps; -1 stays out)
    q, scale, mn = ko.quantize_ints(x, (3,), 0.05)
    want = ko.dequantize_ints(q, scale, mn).to(x.dtype)
    want = torch.where((c >= 0)[..., None], torch.gather(want, 2, c.clamp(min=0)[..., None].expand(-1, -1, -1,
                                                                                                    x.shape[3])), 0.0)
    tol = 2.0**-7  # the interpreter's fp32 -> bf16 cast need not round to nearest
    assert got.shape == want.shape and got.dtype == x.dtype
    assert ((got.float() - want.float()).abs() <= tol * want.float().abs() + 1e-6).all()
    assert (got[:, :, -1] == 0).all()  # idx -1: a zero row


@slow_interpreted
@pytest.mark.parametrize("cid", list(POLICY_CASES))
def test_policy_decode_kernels_match_reference(interpreted, cid):
    b, hkv, rep, d, n, steps, opts = POLICY_CASES[cid]
    pol, site, k, v, qs = _policy_site(b, hkv, rep, d, n, steps, opts)
    want = _policy_run(pol, site, k, v, qs, n)
    assert site.tier["nk"] > 0 and site.tier["nv"] > 0  # both compressed parts and both recent buffers in play
    assert site.tier["k_rec"].length > 0 and site.tier["v_rec"].length > 0
    assert len(interpreted["policy"][cid]) == len(want) == steps  # zip below would pass over an empty list
    for got, w in zip(interpreted["policy"][cid], want):
        assert norm_err(got, w) <= 1e-5
    assert compression_stats(site)["compression_ratio"] > 1.0


# ----------------------------------------------------------------------------------------------------------------------
# reference ops at more shapes (no interpreter: fast)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_reference_ops_gqa_and_head_dims(rep, d):
    args, k64 = _keys_case(2, 2, rep, 1, d, 128, 64, "bf16", 50 + rep + d)
    _scores_three_way(args, k64, REFERENCE_ONLY)
    args, v64, dtype = _values_case(2, 2, rep, 1, d, 2, 64, "bf16", 60 + rep + d)
    _pv_three_way(args, v64, dtype, REFERENCE_ONLY)


def test_ops_trace_with_fakes():
    # the ops have fake impls: torch.compile traces through them without running the kernels
    args, _ = _keys_case(1, 2, 2, 1, 64, 64, 64, "fp32", 70)

    def f(q):
        return ko.kvcomp_scores(q, *args[1:]) * 2

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(args[0])
    assert torch.allclose(got, f(args[0]))


# ----------------------------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B-like shapes, bf16, D = 128, a few thousand tokens
# ----------------------------------------------------------------------------------------------------------------------


def _to(args, dev):
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


@gpu
@needs_cuda
@pytest.mark.parametrize("rep", [1, 4, 8])
def test_gpu_kernels_match_oracle(rep):
    args, k64 = _keys_case(1, 8 // max(1, rep // 4), rep, 1, 128, 4096, 64, "bf16", 80 + rep)
    got = ko.kvcomp_scores(*_to(args, "cuda")).cpu()
    _scores_three_way(args, k64, got)
    args, v64, dtype = _values_case(2, 4, rep, 1, 128, 24, 128, "bf16", 90 + rep)
    got = ko.kvcomp_pv(*_to(args, "cuda")).cpu()
    _pv_three_way(args, v64, dtype, got)


@gpu
@needs_cuda
def test_gpu_gather_rows_and_policy():
    x = _kv(2, 8, 3000, 128, _gen(95)).to(torch.bfloat16).cuda()
    p = ko.compress_rows(x, rel=0.1)
    idx = torch.randint(0, 3000, (2, 8, 256), device="cuda")
    got = ko.gather_decompress(p, idx)
    pc = ko.RowPayload(*(t.cpu() for t in (p.words, p.base, p.rel, p.scale, p.min_int)),
                       ko.Codebook(p.book.code.cpu(), p.book.length.cpu(), p.book.lut.cpu(), p.book.max_len),
                       p.group, p.shape, p.dtype)
    want = ko.gather_decompress_reference(pc, idx.cpu())
    assert ((got.float().cpu() - want.float()).abs() <= 2.0**-7 * want.float().abs() + 1e-6).all()
    # the policy on the GPU (kernels) against itself on the CPU (references), bf16, default options, 3000 tokens,
    # batch 2: the same quant ints on both, fp32 sums in another order, one bf16 rounding of the output
    b, hkv, rep, d, n, steps = 2, 8, 4, 128, 3000, 3
    pol, site, k, v, qs = _policy_site(b, hkv, rep, d, n, steps, {}, dtype=torch.bfloat16)
    want = _policy_run(pol, site, k, v, qs, n)
    pol, site, _, _, _ = _policy_site(b, hkv, rep, d, n, steps, {}, dtype=torch.bfloat16)
    site.device = torch.device("cuda")
    pol.reset(site)
    got = _policy_run(pol, site, k.cuda(), v.cuda(), qs.cuda(), n, no_sync=True)
    for g_, w in zip(got, want):
        assert g_.dtype == torch.bfloat16 and norm_err(g_.cpu(), w) <= 1e-2
    assert compression_stats(site)["compression_ratio"] > 3.0
