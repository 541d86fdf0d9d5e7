"""Compile fused_decode_kernel (the int32-word kernel) for sm_90 ahead of time, no GPU needed, and count what one
low-bit tile costs.

    PYTHONPATH=$PWD python bench/results/fused_2662bd6/aot_sm90.py [BITS=1] [BLOCK_N=32] [RANK_ROW=-1] ...

Llama-3-8B layer shape (32 / 8 heads, D 128, bf16, group 64, 32K context, a speculative step), the JIT's
specialisation emulated (integer arguments equal to 1 become constants, multiples of 16 get tt.divisibility=16, as
the launcher's do); env NW / NS set num_warps / num_stages. Prints registers, stack (spills), shared memory and the SASS
instructions of the low-bit tile loop per warp, and per token for the whole CTA.
"""

import inspect
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from specache_compile.kernels.triton import fused_decode as fd

bits = 2
B, HKV, REP, SQ, D, CQ, G, R, TOPK = 1, 8, 4, 2, 128, 32832, 64, 128, 64
over = dict(a.split("=") for a in sys.argv[1:])
bits = int(over.pop("BITS", bits))
per, cb = 8 // bits, D * bits // 8
ints = dict(lo=0, hi_q=CQ - 64, F=TOPK, FW=R + 1, W=CQ - 64, tile0=0, n_tiles=(CQ - 64) // 64, tiles_per_split=8,
            n_lb_splits=64, n_f_tiles=1, n_fp_tiles=4, fp_tiles_per_split=1,
            stride_qb=8192, stride_qh=128, stride_qs=4096, stride_qd=1,
            stride_kqb=HKV * (CQ + G) * cb // 4, stride_kqh=(CQ + G) * cb // 4, stride_kqs=cb // 4, stride_kqd=1,
            stride_ksb=HKV * 514 * D, stride_ksh=514 * D, stride_ksg=D, stride_ksd=1,
            stride_vqb=HKV * (CQ + G) * cb // 4, stride_vqh=(CQ + G) * cb // 4, stride_vqs=cb // 4, stride_vqd=1,
            stride_vsb=HKV * (CQ + G) * 2, stride_vsh=(CQ + G) * 2, stride_vss=2, stride_vsg=1,
            stride_subb=HKV * 1026, stride_subh=1026,
            stride_kfb=HKV * 128 * D, stride_kfh=128 * D, stride_kff=D, stride_kfd=1,
            stride_vfb=HKV * 128 * D, stride_vfh=128 * D, stride_vff=D, stride_vfd=1,
            stride_fpb=HKV * TOPK, stride_fph=TOPK, stride_fpf=1,
            stride_kwb=HKV * (R + 1) * D, stride_kwh=(R + 1) * D, stride_kwf=D, stride_kwd=1,
            stride_vwb=HKV * (R + 1) * D, stride_vwh=(R + 1) * D, stride_vwf=D, stride_vwd=1,
            stride_wpb=0, stride_wph=0, stride_wpf=1, stride_bb=SQ * CQ, stride_bh=0, stride_bs=CQ, stride_bw=1,
            stride_pob=HKV * 68 * 8 * D, stride_poh=68 * 8 * D, stride_pos=8 * D, stride_pom=D,
            stride_pmb=HKV * 68 * 8, stride_pmh=68 * 8, stride_pms=8, stride_rxb=32 * (CQ - 64), stride_rxh=CQ - 64)
ptrs = {n: "*bf16" for n in ("q_ptr", "ks_ptr", "kz_ptr", "vs_ptr", "vz_ptr", "kf_ptr", "vf_ptr", "kw_ptr", "vw_ptr",
                            "bias_ptr")}
ptrs.update({"kq_ptr": "*u8", "vq_ptr": "*u8", "sub_ptr": "*i32", "fpos_ptr": "*i64", "wpos_ptr": "*i64",
             "lim_ptr": "*i64"})
ptrs.update({n: "*fp32" for n in ("po_ptr", "pm_ptr", "pl_ptr", "rx_ptr", "rm_ptr", "rl_ptr")})
const = dict(D=D, DV=D, REP=REP, SQ=SQ, RANK_ROW=1, GROUP=G, GV=64, NGV=2, BITS=bits, BLOCK_M=8, BLOCK_N=64,
             BLOCK_NW=D * bits // 32, BLOCK_NWV=D * bits // 32, HAS_BIAS=True, HAS_LIMIT=True, ATTEND=True,
             PARTS=2, QPARTS=1, FP_PARTS=2, EMULATE=False)
const.update({k: int(v) for k, v in over.items()})
names = list(inspect.signature(fd.fused_decode_kernel.fn).parameters)
const = {k: v for k, v in const.items() if k in names}
sig, attrs = {}, {}
for i, p in enumerate(names):
    if p in ptrs:
        sig[p], attrs[(i,)] = ptrs[p], [["tt.divisibility", 16]]
    elif p in const:
        sig[p] = "constexpr"
    elif p == "qk_scale":
        sig[p] = "fp32"
    elif ints[p] == 1:
        sig[p], const[p] = "constexpr", 1
    else:
        sig[p] = "i32"
        if ints[p] % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
nw, ns = int(os.environ.get("NW", 4)), int(os.environ.get("NS", 3))
cap = {"maxnreg": int(os.environ["MAXNREG"])} if "MAXNREG" in os.environ else {}  # env MAXNREG: a register cap
c = triton.compile(ASTSource(fn=fd.fused_decode_kernel, signature=sig, constexprs=const, attrs=attrs),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns, **cap))
cubin = "/tmp/fused_decode_sm90.cubin"
open(cubin, "wb").write(c.asm["cubin"])
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True).stdout
ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
loop = []
for a, t in ins:
    m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
    if m and int(m.group(1), 16) < a:
        body = [x for aa, x in ins if int(m.group(1), 16) <= aa <= a]
        # the low-bit tile loop: the one that unpacks codes (HADD2: the exact subtraction of the mantissa trick)
        if any("HADD2" in x for x in body) and len(body) > len(loop):
            loop = body
reg = re.search(r"REG:(\d+) STACK:(\d+)", usage)
print(f"triton {triton.__version__} bits={bits} nw={nw} ns={ns} {over or ''}: registers {reg.group(1)}, stack "
      f"{reg.group(2)} B, shared {c.metadata.shared} B, loop {len(loop)} instructions/warp, "
      f"{len(loop) * nw / const['BLOCK_N']:.0f} warp-instructions/token")
