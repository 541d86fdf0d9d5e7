"""Soak: many decode steps through a compiled model's own loop; host memory (RSS) and the store's bytes sampled as
it goes, the slope after warm-up against what the KV itself adds per step; two compiled models interleaved, each
checked against its own unmodified copy. One JSON row per run in bench/results/reliability.jsonl.

    python3 bench/soak.py --steps 10000                    # CPU, tiny random Llama
    python3 bench/soak.py --steps 3000 --sequences 10      # ten sequences: growth across them is a leak
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_models import build, twin  # noqa: E402

import specache  # noqa: E402
from specache_compile.generate import cache_keyword  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--policy", default="specache")
    ap.add_argument("--every", type=int, default=250, help="sample memory every N steps")
    ap.add_argument("--sequences", type=int, default=1,
                    help="split the steps into N sequences, each a new prefill: host memory that grows within a "
                         "sequence and is reused by the next is the sequence's own state; growth from one sequence's "
                         "end to the next's (rss_growth_per_sequence_bytes, after the first two) is a leak")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "reliability.jsonl"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    n_ctx = args.steps + 64
    refs = [build("llama", seed=s, max_position_embeddings=n_ctx + 16).to(dev) for s in (0, 1)]
    models = [specache.compile(twin(r), policy=args.policy, max_seq_len=n_ctx, topk=32, window=16, group_size=16)
              for r in refs]
    kw = cache_keyword(refs[0])  # transformers is renaming past_key_values to cache

    def prefill(seq):
        prompt = torch.randint(2, 128, (1, 32), generator=torch.Generator().manual_seed(seq)).to(dev)
        state = []
        for m in [*models, *refs]:
            out = m(input_ids=prompt, use_cache=True)
            state.append([out.past_key_values, out.logits[:, -1:].argmax(-1)])
        return state

    state = prefill(0)
    xs, mem, dev_mem, store, seq_end = [], [], [], [], []
    per_seq = -(-args.steps // max(1, args.sequences))
    mismatches, t0 = 0, time.perf_counter()
    for step in range(args.steps):
        if step and step % per_seq == 0:
            state = None
            gc.collect()
            seq_end.append(rss())
            state = prefill(step // per_seq)
        for i, m in enumerate([*models, *refs]):  # the two compiled models interleaved, then their references
            cache, tok = state[i]
            out = m(input_ids=tok, **{kw: cache}, use_cache=True)
            state[i] = [out.past_key_values, out.logits[:, -1:].argmax(-1)]
        for j in range(2):  # each compiled model against its own unmodified copy (teacher forced on its tokens)
            if not torch.equal(state[j][1], state[2 + j][1]):
                mismatches += 1
                state[2 + j][1] = state[j][1]
        if step % args.every == 0:
            xs.append(step)
            mem.append(rss())
            dev_mem.append(torch.cuda.memory_allocated() if dev == "cuda" else 0)
            store.append(sum(specache.memory(m)["host"] + specache.memory(m)["device"] for m in models))
    secs = time.perf_counter() - t0
    warm = len(xs) // 5  # the first fifth is warm-up (allocator pools, Dynamo's recompiles for dynamic shapes)
    row = {
        "bench": "soak", "policy": args.policy, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "steps": args.steps, "models": 2, "seconds": round(secs, 1),
        "token_mismatches_vs_unmodified": mismatches,
        "rss_slope_bytes_per_step": round(slope(xs[warm:], mem[warm:]), 1),
        "device_slope_bytes_per_step": round(slope(xs[warm:], dev_mem[warm:]), 1),
        "store_slope_bytes_per_step": round(slope(xs[warm:], store[warm:]), 1),
        "rss_start": mem[warm], "rss_end": mem[-1],
        "sequences": args.sequences, "rss_at_sequence_ends": seq_end,
        "rss_growth_per_sequence_bytes": (round((seq_end[-1] - seq_end[1]) / (len(seq_end) - 2), 1)
                                          if len(seq_end) > 2 else None),
        "git": sha,  # at the start: the code that ran
        "torch": torch.__version__, "repro": shlex.join(sys.argv),
    }
    print(json.dumps(row))
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
