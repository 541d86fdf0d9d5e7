"""Row ranges between the host store and the GPU (kernels/quant_ops.py write_rows_to_host / read_rows_from_host).

torch's copy_ stages a non-contiguous CPU side through pageable memory (the device->pageable copy blocks the host until
the GPU drains); the movers split a range of a [B, H, S, D] store into its B * H contiguous slabs, or scatter few rows
with one kernel. On CPU the routing predicate is patched so that the movers' index logic runs on CPU tensors; the
GPU tests (tests/test_gpu.py) check that a write does not wait for the device."""

from __future__ import annotations

import pytest
import torch

from specache_compile.kernels import quant_ops


@pytest.fixture
def as_if_cuda(monkeypatch):
    """Route CPU tensors as a CUDA tensor and a pinned store would be routed."""
    monkeypatch.setattr(quant_ops, "_async_host_path", lambda gpu, host, pinned: pinned)
    monkeypatch.setattr(quant_ops, "SCATTER_UVA_ERROR", None)


def _store(b=2, h=3, s=600, d=8):
    return torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(0))


def test_slab_view_of_a_range_and_its_refusals():
    st = _store()
    r = st.narrow(2, 5, 7)
    assert not r.is_contiguous()
    slabs = quant_ops._slab_view(r)
    assert slabs.shape == (6, 7, 8) and all(slabs[i].is_contiguous() for i in range(6))
    assert torch.equal(slabs.reshape(2, 3, 7, 8), r)
    assert quant_ops._slab_view(st.transpose(2, 3)) is None  # rows not contiguous
    assert quant_ops._slab_view(st.transpose(0, 1)) is None  # (b, h) do not flatten into one dim
    assert quant_ops._slab_view(st[0]) is None  # not [B, H, n, D]


@pytest.mark.parametrize("n, path", [(1, "scatter"), (255, "scatter"), (256, "slabs"), (300, "slabs")])
def test_write_rows_to_host_writes_exactly_the_range(as_if_cuda, monkeypatch, n, path):
    calls = []

    def scatter(src, idx, dst, shape, strides):  # the kernel's contract, on CPU: dst[:, :, idx[k]] = src[:, :, k]
        calls.append(idx.clone())
        assert tuple(shape) == tuple(dst._t.shape) and tuple(strides) == dst._t.stride()
        dst._t.index_copy_(2, idx, src)

    monkeypatch.setattr(quant_ops, "_scatter_rows_triton", scatter)
    monkeypatch.setattr(quant_ops, "HAS_TRITON", True)
    st = _store()
    before = st.clone()
    x = torch.randn(2, 3, n, 8).transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous source
    quant_ops.write_rows_to_host(x, st, 40, pinned=True)
    assert quant_ops.WRITE_PATH == path
    assert torch.equal(st[:, :, 40 : 40 + n], x)
    assert torch.equal(st[:, :, :40], before[:, :, :40]) and torch.equal(st[:, :, 40 + n :], before[:, :, 40 + n :])
    if path == "scatter":
        assert len(calls) == 1 and torch.equal(calls[0], torch.arange(40, 40 + n))
    else:
        assert not calls


def test_write_rows_to_host_falls_back_to_slabs_when_the_scatter_launch_fails(as_if_cuda, monkeypatch, caplog):
    def refuse(*a):
        raise ValueError("Pointer argument cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(quant_ops, "_scatter_rows_triton", refuse)
    monkeypatch.setattr(quant_ops, "HAS_TRITON", True)
    st, x = _store(), torch.randn(2, 3, 4, 8)
    quant_ops.write_rows_to_host(x, st, 10, pinned=True)
    assert quant_ops.WRITE_PATH == "slabs" and torch.equal(st[:, :, 10:14], x)
    assert "cpu tensor?" in quant_ops.SCATTER_UVA_ERROR and "zero-copy scatter failed" in caplog.text
    quant_ops.write_rows_to_host(x + 1, st, 20, pinned=True)  # not retried
    assert quant_ops.WRITE_PATH == "slabs" and torch.equal(st[:, :, 20:24], x + 1)


def test_write_rows_to_host_plain_copy_where_copy_is_already_right():
    st, x = _store(), torch.randn(2, 3, 5, 8)
    quant_ops.write_rows_to_host(x, st, 7, pinned=True)  # CPU to CPU: copy_ (no staging involved)
    assert quant_ops.WRITE_PATH == "copy" and torch.equal(st[:, :, 7:12], x)
    one = torch.zeros(1, 1, 50, 8)
    quant_ops.write_rows_to_host(torch.ones(1, 1, 3, 8), one, 2, pinned=True)  # B * H = 1: the range is contiguous
    assert quant_ops.WRITE_PATH == "copy" and one[0, 0, 2:5].eq(1).all() and one.sum() == 24


def test_read_rows_from_host_is_a_contiguous_copy_of_the_range(as_if_cuda):
    st = _store()
    out = quant_ops.read_rows_from_host(st.narrow(2, 100, 33), torch.device("cpu"), pinned=True)
    assert out.is_contiguous() and out.data_ptr() != st.data_ptr()
    assert torch.equal(out, st[:, :, 100:133])
    st[:, :, 100] = 0  # a copy, not a view
    assert not torch.equal(out, st[:, :, 100:133])


def test_growable_writes_and_reads_through_the_movers(monkeypatch):
    from specache_compile.runtime.buffers import Growable

    seen = []
    real_write, real_read = quant_ops.write_rows_to_host, quant_ops.read_rows_from_host
    monkeypatch.setattr(quant_ops, "write_rows_to_host", lambda *a, **k: (seen.append("w"), real_write(*a, **k)))
    monkeypatch.setattr(quant_ops, "read_rows_from_host", lambda *a, **k: (seen.append("r"), real_read(*a, **k))[1])
    g = Growable((1, 2), (4,), torch.float32, "cpu", capacity=8)
    g.append(torch.arange(24.0).reshape(1, 2, 3, 4))
    g.write(3, torch.ones(1, 2, 2, 4))
    assert g.length == 5
    got = g.read(1, 5, torch.device("cpu"))
    assert torch.equal(got[:, :, :2], torch.arange(24.0).reshape(1, 2, 3, 4)[:, :, 1:]) and got[:, :, 2:].eq(1).all()
    assert seen == ["r"]  # CPU tensors into an unpinned buffer: a plain copy_, the movers only read
