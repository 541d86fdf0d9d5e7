"""The KVComp-coded host store (runtime/host_codec.py): what a fetch returns, where its bytes are counted, and on the
GPU that a fetch reads pinned host memory in place with no host sync.

A compressed row must come back as exactly the dequantization of its quant ints (the codec's per-row scale and min,
not the codebook, decide the values), a row of the tail exactly as written, an index outside [0, N) as zeros.
"""

from __future__ import annotations

import pytest
import torch

from specache_compile.kernels import kvcomp_ops as ko
from specache_compile.runtime.host_codec import KVCompHostStore

REL = 0.05
WRITES = (70, 40, 1, 1, 33)  # d=64: groups of 32 rows -> chunks [0, 64), [64, 96), [96, 128), a tail of 17


def _x(b=2, h=3, d=64, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, sum(WRITES), d, generator=g)
    return (x * (1.0 + 6.0 * (torch.arange(d) % 17 == 3))).to(dtype)


def _write(store, k, v):
    pos = 0
    for w in WRITES:
        store.write(pos, k[:, :, pos : pos + w], v[:, :, pos : pos + w])
        pos += w


def _want(x, idx, nc, dtype=None):
    dtype = dtype or x.dtype  # dequantized in fp32, rounded once to the fetch's dtype
    q, scale, mn = ko.quantize_ints(x, (3,), REL)
    deq = ko.dequantize_ints(q, scale, mn).to(dtype)
    src = torch.cat([deq[:, :, :nc], x[:, :, nc:].to(dtype)], 2)  # compressed prefix, exact tail
    i = idx.clamp(0, x.shape[2] - 1)[..., None].expand(-1, -1, -1, x.shape[3])
    return torch.where(((idx >= 0) & (idx < x.shape[2]))[..., None], torch.gather(src, 2, i), 0.0)


def test_fetch_returns_the_quantized_prefix_and_the_exact_tail():
    k, v = _x(seed=1), _x(seed=2)
    store = KVCompHostStore(rel=REL)
    _write(store, k, v)
    nc = store.k.n_compressed
    assert (nc, store.k.tail.shape[2]) == (128, 17)
    idx = torch.tensor([0, 31, 32, 63, 64, 95, 96, 127, 128, 144, 5, 100]).expand(2, 3, 12)
    got_k, got_v = store.fetch(idx, torch.bfloat16, torch.device("cpu"), True, True)
    assert torch.equal(got_k, _want(k, idx, nc)) and torch.equal(got_v, _want(v, idx, nc))
    only_v = store.fetch(idx, torch.float32, torch.device("cpu"), False, True)
    assert only_v[0] is None and torch.equal(only_v[1], _want(v, idx, nc, torch.float32))
    rk, rv = store.fetch_range(60, 130, torch.bfloat16, torch.device("cpu"), 2, 3)
    assert torch.equal(rk, _want(k, torch.arange(60, 130).expand(2, 3, 70), nc))


def test_bytes_are_counted_where_they_live():
    k, v = _x(seed=3), _x(seed=4)
    store = KVCompHostStore(rel=REL, capacity=256)
    _write(store, k, v)
    assert store.device_nbytes == 2 * store.k.tail.numel() * 2  # two bf16 tails of 17 rows
    raw = 2 * k.numel() * k.element_size()
    assert 0 < store.nbytes < raw  # buffers at capacity 256, under the 145 raw bf16 rows
    assert store.k.scale.data.shape[0] >= 256  # capacity reserved up front: no growth while decoding


def test_writes_are_append_only():
    store = KVCompHostStore(rel=REL)
    k = _x(seed=5)
    store.write(0, k[:, :, :40], k[:, :, :40])
    with pytest.raises(RuntimeError, match="append-only"):
        store.write(10, k[:, :, 10:20], k[:, :, 10:20])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the lent GPU)")
@pytest.mark.parametrize("pin", [True, False])
def test_cuda_fetch_reads_pinned_host_memory_without_a_sync(pin):
    # pinned: the kernels read the host buffers in place, no host sync; pageable (which no kernel can read): the
    # reference decoder on the host, same rows
    k, v = _x(seed=6).cuda(), _x(seed=7).cuda()
    store = KVCompHostStore(rel=REL, pin=pin, capacity=4096)
    _write(store, k, v)
    assert store.k.words.data.is_pinned() == pin and store.k.scale.data.is_pinned() == pin
    nc = store.k.n_compressed
    idx = torch.randint(-1, k.shape[2], (2, 3, 200), device="cuda")  # positions < length, and -1 (a zero row)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error" if pin else "default")
    try:
        got_k, got_v = store.fetch(idx, torch.bfloat16, torch.device("cuda"), True, True, stream=side)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    # the kernels dequantize in fp32 and round once to bf16, as the reference does: equal up to one bf16 unit
    for got, x in ((got_k, k), (got_v, v)):
        assert got.is_cuda
        want = _want(x.cpu(), idx.cpu(), nc)
        assert ((got.float().cpu() - want.float()).abs() <= 2.0**-7 * want.float().abs() + 1e-6).all()


def test_a_known_capacity_sizes_the_word_stream_once():
    # rows arriving a group at a time up to the capacity: the stream is reserved at the first rows' bits per row,
    # not grown by a quarter at a time (which would leave up to 25% of the buffer unused at the end)
    x = torch.cat([_x(b=1, h=2, seed=s) for s in range(5)], 2)[:, :, :640]
    store = KVCompHostStore(rel=REL, capacity=640)
    store.write(0, x[:, :, :64], x[:, :, :64])
    words = store.k.words
    first = words.data.data_ptr()
    for pos in range(64, 640, 32):
        store.write(pos, x[:, :, pos : pos + 32], x[:, :, pos : pos + 32])
    assert store.k.n_compressed == 640 and words.data.data_ptr() == first  # never reallocated
    assert words.length <= words.data.numel() <= 1.06 * words.length
