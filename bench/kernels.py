"""Times specache's kernels on CUDA at one Llama-3-8B attention layer (Hq 32, Hkv 8, D 128, bf16), in one process.

    python bench/kernels.py                                  # contexts 8K, 32K, 128K; bits 2 and 1; top-64
    python bench/kernels.py --contexts 32768 --bits 2        # one point

Per context and bit width: lowbit_scores, top-k selection, lowbit_decode_attention, quantize_keys/values (over the
whole context, as a prefill quantizes it), the top-k fetch from pinned host memory (zero-copy gather_rows, and the
CPU gather + H2D copy alternative), and SDPA over the bf16 cache on the device as the baseline. Peaks measured in the
same run: a device-to-device copy (bytes read + written) and a pinned host-to-device copy.

Each kernel's GB/s counts the bytes it must move (formula next to each measurement), against the HBM peak for the
on-device kernels and the pinned H2D peak for the fetch. Timing: triton.testing.do_bench, median, warm-up excluded
(it also flushes L2 between runs). One JSON line per measurement to bench/results/kernels.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_fields, write_rows  # noqa: E402

B, HQ, HKV, D = 1, 32, 8, 128  # Llama-3-8B attention layer, one sequence
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element


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
    return ap.parse_args(argv)


def bench_us(fn, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


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

    def add(self, kernel, context, bits, nbytes, us, peak):
        gbps = nbytes / (us * 1e-6) / 1e9 if nbytes else None
        self.rows.append(dict(bench="kernels", kernel=kernel, context=context, bits=bits, topk=self.topk, gbps=gbps,
                              pct_of_peak=100.0 * gbps / peak if gbps else None, peak_gbps=peak, median_us=us,
                              bytes=nbytes))
        return self.rows[-1]


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
    sdpa_us = bench_us(lambda: F.scaled_dot_product_attention(qg, k, v, scale=scale), args.rep)
    rec.add("sdpa_bf16_cache", n, None, 2 * B * HKV * n * D * ELEM + 2 * q.numel() * ELEM, sdpa_us, d2d)

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
    us = bench_us(lambda: quant_ops.gather_rows(host_k, idx, buf, "cuda"), args.rep)
    rec.add(f"fetch_gather_rows_{path}", n, None, fetch_bytes, us, h2d)
    staging = torch.empty(B, HKV, args.topk, D, dtype=DTYPE, pin_memory=True)

    def host_gather():
        # the alternative: indices to the host (a sync), gather there into pinned memory, one H2D copy
        idx_h = idx.cpu()
        torch.gather(host_k, 2, idx_h.unsqueeze(-1).expand(-1, -1, -1, D), out=staging)
        buf.copy_(staging, non_blocking=True)

    rec.add("fetch_cpu_gather_h2d", n, None, fetch_bytes, bench_us(host_gather, args.rep), h2d)

    fp_pos = torch.cat([idx, torch.arange(nq, nq + args.window, device="cuda").expand(B, HKV, -1)], dim=2)
    summaries = []
    for bits in [int(b) for b in args.bits.split(",")]:
        s_us, sel_us, a_us = bench_bits(args, rec, n, nq, bits, q, k, v, fp_pos, d2d, g)
        path_us = s_us + sel_us + a_us
        summaries.append((n, bits, s_us, sel_us, a_us, path_us, sdpa_us))
    return summaries


def bench_bits(args, rec: Recorder, n, nq, bits, q, k, v, fp_pos, d2d, g) -> tuple[float, float, float]:
    from specache_compile.kernels import ops

    scale = 1.0 / math.sqrt(D)
    kk, vv = k[:, :, :nq], v[:, :, :nq]
    # Quantize the whole context (a prefill). Bytes: read K (Hkv * nq * D * 2), write codes (Hkv * nq * D * bits / 8)
    # and scale + zero (keys: 2 * Hkv * nq / group * D * 2; values: 2 * Hkv * nq * D / group * 2, the same count).
    codes_bytes = B * HKV * nq * D * bits // 8
    sz_bytes = 2 * B * HKV * nq * D // args.group * ELEM
    quant_bytes = B * HKV * nq * D * ELEM + codes_bytes + sz_bytes
    rec.add("quantize_keys", n, bits, quant_bytes, bench_us(lambda: ops.quantize_keys(kk, bits, args.group), args.rep),
            d2d)
    rec.add("quantize_values", n, bits, quant_bytes,
            bench_us(lambda: ops.quantize_values(vv, bits, args.group), args.rep), d2d)
    kq, ks, kz = ops.quantize_keys(kk, bits, args.group)
    vq, vs, vz = ops.quantize_values(vv, bits, args.group)

    # lowbit_scores. Bytes: key codes (Hkv * nq * D * bits / 8) + key scale/zero (2 * Hkv * nq / group * D * 2) + q +
    # the fp32 scores written (Hq * nq * 4).
    score_bytes = codes_bytes + sz_bytes + q.numel() * ELEM + B * HQ * nq * 4
    scores = ops.lowbit_scores(q, kq, ks, kz, bits, args.group, scale)
    s_us = bench_us(lambda: ops.lowbit_scores(q, kq, ks, kz, bits, args.group, scale), args.rep)
    rec.add("lowbit_scores", n, bits, score_bytes, s_us, d2d)

    # topk_positions on [B, Hkv, nq] fp32. Bytes: the scores read once (Hkv * nq * 4).
    probs = scores.reshape(B, HKV, HQ // HKV, nq).mean(2)
    rec.add("topk_positions", n, bits, B * HKV * nq * 4,
            bench_us(lambda: ops.topk_positions(probs, args.topk), args.rep), d2d)

    def select():
        # what SpeCachePolicy.decode runs between the scores and the fetch: softmax per query head, mean over the GQA
        # group, top-k. Bytes: scores read (Hq * nq * 4) + probs written and read (2 * Hkv * nq * 4).
        p = torch.softmax(scores, dim=-1).reshape(B, HKV, HQ // HKV, nq).mean(2)
        return ops.topk_positions(p, args.topk)

    sel_us = bench_us(select, args.rep)
    rec.add("select_softmax_mean_topk", n, bits, B * HQ * nq * 4 + 2 * B * HKV * nq * 4, sel_us, d2d)

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

    a_us = bench_us(attend, args.rep)
    rec.add("lowbit_decode_attention", n, bits, attn_bytes, a_us, d2d)

    # The decode path of one layer, fetch excluded: scores + selection + attention, against SDPA (filled in by main).
    rec.add("decode_path_scores_select_attention", n, bits, score_bytes + attn_bytes, s_us + sel_us + a_us, d2d)
    return s_us, sel_us, a_us


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: needs a CUDA device (it times GPU kernels); run it on the lent GPU", file=sys.stderr)
        return 2
    env = env_fields()
    rec = Recorder(args.topk)
    d2d, h2d = measure_peaks(args.rep)
    for name, gbps in (("peak_d2d_copy", d2d), ("peak_h2d_pinned", h2d)):
        rec.rows.append(dict(bench="kernels", kernel=name, context=None, bits=None, topk=None, gbps=gbps,
                             pct_of_peak=100.0, peak_gbps=gbps, median_us=None, bytes=None))
    g = torch.Generator(device="cuda").manual_seed(0)
    paths = []
    for n in [int(c) for c in args.contexts.split(",")]:
        paths += bench_context(args, rec, n, d2d, h2d, g)
        torch.cuda.empty_cache()
    sdpa = {(r["context"]): r["median_us"] for r in rec.rows if r["kernel"] == "sdpa_bf16_cache"}
    for r in rec.rows:
        if r["kernel"] == "decode_path_scores_select_attention":
            r["sdpa_us"] = sdpa[r["context"]]
            r["speedup_vs_sdpa"] = r["sdpa_us"] / r["median_us"]

    rows = [{**r, **env} for r in rec.rows]
    for p in write_rows(args.out, rows):
        print(f"wrote {len(rows)} rows to {p}")
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  peaks: HBM copy {d2d:.0f} GB/s, "
          f"pinned H2D {h2d:.1f} GB/s")
    print(f"{'kernel':<38}{'context':>8}{'bits':>5}{'us':>10}{'GB/s':>9}{'% peak':>8}")
    for r in rows:
        if r["median_us"] is None:
            continue
        gb = f"{r['gbps']:.0f}" if r["gbps"] else "-"
        pct = f"{r['pct_of_peak']:.0f}" if r["pct_of_peak"] else "-"
        bits = r["bits"] if r["bits"] is not None else "-"
        print(f"{r['kernel']:<38}{r['context']:>8}{bits:>5}{r['median_us']:>10.1f}{gb:>9}{pct:>8}")
    print(f"\n{'decode path (fetch excluded)':<30}{'context':>8}{'bits':>5}{'scores':>9}{'select':>9}{'attn':>9}"
          f"{'total':>9}{'SDPA':>9}{'x':>6}")
    for n, bits, s_us, sel_us, a_us, p_us, sd_us in paths:
        print(f"{'':<30}{n:>8}{bits:>5}{s_us:>9.1f}{sel_us:>9.1f}{a_us:>9.1f}{p_us:>9.1f}{sd_us:>9.1f}"
              f"{sd_us / p_us:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
