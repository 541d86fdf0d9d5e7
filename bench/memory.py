"""Device memory before/after prefill of a Llama-shaped random model, with and without specache, in one process.

    python bench/memory.py --context 16384            # Llama-3-8B shape, bf16, on CUDA

One row per method to bench/results/memory.jsonl: memory_allocated before and after prefill, peak during prefill,
specache's bytes per tier, and the median decode step time (reference kernels until the Triton ones land).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import env_fields, write_rows  # noqa: E402
from specache_compile.generate import cache_keyword  # noqa: E402


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0)


def run(model, ids, steps, cache):
    dev = ids.device
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    after = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    cache = getattr(out, "cache", None) or out.past_key_values  # (the field is renamed with the argument)
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(input_ids=tok, use_cache=True, **{cache_keyword(model): cache})
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            cache = getattr(out, "cache", None) or out.past_key_values  # (the field is renamed with the argument)
    model_cache_device = sum(
        t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values)
        if isinstance(t, torch.Tensor) and t.device.type == dev.type
    )
    del out, cache
    return {"before_bytes": before, "after_prefill_bytes": after, "prefill_delta_bytes": after - before,
            "peak_prefill_bytes": peak, "prefill_s": prefill_s, "model_cache_device_bytes": model_cache_device,
            "step_ms_median": 1e3 * statistics.median(times[2:] or times), "steps": steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--context", type=int, default=16384, help="prompt length in tokens")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama-3-8B-shaped model")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (the logits' memory)")
    p.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    p.add_argument("--topk", type=int, default=64, help="specache's rows fetched per KV head")
    p.add_argument("--bits", type=int, default=2, help="bit width of specache's low-bit copy")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, DynamicCache

    import specache

    cfg = llama_config(args)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = torch.randint(0, args.vocab, (1, args.context), device="cuda")
    base = {"bench": "memory", "context": args.context, "batch": 1, "layers": args.layers, "dtype": "bfloat16",
            **env_fields()}
    rows = []
    full = run(model, ids, args.steps, DynamicCache(config=cfg))
    rows.append({**base, "method": "full (HF DynamicCache, eager)", **full})
    print(rows[-1], flush=True)

    specache.compile(model, policy="specache", topk=args.topk, bits=args.bits, inner="eager",
                     max_seq_len=args.context + args.steps + 8)
    ours = run(model, ids, args.steps, DynamicCache(config=cfg))
    st = specache.stats(model)
    rows.append({**base, "method": "specache", "topk": args.topk, "bits": args.bits, **ours,
                 "specache_host_bytes": st["bytes"]["host"], "specache_device_bytes": st["bytes"]["device"],
                 "sites_rewritten": st["rewritten"], "sites_found": st["found"]})
    print(rows[-1], flush=True)
    write_rows("memory.jsonl", rows)
    kv = 2 * args.layers * 8 * 128 * 2 * args.context
    print(f"\nfull fp16 KV at {args.context}: {kv / 2**30:.2f} GiB")
    for r in rows:
        print(f"{r['method']:32s} prefill delta {r['prefill_delta_bytes'] / 2**30:7.3f} GiB  peak "
              f"{r['peak_prefill_bytes'] / 2**30:7.2f} GiB  model-cache on device "
              f"{r['model_cache_device_bytes'] / 2**20:9.1f} MiB  step {r['step_ms_median']:8.1f} ms")
    if "specache_device_bytes" in rows[-1]:
        r = rows[-1]
        print(f"specache tiers: host {r['specache_host_bytes'] / 2**30:.2f} GiB, device "
              f"{r['specache_device_bytes'] / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
