"""``specache demo``: compile a small model, generate, and show the full cache and specache side by side.

The table: KV bytes on the device and on the host, decode step time, greedy agreement with the full cache.

By default the model is the project's own trained tiny Llama (models/specache-tiny) when it is in the checkout, else a
Llama-shaped model with random weights built from a config (no weights are downloaded). Runs on CPU by default.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "specache-tiny"


def _load(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, args.dtype)
    path = Path(args.model) if args.model else (TINY if (TINY / "config.json").exists() else None)
    if path is not None:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(path)
        return model.eval().to(args.device), tok, str(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval().to(args.device), None, "random Llama config (4 layers, 8/2 heads, D=32)"


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _timed_generate(model, ids, n: int) -> tuple[list[int], float | None, float]:
    """Greedy ``model.generate``: (new tokens, median ms between consecutive decode steps after the first, seconds in
    all). The steps are timed by a logits processor (called once per step, after the step's forward)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.marks: list[float] = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            return scores

    clock = Clock()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    secs = time.perf_counter() - t0
    steps = sorted(b - a for a, b in zip(clock.marks[1:], clock.marks[2:]))  # the first decode step may compile
    step_ms = 1e3 * steps[len(steps) // 2] if steps else None
    return out[0, ids.shape[1]:].tolist(), step_ms, secs


def demo(args) -> int:
    from rich.console import Console
    from rich.table import Table

    import specache

    from .evals.harness import kv_bytes_full

    console = Console()
    model, tok, what = _load(args)
    ref = None
    if args.compare:
        import copy

        ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (1, args.context), generator=g).to(args.device)
    overrides = {"policy": args.policy}
    if args.topk is not None:
        overrides["topk"] = args.topk
    specache.compile(model, **overrides)
    console.print(f"[bold]specache demo[/]: {what}, {args.context}-token prompt, policy={args.policy}, "
                  f"device={args.device}")
    new, step_ms, secs = _timed_generate(model, ids, args.new_tokens)
    st = specache.stats(model)
    want = full_ms = None
    if ref is not None:
        want, full_ms, _ = _timed_generate(ref, ids, args.new_tokens)

    full = kv_bytes_full(model, args.context + len(new))
    where = "GPU" if args.device.startswith("cuda") else args.device.upper()
    table = Table(title=f"full cache vs specache: {args.context}-token prompt, {len(new)} new tokens")
    table.add_column("")
    table.add_column("full cache", justify="right")
    table.add_column("specache" if args.policy == "specache" else f"specache: {args.policy}", justify="right")
    table.add_row(f"KV bytes on the model's device ({where})", _fmt(full), _fmt(st["bytes"]["device"]))
    table.add_row("KV bytes in host memory (pinned on CUDA)", "0 B", _fmt(st["bytes"]["host"]))
    ms = (lambda x: "-" if x is None else f"{x:.1f} ms")
    table.add_row("decode step (median of the steps after the first)", ms(full_ms), ms(step_ms))
    agree = "-" if want is None else f"{sum(a == b for a, b in zip(new, want))}/{len(want)}"
    table.add_row("greedy tokens equal to the full cache's", "-" if want is None else f"{len(want)}/{len(want)}",
                  agree)
    console.print(table)
    if not args.device.startswith("cuda"):
        console.print("(on CPU specache's kernels run as their pure-torch references: these step times say nothing "
                      "about a GPU; see the README's GPU table)")
    console.print(f"attention sites: found {st['found']}, rewritten {st['rewritten']}, left alone {st['skipped']}")
    console.print(f"generated {len(new)} tokens in {secs:.1f} s (compile included): {new}")
    if tok is not None:
        console.print(f"text: {tok.decode(new)!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a small model, generate, print full cache vs specache side by side")
    d.add_argument("--model", help="a local transformers model folder (default: models/specache-tiny if present)")
    d.add_argument("--policy", default="specache")
    d.add_argument("--topk", type=int, default=None)
    d.add_argument("--context", type=int, default=2048)
    d.add_argument("--new-tokens", type=int, default=24)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--no-compare", dest="compare", action="store_false", help="skip the full-cache comparison")
    sub.add_parser("eval", help="the accuracy harness (needle, passkey, agreement); see `specache eval --help`",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        from .evals.harness import main as eval_main

        return eval_main(argv[1:])
    args = parser.parse_args(argv)
    args.repro = shlex.join(sys.argv)
    if args.cmd == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
