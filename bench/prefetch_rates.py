"""Prefetch hit rates on a real model: SpeCache's speculative token (``specache.generate``) against the
previous-query prediction (``model.generate`` feeds one token a step: the last step's top-k kept for the next).

One row per (model, task, length, mode) to bench/results/prefetch_rates.jsonl: the hit rate over every layer's
sampled steps (``hit_every=1``: every step), and the per-layer spread. CPU is enough: the rates are a property of
the model's attention, not of the device.

    python3 bench/prefetch_rates.py --model smollm2-135m --lengths 2048 --tasks niah_single_essay variable_tracking
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import specache  # noqa: E402
from bench.common import write_rows  # noqa: E402
from specache_compile import models  # noqa: E402
from specache_compile.evals.ruler import RULER  # noqa: E402


def rates(model, key: str) -> list[float]:
    return [s[key] for s in specache.stats(model)["store"].values() if s.get(key) is not None]


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model specache_compile.models can load")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths (tokens)")
    ap.add_argument("--tasks", nargs="+", default=["niah_single_essay", "variable_tracking"],
                    help=f"RULER-style tasks (evals/ruler.py): {sorted(RULER)}")
    ap.add_argument("--topk", type=int, default=64, help="rows fetched per KV head (SpeCache: 64)")
    ap.add_argument("--new", type=int, default=24, help="tokens generated per prompt")
    ap.add_argument("--out", default="prefetch_rates.jsonl", help="file name under bench/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    base, tok = models.load(args.model)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for task in args.tasks:
        for length in args.lengths:
            t = RULER[task](tok, length, 0.5, 0)
            ids = torch.tensor([t.input_ids])
            for mode in ("speculative", "previous_query"):
                # specache.compile works in place: a copy of the loaded model per run, not another load
                m = specache.compile(copy.deepcopy(base), topk=args.topk, policy_options={"hit_every": 1})
                if mode == "speculative":
                    specache.generate(m, ids, args.new, speculative=True)
                    got = rates(m, "prefetch_hit_rate")
                else:
                    m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, pad_token_id=tok.eos_token_id)
                    got = rates(m, "previous_query_hit_rate")
                row = {"bench": "prefetch_rates", "model": args.model, "task": task, "length": length,
                       "mode": mode, "topk": args.topk, "new_tokens": args.new, "layers": len(got),
                       "hit_rate_mean": statistics.fmean(got) if got else None,
                       "hit_rate_min": min(got) if got else None, "hit_rate_max": max(got) if got else None,
                       "git": sha, "torch": torch.__version__, "repro": shlex.join(["bench/prefetch_rates.py",
                                                                                      *(argv or sys.argv[1:])])}
                print({k: row[k] for k in ("task", "length", "mode", "hit_rate_mean", "hit_rate_min")}, flush=True)
                rows.append(row)
                del m
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
