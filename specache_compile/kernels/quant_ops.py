"""Ops that make and read the low-bit KV copy (KIVI layout), and move rows between memories.

quantize_keys / quantize_values: ``torch.library.triton_op`` (Inductor sees the Triton kernel) with a CPU kernel and a
fake; CUDA runs kernels/triton/quantize.py, bit-exact with reference.py. dequantize_*: the reference on every device.
gather_rows: a plain function (it moves data between memories, never inside a graph); from a pinned host store to
CUDA it is a zero-copy Triton kernel, see :func:`gather_rows`.

Without Triton (``import triton`` fails) every op is the reference behind ``torch.library.custom_op``.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import torch

from . import reference as ref

log = logging.getLogger("specache")

try:
    import triton
    from torch.library import wrap_triton

    from .triton.gather import gather_rows_kernel, scatter_rows_kernel
    from .triton.quantize import (
        quantize_keys_at_kernel,
        quantize_keys_kernel,
        quantize_values_at_kernel,
        quantize_values_kernel,
    )

    HAS_TRITON = True
except ImportError:  # keep `import specache` working without Triton: the reference ops below
    HAS_TRITON = False

# dtypes the quantize kernels read (scale/zero are stored in the same dtype); anything else runs the reference
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NUM_WARPS = 4
_TILE = 4096  # elements per program step of the quantize kernels: 16 KiB of fp32 in registers for 4 warps


def _use_kernel(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.device.type == "cuda" and x.dtype in _KERNEL_DTYPES and x.numel() > 0


def _check_quantize(x: torch.Tensor, bits: int, group: int, name: str) -> None:
    # the reference's argument checks, for the kernel path (same ValueErrors, same messages)
    ref._check_float(x, name)
    ref._check_ndim(x, 4, name, "[B, H, S, D]")
    ref._check_bits(bits)
    ref._check_group(group)


# -- quantize: launchers ---------------------------------------------------------------------------------------------


def _key_blocks(group: int, d: int, bits: int) -> tuple[int, int]:
    # (BLOCK_T, BLOCK_D): the whole group of tokens (up to 64 per step) by as many channels as fit in _TILE elements
    block_t = min(triton.next_power_of_2(group), 64)
    return block_t, min(triton.next_power_of_2(d), max(8 // bits, _TILE // block_t))


def _value_blocks(g: int, d: int) -> tuple[int, int, int]:
    # (BLOCK_T, BLOCK_NG, BLOCK_G): the whole head dim of as many tokens as fit in _TILE elements (at most 64)
    block_g, block_ng = triton.next_power_of_2(g), triton.next_power_of_2(d // g)
    return max(1, min(64, _TILE // (block_g * block_ng))), block_ng, block_g


def _quantize_keys_triton(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # k: [B, H, S, D], any strides (the policy passes a slice of a concatenation)
    _check_quantize(k, bits, group, "k")
    b, h, s, d = k.shape
    if s % group != 0 or d % (8 // bits) != 0:
        return ref.quantize_keys(k, bits, group)  # raises the reference's ValueError
    packed = k.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8)
    scale = k.new_empty((b, h, s // group, d))
    zero = k.new_empty((b, h, s // group, d))
    block_t, block_d = _key_blocks(group, d, bits)
    wrap_triton(quantize_keys_kernel)[(s // group, h, b)](
        k, packed, scale, zero,
        d,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        packed.stride(0), packed.stride(1), packed.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        GROUP=group, BITS=bits, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )
    return packed, scale, zero


def _quantize_values_triton(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # v: [B, H, S, D], any strides
    _check_quantize(v, bits, group, "v")
    b, h, s, d = v.shape
    g = min(group, d)
    if d % g != 0 or d % (8 // bits) != 0:
        return ref.quantize_values(v, bits, group)  # raises the reference's ValueError
    if g % (8 // bits) != 0:
        # groups narrower than a byte's codes (or not byte-aligned): the kernel packs whole bytes per group
        return _quantize_values_ref(v, bits, group)
    packed = v.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8)
    scale = v.new_empty((b, h, s, d // g))
    zero = v.new_empty((b, h, s, d // g))
    block_t, block_ng, block_g = _value_blocks(g, d)
    wrap_triton(quantize_values_kernel)[(triton.cdiv(s, block_t), h, b)](
        v, packed, scale, zero,
        s,
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        packed.stride(0), packed.stride(1), packed.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        G=g, NG=d // g, BITS=bits, BLOCK_T=block_t, BLOCK_NG=block_ng, BLOCK_G=block_g, num_warps=_NUM_WARPS,
    )
    return packed, scale, zero


# -- quantize: ops ---------------------------------------------------------------------------------------------------

if HAS_TRITON:
    # Opaque reference ops for the triton_ops' non-CUDA branch. AOTAutograd traces a triton_op's body; traced, the
    # reference would be fused by Inductor, which may drop its round trip through the storage dtype (Inductor's
    # emulate_precision_casts is off) and so stop being bit-exact. An opaque op runs the reference as written.
    @torch.library.custom_op("specache::quantize_keys_ref", mutates_args=())
    def _quantize_keys_ref(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ref.quantize_keys(k, bits, group)

    @torch.library.custom_op("specache::quantize_values_ref", mutates_args=())
    def _quantize_values_ref(
        v: torch.Tensor, bits: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ref.quantize_values(v, bits, group)

    @torch.library.triton_op("specache::quantize_keys", mutates_args=())
    def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Also what AOTAutograd traces (FunctionalTensorMode): on CUDA the kernel, elsewhere the opaque reference.
        if not _use_kernel(k):
            return _quantize_keys_ref(k, bits, group)
        return _quantize_keys_triton(k, bits, group)

    @torch.library.triton_op("specache::quantize_values", mutates_args=())
    def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not _use_kernel(v):
            return _quantize_values_ref(v, bits, group)
        return _quantize_values_triton(v, bits, group)

    @quantize_keys.register_kernel("cpu")
    def _(k, bits, group):
        return ref.quantize_keys(k, bits, group)

    @quantize_values.register_kernel("cpu")
    def _(v, bits, group):
        return ref.quantize_values(v, bits, group)

else:

    @torch.library.custom_op("specache::quantize_keys", mutates_args=())
    def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ref.quantize_keys(k, bits, group)

    @torch.library.custom_op("specache::quantize_values", mutates_args=())
    def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ref.quantize_values(v, bits, group)


def _fake_keys(k, bits, group):
    b, h, s, d = k.shape
    return (k.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), k.new_empty((b, h, s // group, d)),
            k.new_empty((b, h, s // group, d)))


def _fake_values(v, bits, group):
    b, h, s, d = v.shape
    g = min(group, d)
    return (v.new_empty((b, h, s, d * bits // 8), dtype=torch.uint8), v.new_empty((b, h, s, d // g)),
            v.new_empty((b, h, s, d // g)))


quantize_keys.register_fake(_fake_keys)
quantize_values.register_fake(_fake_values)
if HAS_TRITON:
    _quantize_keys_ref.register_fake(_fake_keys)
    _quantize_values_ref.register_fake(_fake_values)


# -- dequantize ------------------------------------------------------------------------------------------------------


@torch.library.custom_op("specache::dequantize_keys", mutates_args=())
def dequantize_keys(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_keys(packed, scale, zero, bits, group, dtype)


def _dequantize_fake(packed, scale, zero, bits, group, dtype):
    # keys and values unpack to the same shape: [B, H, S, D] from [B, H, S, D * bits / 8]
    b, h, s, p = packed.shape
    return packed.new_empty((b, h, s, p * 8 // bits), dtype=dtype)


dequantize_keys.register_fake(_dequantize_fake)


@torch.library.custom_op("specache::dequantize_values", mutates_args=())
def dequantize_values(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, dtype: torch.dtype
) -> torch.Tensor:
    return ref.dequantize_values(packed, scale, zero, bits, group, dtype)


dequantize_values.register_fake(_dequantize_fake)


# -- gather ----------------------------------------------------------------------------------------------------------

# Which path the last gather_rows call took, for benchmarks and tests:
#   "uva"        Triton kernel reading the pinned host store in place (zero-copy), on the current stream
#   "device"     Triton kernel, src already on out's CUDA device
#   "host_copy"  gather on the host, then a non_blocking H2D copy (src pageable, or the UVA launch failed)
#   "reference"  reference.gather_rows (CPU, no Triton, or a combination the kernel does not cover)
GATHER_PATH = "none"
# Why the UVA launch failed, once it has (it is not retried: the exception would cost every decode step).
UVA_ERROR: str | None = None
_BLOCK_K = 32  # rows per program: 8 KiB of fp16 D=128 rows in flight per program
# (event, src) of UVA gathers that may still be reading src, see _HostPointer
_INFLIGHT: collections.deque = collections.deque()


class _HostPointer:
    """A pinned host tensor passed to a Triton launch as a device pointer (zero-copy / UVA).

    Triton's launcher takes any object with ``data_ptr()`` and ``dtype`` as a pointer argument; it then asks the driver
    for the pointer's device address (``cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER)``), which for
    memory pinned by torch (cudaHostAlloc, mapped and portable under UVA) is the host address itself. Passed as a CPU
    tensor it could be refused by device checks in Triton or torch; this object carries no device.

    NOTE: hazards, all the caller's (gather_rows handles the first):
    - Lifetime: the kernel reads the host memory asynchronously, after this call returns, and torch's pinned-memory
      cache only knows about copies, not kernels: a host buffer freed (e.g. by Growable growth) before the kernel ran
      could be handed to another pinned allocation and rewritten under it. gather_rows keeps src alive until an event
      recorded after the launch has completed.
    - Writes: positions an in-flight gather reads must not be rewritten from the host before it completes. Device
      writes into the store (copy_ on the same stream) are ordered after it; a CPU-side write is not.
    - Only pinned memory: pageable memory is not mapped (the launcher raises ValueError "cpu tensor?").
    """

    __slots__ = ("_t", "dtype")

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self._t.data_ptr()


def _check_gather(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None) -> None:
    # the reference's shape checks, without its range check (a host sync for a device idx)
    ref._check_ndim(src, 4, "src", "[B, H, S, D]")
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx: expected an int64 tensor [B, H, K], got {got}; fix: pass topk_positions' output")
    ref._check_ndim(idx, 3, "idx", "[B, H, K]")
    b, h, _, d = src.shape
    if tuple(idx.shape[:2]) != (b, h):
        raise ValueError(
            f"idx: expected shape [B={b}, H={h}, K], got {tuple(idx.shape)}; fix: index with one row list per head"
        )
    want = (b, h, idx.shape[2], d)
    if out is not None and (tuple(out.shape) != want or out.dtype != src.dtype):
        raise ValueError(
            f"out: expected shape {want} and dtype {src.dtype}, got {tuple(out.shape)} {out.dtype}; "
            "fix: allocate out like src with K rows"
        )


def _gather_rows_triton(src, idx: torch.Tensor, out: torch.Tensor, shape, strides) -> None:
    # src: a tensor, or a _HostPointer with shape / strides given apart; idx [B, H, K] and out [B, H, K, D] on the
    # device the kernel runs on (CPU only under TRITON_INTERPRET=1).
    b, h, s, d = shape
    kk = idx.shape[2]
    if idx.numel() == 0 or d == 0:
        return
    block_d = triton.next_power_of_2(d)
    grid = (triton.cdiv(kk, _BLOCK_K), h, b)
    gather_rows_kernel[grid](
        src, idx, out,
        s, kk, d,
        *strides,
        idx.stride(0), idx.stride(1), idx.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        BLOCK_K=_BLOCK_K, BLOCK_D=block_d, EVEN_D=block_d == d, num_warps=_NUM_WARPS,
    )


def _gather_uva(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    idx = idx.to(out.device, non_blocking=True)
    with torch.cuda.device(out.device):
        # launches on the current stream of out's device, which the runtime sets
        _gather_rows_triton(_HostPointer(src), idx, out, src.shape, src.stride())
        ev = torch.cuda.Event()
        ev.record()
    _INFLIGHT.append((ev, src))
    while _INFLIGHT and _INFLIGHT[0][0].query():  # cudaEventQuery: no host sync
        _INFLIGHT.popleft()


def _gather_host_copy(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    # NOTE: idx.cpu() waits for the device (the top-k that produced idx): this path costs a host sync per call.
    idx_h = idx.to("cpu")
    rows = torch.empty(out.shape, dtype=src.dtype, pin_memory=True)
    ref.gather_rows(src, idx_h, rows)  # checks the range on the host (free there) and gathers into rows
    # rows may be dropped right away: the pinned-memory cache records this copy's event before reusing the block.
    out.copy_(rows, non_blocking=True)


def gather_rows(
    src: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
    device: torch.device | None = None,
    stream: torch.cuda.Stream | None = None,
) -> torch.Tensor:
    """Rows idx [B, H, K] of src [B, H, S, D] (host or device) on ``device``: [B, H, K, D].

    Not a torch.library op: it moves data between memories and runs only inside the runtime, never in a graph.
    With Triton and a CUDA destination, a pinned host ``src`` is read in place by the GPU (zero-copy, only the K rows
    cross the bus, no host sync) and a CUDA ``src`` is gathered on the device. Kernels run on ``stream`` if given,
    else on the current stream; the caller orders it with the consumers of ``out`` (and ``record_stream``s buffers
    it shares across streams). There an out-of-range position yields a zero row (a device assert with
    TRITON_DEBUG=1) instead of the reference's ValueError, which would need a host sync. Other combinations run the
    reference. ``GATHER_PATH`` records the path taken.
    """
    global GATHER_PATH, UVA_ERROR
    if stream is not None:
        with torch.cuda.stream(stream):
            return gather_rows(src, idx, out, device)
    if out is None and device is not None and torch.device(device) != src.device:
        out = torch.empty((*idx.shape, src.shape[-1]), dtype=src.dtype, device=device)
    dst = out.device if out is not None else src.device
    if not (HAS_TRITON and dst.type == "cuda" and isinstance(src, torch.Tensor)):
        GATHER_PATH = "reference"
        return ref.gather_rows(src, idx, out)
    _check_gather(src, idx, out)
    if out is None:
        out = torch.empty((*idx.shape, src.shape[-1]), dtype=src.dtype, device=dst)

    if src.device == dst:
        with torch.cuda.device(dst):
            _gather_rows_triton(src, idx.to(dst, non_blocking=True), out, src.shape, src.stride())
        GATHER_PATH = "device"
        return out
    if src.device.type != "cpu":
        GATHER_PATH = "reference"  # another accelerator or another GPU: not this kernel's business
        return ref.gather_rows(src, idx, out)
    if UVA_ERROR is None and src.is_pinned():
        try:
            _gather_uva(src, idx, out)
            GATHER_PATH = "uva"
            return out
        except Exception as e:  # the launcher refused the pointer (or Triton could not compile): stop trying
            UVA_ERROR = f"{type(e).__name__}: {e}"
            log.warning("gather_rows: zero-copy launch failed (%s); gathering on the host and copying", UVA_ERROR)
    _gather_host_copy(src, idx, out)
    GATHER_PATH = "host_copy"
    return out


# -- contiguous row ranges between a pinned host store and the GPU ----------------------------------------------------
#
# A range [lo, hi) of a store [B, H, S, D] is a view with B * H contiguous slabs of (hi - lo) rows, S * D elements
# apart: not contiguous as a whole once B * H > 1. torch's copy_ between CPU and CUDA needs both sides contiguous, and
# otherwise stages the host side through a *pageable* temporary (aten/src/ATen/native/cuda/Copy.cu,
# copy_requires_temporaries): device -> pageable cudaMemcpyAsync returns only once the copy is done (so every store
# write waited for the GPU to drain its queue), host -> device runs at pageable speed after a CPU-side gather (several
# times slower than pinned). The two movers below keep both directions asynchronous and on the pinned path.
# Which path the last write_rows_to_host took ("slabs", "scatter", "copy"), for tests and benchmarks.
WRITE_PATH = "none"
SCATTER_UVA_ERROR: str | None = None  # why the scatter kernel's UVA launch failed, once it has (not retried)
_SLAB_ROWS = 256  # from this many rows per slab one DMA copy per slab; fewer: one scatter kernel writing through UVA


def _async_host_path(gpu: torch.device, host: torch.device, pinned: bool) -> bool:
    """Where copy_ would stage through pageable memory and the movers below do not: a CUDA tensor on one side, pinned
    host memory on the other (tests patch this to run the movers' CPU-side logic)."""
    return gpu.type == "cuda" and host.type == "cpu" and pinned


def _slab_view(t: torch.Tensor) -> torch.Tensor | None:
    """t [B, H, n, D] as [B * H, n, D] with every [n, D] slab contiguous, or None when t is not laid out so."""
    if t.dim() != 4 or t.stride(3) != 1 or t.stride(2) != t.shape[3] or t.stride(0) != t.shape[1] * t.stride(1):
        return None
    return t.flatten(0, 1)


def write_rows_to_host(x: torch.Tensor, store: torch.Tensor, start: int, pinned: bool) -> None:
    """``store[:, :, start:start + n] = x`` for x [B, H, n, D] on the GPU and ``store`` [B, H, S, D] in pinned host
    memory (``pinned``), without a host sync: few rows -> one scatter kernel writing the pinned memory through its
    device address (the static path's writer); more -> one DMA copy per (b, h) slab. Ordered on the current stream.
    Any other combination (CPU tensors, pageable memory, a contiguous range) is a plain ``copy_``."""
    global WRITE_PATH, SCATTER_UVA_ERROR
    n = x.shape[2]
    dst = store.narrow(2, start, n)
    if not _async_host_path(x.device, store.device, pinned) or dst.is_contiguous():
        dst.copy_(x, non_blocking=x.is_cuda and pinned)
        WRITE_PATH = "copy"
        return
    x = x.contiguous()
    if n < _SLAB_ROWS and HAS_TRITON and SCATTER_UVA_ERROR is None:
        try:
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                idx = torch.arange(start, start + n, device=x.device)
                _scatter_rows_triton(x, idx, _HostPointer(store), store.shape, store.stride())
            WRITE_PATH = "scatter"
            return
        except Exception as e:  # the launcher refused the pointer: DMA copies from now on
            SCATTER_UVA_ERROR = f"{type(e).__name__}: {e}"
            log.warning("write_rows_to_host: zero-copy scatter failed (%s); one copy per slab", SCATTER_UVA_ERROR)
    slabs, xs = _slab_view(dst), x.flatten(0, 1)
    if slabs is None:
        dst.copy_(x, non_blocking=True)
        WRITE_PATH = "copy"
        return
    for i in range(xs.shape[0]):
        slabs[i].copy_(xs[i], non_blocking=True)
    WRITE_PATH = "slabs"


def read_rows_from_host(view: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """A range view [B, H, n, D] of a host store on ``device`` (a new contiguous tensor). From pinned memory to CUDA:
    one asynchronous DMA copy per (b, h) slab, ordered on the current stream (the caller's consumers run there);
    otherwise ``view.to(device)``."""
    device = torch.device(device)
    slabs = _slab_view(view) if _async_host_path(device, view.device, pinned) else None
    if slabs is None or view.is_contiguous():
        return view.to(device, non_blocking=pinned and device.type == "cuda")
    out = torch.empty(view.shape, dtype=view.dtype, device=device)
    flat = out.flatten(0, 1)
    for i in range(flat.shape[0]):
        flat[i].copy_(slabs[i], non_blocking=True)
    return out


# -- row movers with positions held on the device (the static decode path, runtime-capturable) -----------------------


def _scatter_rows_triton(src: torch.Tensor, idx: torch.Tensor, dst, shape, strides) -> None:
    # dst: a tensor, or a _HostPointer with shape / strides given apart
    b, h, k, d = src.shape
    if k == 0 or d == 0:
        return
    grid = (triton.cdiv(k, _BLOCK_K), h, b)
    scatter_rows_kernel[grid](
        src, idx, dst,
        shape[2], k, d,
        src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        *strides,
        BLOCK_K=_BLOCK_K, BLOCK_D=triton.next_power_of_2(d), num_warps=_NUM_WARPS,
    )


def scatter_rows_static(src: torch.Tensor, idx: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst[:, :, idx[k]] = src[:, :, k]`` with the positions ``idx`` [K] on ``src``'s device, never read by the host.

    src [B, H, K, D] on the model's device; dst [B, H, S, D]: the store (pinned host memory written in place by the
    GPU through its device address, or device memory). The launches depend on shapes only, so a CUDA graph captured
    over one decode step replays the write at the next step's positions. Positions outside [0, S) write nothing on
    CUDA (the runtime checks positions on the device); on the CPU ``index_copy_`` raises.
    """
    if src.device.type != "cuda":
        dst.index_copy_(2, idx.to(dst.device), src.to(dst.device))
        return
    if dst.device == src.device:
        dst.index_copy_(2, idx, src)
        return
    if not HAS_TRITON:  # (the store's pinning is checked once, when the static state is built)
        raise RuntimeError("specache: the static decode path writes the host store from the GPU, which needs Triton")
    with torch.cuda.device(src.device):
        _scatter_rows_triton(src, idx, _HostPointer(dst), dst.shape, dst.stride())


def quantize_group_static(src: torch.Tensor, offsets: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                          zero: torch.Tensor, bits: int, group: int, kind: str) -> None:
    """KIVI-quantize the ``group`` rows of ``src`` [B, H, R, D] starting at row ``offsets[0]`` into the copy's buffers
    at row ``offsets[1]`` (``codes``; values' ``scale`` / ``zero`` too) and key group ``offsets[2]`` (keys' ``scale`` /
    ``zero``), ``kind`` "keys" or "values", with the offsets (int64 [3]) on the device, never read by the host: the
    static decode path's per-step group quantize (policies/specache_static.py), one launch per tensor on CUDA where
    index_select + quantize + 3 index_copy_ took five. Elsewhere, and for shapes the kernels do not take, those ops
    (same codes and scales: the kernels are the ops' own, with offsets added to the row indices)."""
    if kind not in ("keys", "values"):
        raise ValueError(f"quantize_group_static: kind expected 'keys' or 'values', got {kind!r}")
    d = src.shape[3]
    per = 8 // bits
    # the launchers' own conditions: codes packed along D (keys and values); values' channel groups whole bytes
    g = min(group, d)
    kernel_ok = (_use_kernel(src) and d % per == 0 and all(t.dtype == src.dtype for t in (scale, zero))
                 and (kind == "keys" or (d % g == 0 and g % per == 0)))
    if not kernel_ok:
        rows = torch.arange(group, device=src.device)
        x = src.index_select(2, offsets[0] + rows)
        if kind == "keys":
            kq, ks, kz = torch.ops.specache.quantize_keys(x, bits, group)
            grp = offsets[2:3]
            codes.index_copy_(2, offsets[1] + rows, kq)
            scale.index_copy_(2, grp, ks)
            zero.index_copy_(2, grp, kz)
        else:
            vq, vs, vz = torch.ops.specache.quantize_values(x, bits, group)
            dst = offsets[1] + rows
            codes.index_copy_(2, dst, vq)
            scale.index_copy_(2, dst, vs)
            zero.index_copy_(2, dst, vz)
        return
    with torch.cuda.device(src.device):
        _quantize_group_triton(src, offsets, codes, scale, zero, bits, group, kind)


def _quantize_group_triton(src, offsets, codes, scale, zero, bits: int, group: int, kind: str) -> None:
    # the launch of quantize_group_static (also what the interpreter tests call, with CPU tensors)
    b, h, _, d = src.shape
    common = (src.stride(0), src.stride(1), src.stride(2), src.stride(3),
              codes.stride(0), codes.stride(1), codes.stride(2),
              scale.stride(0), scale.stride(1), scale.stride(2), offsets)
    if kind == "keys":
        block_t, block_d = _key_blocks(group, d, bits)
        quantize_keys_at_kernel[(1, h, b)](
            src, codes, scale, zero, d, *common,
            GROUP=group, BITS=bits, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )
    else:
        g = min(group, d)
        block_t, block_ng, block_g = _value_blocks(g, d)
        quantize_values_at_kernel[(triton.cdiv(group, block_t), h, b)](
            src, codes, scale, zero, group, *common,
            G=g, NG=d // g, BITS=bits, BLOCK_T=block_t, BLOCK_NG=block_ng, BLOCK_G=block_g, num_warps=_NUM_WARPS,
        )


def gather_rows_static(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[b, h, k] = src[b, h, idx[b, h, k]]``, a zero row where ``idx`` is outside [0, S) (-1 pads), with no host
    read of ``idx``: the static decode path's fetch (see :func:`scatter_rows_static` on capture). On CUDA the kernel
    reads a pinned host ``src`` in place; src must outlive the launch (the store lives as long as its sequence)."""
    if out.device.type != "cuda":
        s, d = src.shape[2], src.shape[3]
        i = idx.to(src.device)
        valid = ((i >= 0) & (i < s)).unsqueeze(-1)
        rows = src.gather(2, i.clamp(0, max(s - 1, 0)).unsqueeze(-1).expand(-1, -1, -1, d))
        return out.copy_(torch.where(valid, rows, torch.zeros((), dtype=src.dtype)))
    if not HAS_TRITON:
        raise RuntimeError("specache: the static decode path needs Triton on CUDA")
    with torch.cuda.device(out.device):
        target = src if src.device == out.device else _HostPointer(src)
        _gather_rows_triton(target, idx, out, src.shape, src.stride())
    return out
