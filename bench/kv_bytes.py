"""Where a policy's device KV bytes go: each tensor of its device tier, bytes in use and allocated (shipped model).

    python bench/kv_bytes.py --policy kvcomp --context 4096            # CPU is enough: the bytes do not depend on it
    python bench/kv_bytes.py --policy specache:bits=1 --context 4096

The model is models/specache-tiny (bf16), the prompt random tokens, then ``--new-tokens`` greedy steps through
``specache.generate``. One row per run to bench/results/kv_bytes.jsonl: the full bf16 KV bytes, the tier's bytes in
use and allocated (the accuracy harness's ``kv_compression`` divides by the allocated ones), and per tensor name
(summed over the layers) both counts; for kvcomp also the bits per compressed element, streams alone and with their
metadata (offsets, scales, minima, codebooks).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import specache  # noqa: E402
from bench.common import env_fields, write_rows  # noqa: E402
from specache_compile.evals.harness import DEFAULT_MODEL, parse_policy  # noqa: E402
from specache_compile.policies.kvcomp import _used  # noqa: E402
from specache_compile.runtime.buffers import Growable  # noqa: E402
from specache_compile.runtime.store import _nbytes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="kvcomp", help="a policy spec as the eval harness takes it (kvcomp:rel_k=0.1)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default="kv_bytes.jsonl")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.eval()
    ids = torch.randint(4, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    name, overrides = parse_policy(args.policy)
    specache.compile(model, policy=name, inner="eager", **overrides)
    with torch.no_grad():
        specache.generate(model, ids, args.new_tokens)
    rt = specache.runtime_of(model)
    used, alloc = collections.Counter(), collections.Counter()
    full = 0
    for s in rt.sites.values():
        full += s.batch * s.heads * s.length * (s.head_dim + s.v_head_dim) * 2
        for k, v in s.tier.items():
            if not isinstance(v, (Growable, torch.Tensor)):
                continue  # counters and sizes
            used[k] += _used(v)  # rows in use (kvcomp's own accounting)
            alloc[k] += _nbytes(v)  # capacity (what the store's tier_bytes counts)
    row = {"bench": "kv_bytes", "policy": args.policy, "context": args.context, "new_tokens": args.new_tokens,
           "full_kv_bytes": full, "device_used_bytes": sum(used.values()),
           "device_allocated_bytes": sum(alloc.values()), "device_bytes_reported": specache.memory(model)["device"],
           "by_tensor": {k: {"used": used[k], "allocated": alloc[k]} for k in sorted(alloc, key=lambda k: -alloc[k])}}
    if name == "kvcomp":
        sites = list(rt.sites.values())
        for kind, dim in (("k", "head_dim"), ("v", "v_head_dim")):
            elems = sum(s.tier[f"n{kind}"] * s.batch * s.heads * getattr(s, dim) for s in sites)
            meta = sum(used[f"{kind}_{p}"] for p in ("base", "rel", "scale", "min", "lut", "code", "len"))
            row[f"{kind}_stream_bits_per_element"] = 8 * used[f"{kind}_words"] / max(elems, 1)
            row[f"{kind}_bits_per_element"] = 8 * (used[f"{kind}_words"] + meta) / max(elems, 1)
    row.update(env_fields())
    write_rows(args.out, [row])
    print(f"{args.policy} at {args.context} tokens: full bf16 KV {full / 2**20:.2f} MiB; device tier in use "
          f"{row['device_used_bytes'] / 2**20:.2f} MiB (x{full / row['device_used_bytes']:.2f}), allocated "
          f"{row['device_allocated_bytes'] / 2**20:.2f} MiB (x{full / row['device_allocated_bytes']:.2f})")
    for k, b in row["by_tensor"].items():
        print(f"  {k:14s} in use {b['used'] / 2**10:9.1f} KiB   allocated {b['allocated'] / 2**10:9.1f} KiB")
    for k in ("k_stream_bits_per_element", "k_bits_per_element", "v_stream_bits_per_element", "v_bits_per_element"):
        if k in row:
            print(f"  {k}: {row[k]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
