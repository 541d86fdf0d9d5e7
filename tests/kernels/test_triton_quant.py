"""Tests of the Triton quantize / gather kernels (kernels/triton/) against kernels/reference.py, bit for bit.

CPU: the kernels run under Triton's interpreter, in ONE child process. ``TRITON_INTERPRET=1`` must be set before
``triton`` is imported (``@triton.jit`` reads it when it decorates, Triton's own ``tl.min`` / ``tl.sum`` included), and
by the time this module runs other test modules have imported specache and Triton; setting it for the whole session
would change every other test. So the ``interpreted`` fixture runs :func:`_run_interpreted` in a child with the
variable set, which computes every case in ``CASES`` with the kernels and saves inputs and outputs; the tests here
compare them with the reference. Argument errors are raised before any launch and are tested in this process.

GPU (``gpu`` marker, skipped without CUDA): the zero-copy gather from pinned host memory, the quantize ops on CUDA
against the CPU reference, and Inductor lowering the triton_op to the kernel itself.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from interpreted import run_interpreted  # noqa: E402

from specache_compile.kernels import quant_ops as qo  # noqa: E402
from specache_compile.kernels import reference as ref  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run on the lent GPU)")
# -n 2 --dist loadgroup (README): every test of this module on one worker, so the interpreted run (a module
# fixture, in a child process) happens once rather than once per worker
pytestmark = pytest.mark.xdist_group("interpreted_quant")
# slow: the `interpreted` fixture runs every case's kernels under Triton's interpreter in a child process
# (~16 s on 2 cores before the first of its tests); `-m slow` (CI) runs them, the GPU session runs the kernels
slow_interpreted = pytest.mark.slow
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _keys(b, h, s, d, dtype, seed, *, contiguous=True):
    # random keys with a few outlier channels, as real keys have (what per-channel quantization is for)
    if contiguous:
        x = torch.randn(b, h, s, d, generator=_gen(seed))
    else:
        # [B, S, H, D] storage seen as [B, H, S, D], sliced along S: the layouts HF models and the policy hand over
        x = torch.randn(b, s + 5, h, d, generator=_gen(seed)).transpose(1, 2)[:, :, 2 : 2 + s]
    return (x * (1.0 + 8.0 * (torch.arange(d) % 17 == 3))).to(dtype)


def _special(bits, dtype):
    # [2, 1, 16, 64]: exact halfway points between levels (round half to even), constant groups (scale 0), the
    # group max (the 1-bit clamp), far clusters, one nonzero, a range near bf16's resolution at 1.0
    levels = (1 << bits) - 1
    t = torch.arange(16, dtype=torch.float32)[:, None]
    cols = [
        (t % (2 * levels + 1)) * 0.5,
        torch.full((16, 1), 3.0),
        t * 0.25 - 2.0,
        (t % 2) * 1e-3 + 1.0,
        torch.where(t == 5, 1e4, -1e4) + t,
        torch.where(t == 0, 7.0, 0.0),
    ]
    x = torch.cat(cols * 11, dim=1)[:, :64]
    return x.expand(2, 1, 16, 64).clone().to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# the cases the interpreted child computes: id -> (what, bits, group, make input)
# ----------------------------------------------------------------------------------------------------------------------

GROUP = 16  # small groups keep the interpreter fast; the kernels take any group (a constexpr)
QUANT_CASES = {}
for _bits in (1, 2, 4):
    for _d in (64, 128):
        for _dt in (torch.float32, torch.bfloat16):
            # H 1, 4, 8 and S = group, 3 * group: every value, one head and many, one group and many
            for _h, _n in ((1, 1), (1, 3), (4, 3), (8, 1)):
                _tag = f"b{_bits}-d{_d}-{DTYPE_NAMES[_dt]}-h{_h}-s{_n}g"
                _seed = _bits * 1000 + _d * 10 + _h + _n
                _mk = (lambda h, s, d, dt, seed: lambda: _keys(1, h, s, d, dt, seed))(_h, _n * GROUP, _d, _dt, _seed)
                QUANT_CASES[f"keys-{_tag}"] = ("keys", _bits, GROUP, _mk)
                QUANT_CASES[f"values-{_tag}"] = ("values", _bits, GROUP, _mk)
                if _h == 4:  # group clamped to D: one group per token
                    QUANT_CASES[f"values-{_tag}-wide"] = ("values", _bits, 1024, _mk)
    for _dt in (torch.float32, torch.bfloat16, torch.float16):
        _tag = f"b{_bits}-{DTYPE_NAMES[_dt]}"
        _nc = (lambda b, dt: lambda: _keys(2, 2, 48, 64, dt, b, contiguous=False))(_bits, _dt)
        QUANT_CASES[f"keys-noncontig-{_tag}"] = ("keys", _bits, 16, _nc)
        QUANT_CASES[f"values-noncontig-{_tag}"] = ("values", _bits, 16, _nc)
        # a group that is not a power of two and longer than the kernel's 64-token step; a head dim that is not one
        _odd = (lambda b, dt: lambda: _keys(1, 2, 96, 80, dt, b + 7))(_bits, _dt)
        QUANT_CASES[f"keys-odd-{_tag}"] = ("keys", _bits, 96, _odd)
        QUANT_CASES[f"values-odd-{_tag}"] = ("values", _bits, 40, _odd)
        _sp = (lambda b, dt: lambda: _special(b, dt))(_bits, _dt)
        QUANT_CASES[f"keys-special-{_tag}"] = ("keys", _bits, 16, _sp)
        # the same columns as per-token groups: [2, 1, 64, 16]
        _spv = (lambda b, dt: lambda: _special(b, dt).transpose(2, 3).contiguous())(_bits, _dt)
        QUANT_CASES[f"values-special-{_tag}"] = ("values", _bits, 16, _spv)
    # one channel a group, narrower than a byte's 8 // bits codes: the launcher's fallback to the reference op
    _narrow = (lambda b: lambda: _keys(1, 2, 5, 16, torch.float32, b + 9))(_bits)
    QUANT_CASES[f"values-narrow-b{_bits}"] = ("values", _bits, 1, _narrow)


def _gather_cases():
    # id -> (src, idx, out): the same-device path with CPU tensors
    cases = {}
    for dt, d in ((torch.float16, 128), (torch.bfloat16, 64), (torch.float32, 80)):  # 80: rows masked along D
        b, h, s = 2, 2, 70
        src = torch.randn(b, h, s, d, generator=_gen(d)).to(dt)
        g = _gen(d + 1)
        idxs = {
            "k1": torch.randint(0, s, (b, h, 1), generator=g),
            "kS": torch.stack([torch.randperm(s, generator=g) for _ in range(b * h)]).reshape(b, h, s),
            "repeated": torch.randint(0, 4, (b, h, 45), generator=g),
            "ends": torch.tensor([0, s - 1, s - 1, 0]).expand(b, h, 4),
            "int32": torch.randint(0, s, (b, h, 33), generator=g).to(torch.int32),
        }
        for name, idx in idxs.items():
            cases[f"{name}-d{d}-{DTYPE_NAMES[dt]}"] = (src, idx, None)
    # the store hands over a narrow() of a capacity buffer; the fetch buffer is sliced to K rows
    store = torch.randn(1, 4, 100, 128, generator=_gen(5)).to(torch.bfloat16)
    idx = torch.randint(0, 60, (1, 4, 40), generator=_gen(6))
    cases["strided-store"] = (store.narrow(2, 0, 60), idx, torch.zeros(1, 4, 64, 128, dtype=torch.bfloat16))
    # [B, S, H, D] storage: src strided in every dim
    cases["transposed-src"] = (torch.randn(1, 60, 4, 128, generator=_gen(7)).transpose(1, 2), idx, None)
    cases["out-of-range"] = (torch.randn(1, 1, 8, 64), torch.tensor([[[0, 8]]]), None)
    return cases


def _run_interpreted(path: str, shard: int, shards: int) -> None:
    """In a child (TRITON_INTERPRET=1): every ``shards``-th case through the kernels, saved with its inputs."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # wrap_triton returns an interpreted kernel as is on torch >= 2.13 and raises on older torch; outside a trace it
    # only launches the kernel anyway
    qo.wrap_triton = lambda kernel: kernel
    results = {"quant": {}, "gather": {}}
    for i, (cid, (what, bits, group, make)) in enumerate(QUANT_CASES.items()):
        if i % shards != shard:
            continue
        x = make()
        fn = qo._quantize_keys_triton if what == "keys" else qo._quantize_values_triton
        try:
            results["quant"][cid] = (x, fn(x, bits, group))
        except Exception as e:  # recorded, so one failing case does not hide the others
            results["quant"][cid] = (x, f"{type(e).__name__}: {e}")
    for i, (cid, (src, idx, buf)) in enumerate(_gather_cases().items()):
        if i % shards != shard:
            continue
        k = idx.shape[2]
        out = torch.full((*idx.shape, src.shape[-1]), float("nan"), dtype=src.dtype) if buf is None else buf[:, :, :k]
        try:
            qo._gather_rows_triton(src, idx, out, src.shape, src.stride())
            results["gather"][cid] = (src, idx, out, buf)
        except Exception as e:
            results["gather"][cid] = (src, idx, f"{type(e).__name__}: {e}", buf)
    if shard == 0:  # the static decode path's write of new rows into the store at device positions
        results["scatter"] = {}
        for dt, d in ((torch.bfloat16, 128), (torch.float32, 80)):
            src = torch.randn(2, 3, 2, d, generator=_gen(d + 2)).to(dt)
            dst = torch.zeros(2, 3, 50, d, dtype=dt)
            idx = torch.tensor([17, 49])
            try:
                qo._scatter_rows_triton(src, idx, dst, dst.shape, dst.stride())
                results["scatter"][str(dt)] = (src, idx, dst)
            except Exception as e:
                results["scatter"][str(dt)] = (src, idx, f"{type(e).__name__}: {e}")
    if shard == shards - 1:  # the static path's group quantize from its ring into the copy, offsets on the device
        results["group_static"] = {}
        for cid, case in GROUP_STATIC_CASES.items():
            src, offsets, bufs = _group_static_inputs(*case)
            try:
                qo._quantize_group_triton(src, offsets, *bufs, case[1], case[2], case[0])
                results["group_static"][cid] = bufs
            except Exception as e:
                results["group_static"][cid] = f"{type(e).__name__}: {e}"
    torch.save(results, path)


# id -> (kind, bits, group, dtype, D): the ring holds 3 groups; its second goes to row 2 * group (key group 2) of a
# copy of 4 groups, as policies/specache_static.py does once the ring is full
GROUP_STATIC_CASES = {
    "keys-2bit-bf16": ("keys", 2, 64, torch.bfloat16, 128),
    "values-2bit-bf16": ("values", 2, 64, torch.bfloat16, 128),
    "keys-1bit-fp32": ("keys", 1, 32, torch.float32, 64),
    "values-4bit-fp16-g32": ("values", 4, 32, torch.float16, 64),
    "values-2bit-group-over-d": ("values", 2, 64, torch.bfloat16, 32),
    "keys-2bit-group-over-d": ("keys", 2, 128, torch.float16, 64),
}


def _group_static_inputs(kind, bits, group, dtype, d):
    b, h = 2, 3
    src = _keys(b, h, 3 * group, d, dtype, seed=group + d + bits)
    offsets = torch.tensor([group, 2 * group, 2])
    rows = 4 * group
    codes = torch.zeros(b, h, rows, d * bits // 8, dtype=torch.uint8)
    if kind == "keys":
        scale, zero = torch.zeros(b, h, 4, d, dtype=dtype), torch.zeros(b, h, 4, d, dtype=dtype)
    else:
        ng = d // min(group, d)
        scale, zero = torch.zeros(b, h, rows, ng, dtype=dtype), torch.zeros(b, h, rows, ng, dtype=dtype)
    return src, offsets, (codes, scale, zero)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted("test_triton_quant", tmp_path_factory.mktemp("interpreted"),
                           ("quant", "gather", "scatter", "group_static"))


@slow_interpreted
@pytest.mark.parametrize("cid", list(GROUP_STATIC_CASES))
def test_group_quantize_with_device_offsets_equals_the_ops(interpreted, cid):
    """The row-offset kernels (quantize_*_at_kernel: the ring's group read at a device row, the copy written at device
    rows) leave the buffers exactly as index_select + the quantize op + index_copy_ do (quantize_group_static's CPU
    path)."""
    got = interpreted["group_static"][cid]
    if isinstance(got, str):
        raise AssertionError(f"the kernel raised {got}")
    kind, bits, group, _, _ = GROUP_STATIC_CASES[cid]
    src, offsets, want = _group_static_inputs(*GROUP_STATIC_CASES[cid])
    qo.quantize_group_static(src, offsets, *want, bits, group, kind)
    assert want[0][:, :, 2 * group : 3 * group].any()  # the group was written where the offsets say
    for name, g, w in zip(("codes", "scale", "zero"), got, want):
        assert torch.equal(g, w), name


def test_group_quantize_refuses_an_unknown_kind():
    src, offsets, bufs = _group_static_inputs("keys", 2, 64, torch.float32, 64)
    with pytest.raises(ValueError, match="kind expected 'keys' or 'values'"):
        qo.quantize_group_static(src, offsets, *bufs, 2, 64, "both")


def _assert_same(got, want):
    if isinstance(got, str):
        raise AssertionError(f"the kernel raised {got}")
    for name, g, w in zip(("packed", "scale", "zero"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if not torch.equal(g, w):
            bad = (g != w).nonzero()
            raise AssertionError(f"{name}: {len(bad)} of {g.numel()} elements differ, first at {bad[0].tolist()}")


def _gather_want(src, idx):
    b, h, _ = idx.shape
    return src[torch.arange(b)[:, None, None], torch.arange(h)[None, :, None], idx.long()]


# ----------------------------------------------------------------------------------------------------------------------
# interpreted kernels against the reference
# ----------------------------------------------------------------------------------------------------------------------


@slow_interpreted
@pytest.mark.parametrize("cid", list(QUANT_CASES))
def test_quantize_matches_reference(interpreted, cid):
    what, bits, group, _ = QUANT_CASES[cid]
    x, got = interpreted["quant"][cid]
    want = (ref.quantize_keys if what == "keys" else ref.quantize_values)(x, bits, group)
    _assert_same(got, want)


@slow_interpreted
@pytest.mark.parametrize("cid", list(_gather_cases()))
def test_gather_matches_indexing(interpreted, cid):
    src, idx, out, buf = interpreted["gather"][cid]
    if isinstance(out, str):
        raise AssertionError(f"the kernel raised {out}")
    want = _gather_want(src, idx.clamp(0, src.shape[2] - 1))
    oob = (idx < 0) | (idx >= src.shape[2])  # out-of-range positions read nothing: zero rows
    want[oob] = 0
    assert torch.equal(out, want)
    if buf is not None:  # nothing past K written
        assert torch.equal(buf[:, :, idx.shape[2] :], torch.zeros_like(buf[:, :, idx.shape[2] :]))


@slow_interpreted
@pytest.mark.parametrize("dt", ["torch.bfloat16", "torch.float32"])
def test_scatter_writes_the_rows_at_the_positions(interpreted, dt):
    src, idx, dst = interpreted["scatter"][dt]
    if isinstance(dst, str):
        raise AssertionError(f"the kernel raised {dst}")
    want = torch.zeros_like(dst)
    want[:, :, idx] = src
    assert torch.equal(dst, want)


def test_static_row_movers_on_cpu():
    src = torch.randn(1, 2, 10, 8)
    out = torch.full((1, 2, 3, 8), float("nan"))
    qo.gather_rows_static(src, torch.tensor([[[1, -1, 9]], [[10, 0, 2]]]).reshape(1, 2, 3), out)
    assert torch.equal(out[0, 0, 0], src[0, 0, 1]) and torch.equal(out[0, 0, 2], src[0, 0, 9])
    assert not out[0, 0, 1].any() and not out[0, 1, 0].any()  # -1 and 10 (past the end): zero rows
    dst = torch.zeros(1, 2, 10, 8)
    qo.scatter_rows_static(src[:, :, :2], torch.tensor([4, 7]), dst)
    assert torch.equal(dst[:, :, [4, 7]], src[:, :, :2]) and not dst[:, :, :4].any()


def test_case_inputs_cover_the_layouts():
    # the table really holds the non-contiguous inputs and shapes it claims to
    assert not QUANT_CASES["keys-noncontig-b2-bf16"][3]().is_contiguous()
    assert {c.split("-h")[1] for c in QUANT_CASES if c.startswith("keys-b")} == {"1-s1g", "1-s3g", "4-s3g", "8-s1g"}


# ----------------------------------------------------------------------------------------------------------------------
# in this process: argument errors, the ops on CPU, fakes, the triton_op registration, the zero-copy wrapper
# ----------------------------------------------------------------------------------------------------------------------


def test_quantize_errors_match_reference():
    k = torch.zeros(1, 1, 24, 64)
    with pytest.raises(ValueError, match="divisible by group"):
        qo._quantize_keys_triton(k, 2, 16)
    with pytest.raises(ValueError, match="bits"):
        qo._quantize_keys_triton(k, 3, 8)
    with pytest.raises(ValueError, match="D divisible by group"):
        qo._quantize_values_triton(k, 2, 48)
    with pytest.raises(ValueError, match="floating-point"):
        qo._quantize_values_triton(k.to(torch.int32), 2, 16)


def test_ops_on_cpu_are_the_reference():
    k = _keys(1, 2, 64, 64, torch.bfloat16, seed=3)
    _assert_same(torch.ops.specache.quantize_keys(k, 2, 32), ref.quantize_keys(k, 2, 32))
    _assert_same(torch.ops.specache.quantize_values(k, 1, 32), ref.quantize_values(k, 1, 32))


@pytest.mark.slow  # Inductor's C++ codegen on CPU: ~6 s with a cold cache on 2 cores
def test_ops_on_cpu_compile_with_inductor():
    k = _keys(1, 2, 64, 64, torch.bfloat16, seed=3)

    def fn(x):
        return (*torch.ops.specache.quantize_keys(x, 4, 32), *torch.ops.specache.quantize_values(x, 4, 32))

    got = torch.compile(fn, fullgraph=True)(k)
    _assert_same(got[:3], ref.quantize_keys(k, 4, 32))
    _assert_same(got[3:], ref.quantize_values(k, 4, 32))


def test_fakes_and_triton_op_registration():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        k = torch.empty(2, 4, 128, 96, dtype=torch.float16)
        p, s, z = torch.ops.specache.quantize_keys(k, 1, 64)
        assert (p.shape, s.shape, z.shape, p.dtype, s.dtype) == (
            (2, 4, 128, 12), (2, 4, 2, 96), (2, 4, 2, 96), torch.uint8, torch.float16
        )
        p, s, z = torch.ops.specache.quantize_values(k, 4, 128)
        assert (p.shape, s.shape, z.shape) == ((2, 4, 128, 48), (2, 4, 128, 1), (2, 4, 128, 1))
    assert qo.HAS_TRITON
    # the kernels torch found inside each triton_op: AOTAutograd's cache key hashes their source
    from torch._library.triton import get_triton_kernels_for_op

    for op in ("quantize_keys", "quantize_values"):
        assert f"{op}_kernel" in {k.fn.__name__ for k in get_triton_kernels_for_op(f"specache::{op}")}


def test_host_pointer_is_a_triton_pointer_argument():
    # What Triton's launcher makes of the zero-copy wrapper: a typed pointer, specialised as 16-byte aligned.
    from triton.runtime.jit import mangle_type

    t = torch.zeros(2, 8, 128, dtype=torch.float16)
    assert mangle_type(qo._HostPointer(t)) == "*fp16"
    assert mangle_type(qo._HostPointer(t), specialize=True) == mangle_type(t, specialize=True)
    assert qo._HostPointer(t).data_ptr() == t.data_ptr()


def test_gather_rows_cpu_is_the_reference():
    src = torch.randn(1, 2, 10, 8)
    idx = torch.tensor([[[1, 3, 3]] * 2])
    assert torch.equal(qo.gather_rows(src, idx), src[:, :, [1, 3, 3]])
    assert qo.GATHER_PATH == "reference"
    with pytest.raises(ValueError, match="range"):
        qo.gather_rows(src, idx + 8)


# ----------------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gather_zero_copy_from_pinned(dtype):
    b, h, cap, s, d = 2, 8, 1024, 1000, 128
    store = torch.randn(b, h, cap, d).to(dtype).pin_memory()
    src = store.narrow(2, 0, s)  # a Growable view
    assert src.is_pinned()
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.zeros(b, h, 256, d, dtype=dtype, device="cuda")
    for kk in (1, 37, 256):
        idx = torch.randint(0, s, (b, h, kk), device="cuda", generator=g)
        out = qo.gather_rows(src, idx, buf[:, :, :kk], "cuda")
        assert qo.GATHER_PATH == "uva", qo.UVA_ERROR
        assert torch.equal(out.cpu(), _gather_want(src, idx.cpu()))
    # K = S with repeats, on a side stream, with the host-sync checker armed: the zero-copy path never syncs
    idx = torch.randint(0, 4, (b, h, s), device="cuda", generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = qo.gather_rows(src, idx, None, "cuda", stream=side)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    assert qo.GATHER_PATH == "uva"
    assert torch.equal(out.cpu(), _gather_want(src, idx.cpu()))
    # an out-of-range position reads nothing and yields a zero row
    out = qo.gather_rows(src, torch.tensor([[[0, s]] * h] * b, device="cuda"), None, "cuda")
    assert torch.equal(out[:, :, 1].cpu(), torch.zeros(b, h, d, dtype=dtype))


@gpu
@needs_cuda
def test_gpu_gather_other_paths():
    b, h, s, d = 1, 4, 300, 128
    src = torch.randn(b, h, s, d, dtype=torch.float16)
    idx = torch.randint(0, s, (b, h, 50), device="cuda")
    want = _gather_want(src, idx.cpu())
    out = qo.gather_rows(src, idx, None, "cuda")  # pageable host memory is not mapped: host gather + copy
    assert qo.GATHER_PATH == "host_copy"
    assert torch.equal(out.cpu(), want)
    out = qo.gather_rows(src.cuda(), idx, None, "cuda")  # already on the device
    assert qo.GATHER_PATH == "device"
    assert torch.equal(out.cpu(), want)
    out = qo.gather_rows(src.cuda(), idx)
    assert qo.GATHER_PATH == "device" and out.is_cuda
    assert torch.equal(out.cpu(), want)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gpu_quantize_matches_cpu_reference(bits, dtype):
    shapes = ((1, 8, 4096, 128, 64, True), (2, 4, 3 * 128, 64, 128, False), (1, 2, 2 * 96, 80, 96, True))
    for b, h, s, d, group, contiguous in shapes:
        k = _keys(b, h, s, d, dtype, seed=bits + s, contiguous=contiguous)
        kc = k.cuda()
        _assert_same([t.cpu() for t in torch.ops.specache.quantize_keys(kc, bits, group)],
                     ref.quantize_keys(k, bits, group))
        _assert_same([t.cpu() for t in torch.ops.specache.quantize_values(kc, bits, group)],
                     ref.quantize_values(k, bits, group))
    # ties, constant groups, extremes; and a range below fp16's subnormal step (scale rounds to 0 or a subnormal)
    tiny = (torch.arange(16.0) % 3)[None, None, :, None] * 1e-7 + torch.zeros(2, 1, 16, 64)
    for k in (_special(bits, dtype), tiny.to(dtype)):
        _assert_same([t.cpu() for t in torch.ops.specache.quantize_keys(k.cuda(), bits, 16)],
                     ref.quantize_keys(k, bits, 16))
        v = k.transpose(2, 3).contiguous()
        _assert_same([t.cpu() for t in torch.ops.specache.quantize_values(v.cuda(), bits, 16)],
                     ref.quantize_values(v, bits, 16))


@gpu
@needs_cuda
def test_gpu_compile_lowers_the_triton_kernel():
    from torch._inductor.utils import run_and_get_code

    def fn(k):
        packed, scale, zero = torch.ops.specache.quantize_keys(k, 2, 64)
        return packed, scale * 2, zero

    k = _keys(1, 8, 256, 128, torch.bfloat16, seed=1)
    got, codes = run_and_get_code(torch.compile(fn, fullgraph=True), k.cuda())
    assert any("quantize_keys_kernel" in code for code in codes), "Inductor did not inline the user Triton kernel"
    want = ref.quantize_keys(k, 2, 64)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2])
    assert torch.equal(got[1].cpu(), want[1] * 2)
