"""Times specache's kernels on CUDA at one Llama-3-8B attention layer (Hq 32, Hkv 8, D 128, bf16), in one process.

    python bench/kernel_bench.py                                  # contexts 8K, 32K, 128K; bits 2 and 1; top-64
    python bench/kernel_bench.py --contexts 32768 --bits 2        # one point
    python bench/kernel_bench.py --only-fused                     # fused_decode at 32K/128K x batch 1/8, bits 2/1

Per context and bit width: lowbit_scores, top-k selection, lowbit_decode_attention, quantize_keys/values (over the
whole context, as a prefill quantizes it), the top-k fetch from pinned host memory (zero-copy gather_rows, and the
CPU gather + H2D copy alternative), and SDPA over the bf16 cache on the device as the baseline. Peaks measured in the
same run: a device-to-device copy (bytes read + written) and a pinned host-to-device copy.

Each kernel's GB/s counts the bytes it must move (formula next to each measurement), against the HBM peak for the
on-device kernels and the pinned H2D peak for the fetch. Timing: triton.testing.do_bench, median, warm-up excluded
(it also flushes L2 between runs): ``median_us``, ``gbps``, ``pct_of_peak``. Where a call's host work (Python, several
launches) outlasts the GPU work, that figure is host time, so every row also has ``device_us`` (GPU time alone: L2
flushed, launches queued behind a device sleep) and ``device_gbps`` / ``device_pct_of_peak`` from it. One JSON line
per measurement to bench/results/kernels.jsonl (and $OUT).

``fused_decode`` rows (``--fused-contexts`` x ``--fused-batches``, kernels/fused_ops.py): the op as the static path
calls it per layer per speculative step (2 query rows, the speculative one ranked; top-k fetched rows; a window of
the ring plus the speculative token; the model's bias over the capacity), its bytes those it must read (the low-bit
copy's codes and scales, the full-precision columns, the bias, q), and beside it the unfused ops it replaces on the
same inputs (``static_unfused_scores_select_attention``). ``--fused-sweep`` adds rows per launch shape (tile,
warps, stages) at the first point.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_fields, write_rows  # noqa: E402

B, HQ, HKV, D = 1, 32, 8, 128  # Llama-3-8B attention layer, one sequence
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element
DEVICE = "cuda"  # (the fused rows' inputs; a CPU smoke run of bench_fused sets "cpu")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768,131072", help="comma-separated context lengths (tokens)")
    ap.add_argument("--bits", default="2,1", help="comma-separated bit widths of the low-bit copy")
    ap.add_argument("--topk", type=int, default=64, help="rows fetched per KV head (SpeCache: 64)")
    ap.add_argument("--group", type=int, default=64, help="KIVI group size (SpeCache: 64)")
    ap.add_argument("--window", type=int, default=64, help="full-precision recent tokens on the device")
    ap.add_argument("--rep", type=int, default=100, help="do_bench time budget per measurement, ms")
    ap.add_argument("--out", default="kernels.jsonl", help="file name under bench/results/ (and $OUT)")
    ap.add_argument("--fused-contexts", default="32768,131072", help="contexts of the fused_decode rows")
    ap.add_argument("--fused-batches", default="1,8", help="batch sizes of the fused_decode rows")
    ap.add_argument("--fused-sweep", default="64:4:2,32:4:2,64:8:2,64:4:3,32:8:3",
                    help="launch shapes tile:warps:stages[:programs_per_sm[:maxnreg]] timed at the first fused point "
                         "('' for none)")
    ap.add_argument("--only-fused", action="store_true", help="the peaks and the fused_decode rows only")
    ap.add_argument("--fused-launch", default="",
                    help="a launch shape tile:warps:stages[:programs_per_sm[:maxnreg]] for every fused_decode row "
                         "(recorded in the rows' launch field; '' for kernels/fused_ops.py's)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="with --only-fused: the launch-shape rows alone (one shape a process: a shape that faults "
                         "leaves the CUDA context unusable, so bench/gpu_session.sh runs each in its own)")
    return ap.parse_args(argv)


def bench_us(fn, rep_ms: int) -> float:
    """triton.testing.do_bench median, µs: what a call costs in an eager loop. do_bench flushes L2 before each run,
    but a call whose host work (Python, launches) outlasts the flush leaves the GPU waiting: then this is host time."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


_FLUSH = None


def device_us(fn, n: int = 30) -> float:
    """Median GPU time of fn, µs, with the host out of the way: L2 flushed, then a ~1.5 ms device sleep queued ahead
    of the start event, so every launch of fn is queued before the GPU reaches it (launch gaps vanish)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # > the L2 of an H100/H200 (50-60 MB)
    fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(n):
        _FLUSH.zero_()
        torch.cuda._sleep(3_000_000)  # cycles, ~1.5 ms at 1.98 GHz: more than any host work of fn here
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) * 1e3 for a, b in events)
    return times[len(times) // 2]


def measure_peaks(rep_ms: int) -> tuple[float, float]:
    """(device-to-device copy GB/s counting read + write, pinned host-to-device GB/s)."""
    n = 1 << 30  # 1 GiB: far past L2 (50 MB), long enough that launch overhead vanishes
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    d2d = 2 * n / (bench_us(lambda: dst.copy_(src), rep_ms) * 1e-6) / 1e9
    m = 256 << 20
    host = torch.empty(m, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(m, dtype=torch.uint8, device="cuda")
    h2d = m / (bench_us(lambda: dev.copy_(host, non_blocking=True), rep_ms) * 1e-6) / 1e9
    return d2d, h2d


class Recorder:
    def __init__(self, topk: int):
        self.topk = topk
        self.rows: list[dict] = []

    def add(self, kernel, context, bits, nbytes, us, peak, dev_us=None):
        """us: do_bench median (median_us, gbps, pct_of_peak); dev_us: device_us (the device_* fields)."""
        gbps = nbytes / (us * 1e-6) / 1e9 if nbytes else None
        dev_gbps = nbytes / (dev_us * 1e-6) / 1e9 if nbytes and dev_us else None
        self.rows.append(dict(bench="kernels", kernel=kernel, context=context, bits=bits, topk=self.topk, gbps=gbps,
                              pct_of_peak=100.0 * gbps / peak if gbps else None, peak_gbps=peak, median_us=us,
                              device_us=dev_us, device_gbps=dev_gbps,
                              device_pct_of_peak=100.0 * dev_gbps / peak if dev_gbps else None, bytes=nbytes))
        return self.rows[-1]

    def time(self, kernel, context, bits, nbytes, fn, peak, rep_ms):
        us, dev = bench_us(fn, rep_ms), device_us(fn)
        self.add(kernel, context, bits, nbytes, us, peak, dev)
        return us, dev


def bench_context(args, rec: Recorder, n: int, d2d: float, h2d: float, g) -> list[tuple]:
    """Every measurement at context n; returns the decode-path summaries (one per bit width)."""
    import torch.nn.functional as F

    from specache_compile.kernels import quant_ops

    nq = n // args.group * args.group
    scale = 1.0 / math.sqrt(D)
    k = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(B, HKV, n, D, device="cuda", dtype=DTYPE, generator=g)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=DTYPE, generator=g)

    # Baseline: SDPA over the whole bf16 cache on the device. GQA folded into the query length ([B, Hkv, rep, D]
    # queries against [B, Hkv, n, D] keys: the same math) so a fused flash/efficient kernel runs, not the math one.
    # Bytes: K + V once (2 * Hkv * n * D * 2) + q and out.
    qg = q.reshape(B, HKV, HQ // HKV, D)
    kv_bytes = 2 * B * HKV * n * D * ELEM + 2 * q.numel() * ELEM
    sdpa = rec.time("sdpa_bf16_cache", n, None, kv_bytes, lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale),
                    d2d, args.rep)

    # SDPA as a model calls it with enable_gqa (32 query heads over 8 KV heads, one query row each), the backend
    # torch picks; the brief reports ~200 us for SDPA decode at 128K on this GPU.
    try:
        rec.time("sdpa_enable_gqa_bf16_cache", n, None, kv_bytes,
                 lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True), d2d, args.rep)
    except RuntimeError as e:  # no backend for this shape: the row is missing, the run goes on
        print(f"sdpa_enable_gqa_bf16_cache at {n}: {e}")

    def eager():
        # the same attention as three cuBLAS/torch kernels (GEMV-shaped matmuls read K and V at full bandwidth, where
        # SDPA's fused kernels run one program per (head, query block) and leave most SMs idle at decode shapes).
        # Bytes: K + V + the [Hq, n] fp32 scores written and read twice (softmax), small next to K and V.
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
        return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)

    rec.time("eager_matmul_bf16_cache", n, None, kv_bytes, eager, d2d, args.rep)

    # Fetch: topk rows per KV head from the pinned host store into a device buffer (K; V is another such call).
    # Bytes: Hkv * topk * D * 2 over PCIe; against the pinned H2D peak.
    host_k = torch.empty(B, HKV, n, D, dtype=DTYPE, pin_memory=True)
    host_k.copy_(k)
    idx = torch.stack([torch.randperm(nq, device="cuda", generator=g)[: args.topk] for _ in range(B * HKV)])
    idx = idx.reshape(B, HKV, args.topk)
    buf = torch.empty(B, HKV, args.topk, D, dtype=DTYPE, device="cuda")
    fetch_bytes = B * HKV * args.topk * D * ELEM
    quant_ops.gather_rows(host_k, idx, buf, "cuda")
    path = quant_ops.GATHER_PATH  # "uva": the zero-copy kernel; anything else is a fallback worth seeing
    rec.time(f"fetch_gather_rows_{path}", n, None, fetch_bytes, lambda: quant_ops.gather_rows(host_k, idx, buf, "cuda"),
             h2d, args.rep)
    staging = torch.empty(B, HKV, args.topk, D, dtype=DTYPE, pin_memory=True)

    def host_gather():
        # the alternative: indices to the host (a sync), gather there into pinned memory, one H2D copy
        idx_h = idx.cpu()
        torch.gather(host_k, 2, idx_h.unsqueeze(-1).expand(-1, -1, -1, D), out=staging)
        buf.copy_(staging, non_blocking=True)

    rec.time("fetch_cpu_gather_h2d", n, None, fetch_bytes, host_gather, h2d, args.rep)

    fp_pos = torch.cat([idx, torch.arange(nq, nq + args.window, device="cuda").expand(B, HKV, -1)], dim=2)
    summaries = []
    for bits in [int(b) for b in args.bits.split(",")]:
        parts = bench_bits(args, rec, n, nq, bits, q, k, v, fp_pos, d2d, g)  # ((us, dev_us) of scores, select, attn)
        summaries.append((n, bits, parts, sdpa))
    return summaries


@contextlib.contextmanager
def _tuned(**consts):
    """kernels/attn_ops.py's module-level tuning constants set to other values for the duration (a sweep row)."""
    from specache_compile.kernels import attn_ops

    old = {name: getattr(attn_ops, name) for name in consts}
    for name, value in consts.items():
        setattr(attn_ops, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(attn_ops, name, value)


def bench_bits(args, rec: Recorder, n, nq, bits, q, k, v, fp_pos, d2d, g) -> tuple:
    from specache_compile.kernels import ops

    scale = 1.0 / math.sqrt(D)
    kk, vv = k[:, :, :nq], v[:, :, :nq]
    # Quantize the whole context (a prefill). Bytes: read K (Hkv * nq * D * 2), write codes (Hkv * nq * D * bits / 8)
    # and scale + zero (keys: 2 * Hkv * nq / group * D * 2; values: 2 * Hkv * nq * D / group * 2, the same count).
    codes_bytes = B * HKV * nq * D * bits // 8
    sz_bytes = 2 * B * HKV * nq * D // args.group * ELEM
    quant_bytes = B * HKV * nq * D * ELEM + codes_bytes + sz_bytes
    rec.time("quantize_keys", n, bits, quant_bytes, lambda: ops.quantize_keys(kk, bits, args.group), d2d, args.rep)
    rec.time("quantize_values", n, bits, quant_bytes, lambda: ops.quantize_values(vv, bits, args.group), d2d, args.rep)
    kq, ks, kz = ops.quantize_keys(kk, bits, args.group)
    vq, vs, vz = ops.quantize_values(vv, bits, args.group)

    # lowbit_scores. Bytes: key codes (Hkv * nq * D * bits / 8) + key scale/zero (2 * Hkv * nq / group * D * 2) + q +
    # the fp32 scores written (Hq * nq * 4).
    score_bytes = codes_bytes + sz_bytes + q.numel() * ELEM + B * HQ * nq * 4
    scores = ops.lowbit_scores(q, kq, ks, kz, bits, args.group, scale)
    s_t = rec.time("lowbit_scores", n, bits, score_bytes,
                   lambda: ops.lowbit_scores(q, kq, ks, kz, bits, args.group, scale), d2d, args.rep)

    # topk_positions on [B, Hkv, nq] fp32. Bytes: the scores read once (Hkv * nq * 4).
    probs = scores.reshape(B, HKV, HQ // HKV, nq).mean(2)
    rec.time("topk_positions", n, bits, B * HKV * nq * 4, lambda: ops.topk_positions(probs, args.topk), d2d, args.rep)

    def select():
        # what SpeCachePolicy.decode runs between the scores and the fetch: softmax per query head, mean over the GQA
        # group, top-k. Bytes: scores read (Hq * nq * 4) + probs written and read (2 * Hkv * nq * 4).
        p = torch.softmax(scores, dim=-1).reshape(B, HKV, HQ // HKV, nq).mean(2)
        return ops.topk_positions(p, args.topk)

    sel_t = rec.time("select_softmax_mean_topk", n, bits, B * HQ * nq * 4 + 2 * B * HKV * nq * 4, select, d2d, args.rep)
    # the two-pass fused selection (kernels/triton/select.py), over the same scores and a window's 64 extra columns.
    # Bytes: the scores read twice (2 * Hq * nq * 4). The static decode path runs it; the default path, the above.
    extra = torch.zeros(B, HQ, 64, device="cuda")
    from specache_compile.kernels.attn_ops import select_topk

    rec.time("select_fused_two_pass", n, bits, 2 * B * HQ * nq * 4,
             lambda: select_topk(scores.reshape(B, HQ, nq), extra, HQ // HKV, args.topk), d2d, args.rep)
    # larger pieces (8192 columns per row-stats program, top-k blocks of up to 2048 positions) side by side with the
    # current ones: the row that shows the smaller pieces pay
    with _tuned(_SELECT_COLS_PER_PART=8192, _SELECT_MAX_CANDIDATES=args.topk):
        rec.time("select_fused_two_pass[cols=8192,block=2048]", n, bits, 2 * B * HQ * nq * 4,
                 lambda: select_topk(scores.reshape(B, HQ, nq), extra, HQ // HKV, args.topk), d2d, args.rep)

    # lowbit_decode_attention over [0, nq) with topk fetched rows + the window as full-precision columns. Bytes: key and
    # value codes (2 * Hkv * nq * D * bits / 8) + key and value scale/zero (2 * 2 * Hkv * nq * D / group * 2) + the
    # columns (2 * Hkv * F * D * 2) + their positions (Hkv * F * 8) + the substitution map written and read
    # (2 * Hkv * nq) + q + out.
    f = fp_pos.shape[2]
    k_fp = torch.randn(B, HKV, f, D, device="cuda", dtype=DTYPE, generator=g)
    v_fp = torch.randn(B, HKV, f, D, device="cuda", dtype=DTYPE, generator=g)
    attn_bytes = (2 * codes_bytes + 2 * sz_bytes + 2 * B * HKV * f * D * ELEM + B * HKV * f * 8 + 2 * B * HKV * nq
                  + 2 * q.numel() * ELEM)

    def attend():
        return torch.ops.specache.lowbit_decode_attention(q, kq, ks, kz, vq, vs, vz, bits, args.group, 0, k_fp, v_fp,
                                                          fp_pos, None, scale)

    a_t = rec.time("lowbit_decode_attention", n, bits, attn_bytes, attend, d2d, args.rep)
    # the split heuristic's two knobs (kernels/attn_ops.py): more, shorter splits for a kernel at 8% of HBM
    for per_sm, min_tiles in ((16, 4), (4, 1), (16, 1)):
        with _tuned(_PROGRAMS_PER_SM=per_sm, _MIN_TILES_PER_SPLIT=min_tiles):
            rec.time(f"lowbit_decode_attention[programs_per_sm={per_sm},min_tiles={min_tiles}]", n, bits, attn_bytes,
                     attend, d2d, args.rep)

    # The decode path of one layer, fetch excluded: scores + selection + attention, against SDPA (filled in by main).
    rec.add("decode_path_scores_select_attention", n, bits, score_bytes + attn_bytes, s_t[0] + sel_t[0] + a_t[0], d2d,
            s_t[1] + sel_t[1] + a_t[1])
    return s_t, sel_t, a_t


# a sweep shape: tile:warps:stages[:per_sm[:maxnreg]] (maxnreg 0: the compiler's choice)
_LAUNCH = ("_TILE", "_NUM_WARPS", "_NUM_STAGES", "_PROGRAMS_PER_SM", "_MAXNREG")


@contextlib.contextmanager
def _fused_launch(*shape: int):
    """kernels/fused_ops.py's launch shape set to (tile, warps, stages[, programs per SM]) for the duration (a sweep
    row)."""
    from specache_compile.kernels import fused_ops

    names = _LAUNCH[: len(shape)]
    old = [getattr(fused_ops, n) for n in names]
    for n, v in zip(names, shape):
        setattr(fused_ops, n, None if n == "_MAXNREG" and v == 0 else v)
    try:
        yield
    finally:
        for n, v in zip(names, old):
            setattr(fused_ops, n, v)


def _launch_now() -> tuple:
    from specache_compile.kernels import fused_ops

    return tuple(getattr(fused_ops, n) for n in _LAUNCH)


def kernel_breakdown(fn, n: int = 20) -> dict[str, float]:
    """GPU time per call of each kernel fn launches, us (torch.profiler, n calls after a warm-up): which of the
    op's kernels takes the time."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: e.self_device_time_total / n for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}


def bench_fused(args, rec: Recorder, n: int, batch: int, bits: int, d2d: float, g, sweep=()) -> None:
    """fused_decode at one (context, batch, bits) as the static path calls it (see the module docstring), and the
    three unfused ops it replaces on the same inputs."""
    from specache_compile.kernels import ops
    from specache_compile.kernels.attn_ops import select_topk

    group, topk, sq = args.group, args.topk, 2
    ring = args.window + group
    cap = n + 64  # the capacity: the written positions plus a few steps
    cq = -(-cap // group) * group
    nq = (n - args.window) // group * group  # quantized tokens; the ring holds [nq, n)
    scale = 1.0 / math.sqrt(D)
    dev = dict(device=DEVICE)
    kq, ks, kz = ops.quantize_keys(torch.randn(batch, HKV, cq, D, dtype=DTYPE, generator=g, **dev), bits, group)
    vq, vs, vz = ops.quantize_values(torch.randn(batch, HKV, cq, D, dtype=DTYPE, generator=g, **dev), bits, group)
    q = torch.randn(batch, HQ, sq, D, dtype=DTYPE, generator=g, **dev)
    idx = torch.stack([torch.randperm(nq, generator=g, **dev)[:topk] for _ in range(batch * HKV)])
    idx = idx.reshape(batch, HKV, topk)
    k_f, v_f = (torch.randn(batch, HKV, topk, D, dtype=DTYPE, generator=g, **dev) for _ in range(2))
    k_w, v_w = (torch.randn(batch, HKV, ring + 1, D, dtype=DTYPE, generator=g, **dev) for _ in range(2))
    win_pos = torch.arange(nq, nq + ring + 1, **dev)
    win_pos = torch.where(win_pos < n, win_pos, -1)
    win_pos[-1] = n  # the speculative token
    win_pos = win_pos.expand(batch, HKV, ring + 1)
    bias = torch.zeros(batch, 1, sq, cap, dtype=DTYPE, **dev)
    bias[..., n + 1 :] = float("-inf")  # positions not written yet
    limit = torch.tensor(nq, **dev)
    low = (kq, ks, kz, vq, vs, vz)

    def fused():
        return ops.fused_decode(q, *low, bits, group, 0, k_f, v_f, idx, k_w, v_w, win_pos, bias, limit, scale, sq - 1,
                                topk)

    # Bytes it must read: codes (K and V), key scale/zero per group, value scale/zero per token, the fetched and window
    # columns with their positions, the bias (broadcast over heads: once), q; plus what it writes and reads back
    # through memory: the ranking row's fp32 logits (Hq * nq * 4, written once, read once by the block top-k).
    ngv = D // min(group, D)
    lowbit = (2 * batch * HKV * nq * D * bits // 8 + 2 * batch * HKV * (nq // group) * D * ELEM
              + 2 * batch * HKV * nq * ngv * ELEM)
    cols = batch * HKV * (topk + ring + 1) * (2 * D * ELEM + 8)
    must = lowbit + cols + bias.numel() * ELEM + q.numel() * ELEM
    logits = 2 * batch * HQ * nq * 4
    extra = dict(batch=batch, lowbit_bytes=lowbit, logits_roundtrip_bytes=logits)
    launch = dict(zip(("tile", "warps", "stages", "per_sm", "maxnreg"), _launch_now()))
    extra["launch"] = launch
    for shape in sweep:
        with _fused_launch(*shape):
            name = ",".join(f"{k}={v}" for k, v in zip(("tile", "warps", "stages", "per_sm", "maxnreg"), shape))
            rec.time(f"fused_decode[{name}]", n, bits, must, fused, d2d, args.rep)
            rec.rows[-1].update(extra, kernel_us=kernel_breakdown(fused),
                                launch=dict(zip(("tile", "warps", "stages", "per_sm", "maxnreg"), _launch_now())))
    if args.sweep_only:
        return
    _, dev_us = rec.time("fused_decode", n, bits, must, fused, d2d, args.rep)
    rec.rows[-1].update(extra, device_gbps_with_logits=(must + logits) / (dev_us * 1e-6) / 1e9,
                        kernel_us=kernel_breakdown(fused))
    for name, rank_row, k, attend in (("fused_decode_attend_only", -1, 0, True),
                                      ("fused_decode_rank_only", sq - 1, topk, False)):
        def part(rank_row=rank_row, k=k, attend=attend):
            return ops.fused_decode(q, *low, bits, group, 0, k_f, v_f, idx, k_w, v_w, win_pos, bias, limit, scale,
                                    rank_row, k, attend)

        rec.time(name, n, bits, must, part, d2d, args.rep)
        rec.rows[-1].update(extra)

    # the unfused static path on the same inputs (specache_static._rank_rows + lowbit_decode_attention, with the
    # cats of the columns it made a step): scores of the ranked row, selection, attention
    # the ranking's biases, which the unfused path computed once a step for every layer (StepShared): outside
    br = bias[..., sq - 1 : sq, :].float()
    low_b = br + torch.where(torch.arange(cap, **dev) < nq, 0.0, float("-inf"))
    col_b = br.expand(batch, HQ, 1, cap).gather(3, win_pos.clamp(min=0).repeat_interleave(HQ // HKV, 1).unsqueeze(2))
    col_b = col_b + torch.where(win_pos >= 0, 0.0, float("-inf")).repeat_interleave(HQ // HKV, 1).unsqueeze(2)

    def unfused():
        qr = q[:, :, sq - 1 : sq]
        low_logits = ops.lowbit_scores(qr, kq, ks, kz, bits, group, scale)[..., :cap] + low_b
        col_logits = ops.attention_logits(qr, k_w, scale) + col_b
        top = select_topk(low_logits[:, :, 0], col_logits[:, :, 0], HQ // HKV, topk)
        out = ops.lowbit_decode_attention(q, *low, bits, group, 0, torch.cat([k_f, k_w], 2), torch.cat([v_f, v_w], 2),
                                          torch.cat([idx, win_pos], 2), bias, scale)
        return out, top

    rec.time("static_unfused_scores_select_attention", n, bits, must, unfused, d2d, args.rep)
    rec.rows[-1].update(extra)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernel_bench.py: needs a CUDA device (it times GPU kernels); run it on the lent GPU",
              file=sys.stderr)
        return 2
    env = env_fields()
    rec = Recorder(args.topk)
    d2d, h2d = measure_peaks(args.rep)
    for name, gbps in (("peak_d2d_copy", d2d), ("peak_h2d_pinned", h2d)):
        rec.rows.append(dict(bench="kernels", kernel=name, context=None, bits=None, topk=None, gbps=gbps,
                             pct_of_peak=100.0, peak_gbps=gbps, median_us=None, bytes=None))
    g = torch.Generator(device="cuda").manual_seed(0)
    paths = []
    for n in [] if args.only_fused else [int(c) for c in args.contexts.split(",")]:
        paths += bench_context(args, rec, n, d2d, h2d, g)
        torch.cuda.empty_cache()
    sweep = [tuple(int(x) for x in c.split(":")) for c in args.fused_sweep.split(",") if c]
    for n in [int(c) for c in args.fused_contexts.split(",") if c]:
        for batch in [int(b) for b in args.fused_batches.split(",")]:
            for bits in [int(b) for b in args.bits.split(",")]:
                if args.sweep_only and not sweep:
                    break
                shape = [int(x) for x in args.fused_launch.split(":") if x]
                with _fused_launch(*shape):
                    bench_fused(args, rec, n, batch, bits, d2d, g, sweep)
                sweep = ()  # the launch shapes at the first point only
                torch.cuda.empty_cache()
    base = {(r["kernel"], r["context"]): r for r in rec.rows}
    for r in rec.rows:
        if r["kernel"] == "decode_path_scores_select_attention":
            sd, em = base["sdpa_bf16_cache", r["context"]], base["eager_matmul_bf16_cache", r["context"]]
            r.update(sdpa_us=sd["median_us"], sdpa_device_us=sd["device_us"], eager_device_us=em["device_us"],
                     speedup_vs_sdpa=sd["median_us"] / r["median_us"],
                     device_speedup_vs_sdpa=sd["device_us"] / r["device_us"],
                     device_speedup_vs_eager=em["device_us"] / r["device_us"])

    rows = [{**r, **env} for r in rec.rows]
    for p in write_rows(args.out, rows):
        print(f"wrote {len(rows)} rows to {p}")
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  peaks: HBM copy {d2d:.0f} GB/s, "
          f"pinned H2D {h2d:.1f} GB/s")
    print("us: do_bench median (host launch overhead included when it dominates); dev us: GPU time alone (L2 cold)")
    print(f"{'kernel':<38}{'context':>8}{'bits':>5}{'us':>9}{'GB/s':>7}{'%':>5}{'dev us':>9}{'GB/s':>7}{'%':>5}")
    for r in rows:
        if r["median_us"] is None:
            continue

        def f(x, fmt):
            return format(x, fmt) if x is not None else "-"

        print(f"{r['kernel']:<38}{r['context']:>8}{f(r['bits'], 'd'):>5}{r['median_us']:>9.1f}{f(r['gbps'], '.0f'):>7}"
              f"{f(r['pct_of_peak'], '.0f'):>5}{f(r['device_us'], '.1f'):>9}{f(r['device_gbps'], '.0f'):>7}"
              f"{f(r['device_pct_of_peak'], '.0f'):>5}")
    print(f"\n{'decode path, fetch excluded (dev us)':<38}{'context':>8}{'bits':>5}{'scores':>8}{'select':>8}"
          f"{'attn':>8}{'total':>8}{'SDPA':>8}{'eager':>8}")
    fused = [r for r in rows if r["kernel"].startswith(("fused_decode", "static_unfused"))]
    if fused:
        print(f"\n{'fused_decode (dev us, % of HBM over the bytes it must read)':<62}{'batch':>6}{'ctx':>8}{'bits':>5}"
              f"{'dev us':>9}{'%':>6}")
        for r in fused:
            print(f"{r['kernel']:<62}{r['batch']:>6}{r['context']:>8}{r['bits']:>5}{r['device_us']:>9.1f}"
                  f"{r['device_pct_of_peak']:>6.1f}")
            if r.get("kernel_us"):  # the op's kernels, profiled: where its GPU time goes
                print("    " + ", ".join(f"{k.split('(')[0][:40]} {v:.1f}" for k, v in
                                        sorted(r["kernel_us"].items(), key=lambda kv: -kv[1])[:6]))
    for n, bits, (s_t, sel_t, a_t), sdpa in paths:
        em = base["eager_matmul_bf16_cache", n]["device_us"]
        total = s_t[1] + sel_t[1] + a_t[1]
        print(f"{'':<38}{n:>8}{bits:>5}{s_t[1]:>8.1f}{sel_t[1]:>8.1f}{a_t[1]:>8.1f}{total:>8.1f}{sdpa[1]:>8.1f}"
              f"{em:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
