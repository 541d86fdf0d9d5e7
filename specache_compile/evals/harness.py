"""The accuracy harness: needle-in-a-haystack, passkey, greedy agreement with the full cache, next-token agreement
along the full cache's tokens (teacher forced: ``forced_agreement``), per-layer attention error. One entry point for
every policy the pass supports:

    specache eval --quick                                  # CPU, < 2 min: asserts the full-cache model finds the needle
    specache eval --policies baseline full specache specache:bits=1 --contexts 1024 2048 4096 8192 16384
    specache eval --model smollm2-135m --suite ruler --quick   # a real model (specache_compile.models), RULER tasks

``--model`` is ``tiny`` (the shipped model, the default), a name of :mod:`specache_compile.models` (``smollm2-135m``,
``gemma3-270m``) or a transformers model folder. ``--suite ruler`` runs the RULER-style tasks of
:mod:`specache_compile.evals.ruler` (in the chat template of an instruction model, after BOS for Gemma) and writes
bench/results/accuracy_real.jsonl: one row per (task, policy, context, depth), the score the mean of RULER's
string_match_all over the trials, the KV compression measured after that row's last sequence.

A policy spec is a registered policy name with optional Config overrides after a colon (``specache:bits=1,topk=32``);
``baseline`` is the unmodified model with its ordinary cache on the device (the full-cache reference). Each run
appends one row per (task, policy, context, depth) to bench/results/accuracy.jsonl and draws one needle heatmap per
policy next to it.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "specache-tiny"
RESULTS = REPO / "bench" / "results"
POLICIES = ["baseline", "full", "specache"]  # --policies when not given (--quick: baseline and specache)
CONTEXTS = [1024, 2048, 4096, 8192, 16384]  # --contexts when not given (--quick: its own)


def parse_policy(spec: str) -> tuple[str, dict]:
    """ "specache:bits=1,topk=32" -> ("specache", {"bits": 1, "topk": 32}). Names that are not Config fields go to
    policy_options: "cake:budget=0.1" -> ("cake", {"policy_options": {"budget": 0.1}})."""
    import dataclasses

    from ..config import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    name, _, rest = spec.partition(":")
    overrides: dict = {}
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        else:
            value = {"true": True, "false": False}.get(value.lower(), value)
        (overrides if key in fields else options)[key] = value
    if options:
        overrides["policy_options"] = options
    return name, overrides


def kv_bytes_full(model, length: int, batch: int = 1, layers: set[int] | None = None) -> int:
    """Bytes of the model's own full-precision KV cache at ``length`` tokens (of ``layers`` only, by index, if given).
    A sliding-window layer (Gemma-3's ``layer_types``) holds at most its window, as transformers'
    DynamicSlidingWindowLayer does."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    tokens = sum(min(length, window) if k == "sliding_attention" and window else length
                 for i, k in enumerate(kinds) if layers is None or i in layers)
    return 2 * heads * head_dim * tokens * batch * model.dtype.itemsize


def kv_bytes_device(model, length: int, batch: int = 1) -> int:
    """KV bytes a specache-compiled model holds on the device at ``length`` tokens: the policy's device tier for the
    rewritten attentions plus the model's own cache for each one left alone (a sliding-window layer by default)."""
    import specache

    st = specache.stats(model)
    left = [name for name, s in st["sites"].items() if s["status"] != "rewritten"]
    layers = {int(m.group(1)) for name in left if (m := re.search(r"layers\.(\d+)\.", name))}
    if len(layers) != len(left):
        raise ValueError(f"specache eval: expected every attention left alone to name its layer ('layers.<i>.'), got "
                         f"{sorted(left)}; fix: count those layers' own cache bytes for this model by hand")
    return st["bytes"]["device"] + (kv_bytes_full(model, length, batch, layers) if layers else 0)


def load_model(name: str, dtype: torch.dtype, device: str):
    """(model, tokenizer, name for the rows): ``tiny`` (the shipped model), a :mod:`specache_compile.models` name, or
    a transformers model folder; SDPA attention, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import models

    if name in models.MODELS:
        model, tok = models.load(name, dtype=dtype, device=device)
        return model, tok, name
    folder = DEFAULT_MODEL if name == "tiny" else Path(name)
    if not folder.is_dir():
        raise ValueError(f"specache eval --model: expected 'tiny', one of {sorted(models.MODELS)} or a model folder, "
                         f"got {name!r}; fix: python3 -m specache_compile.models list")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return model.eval().to(device), AutoTokenizer.from_pretrained(folder), folder.name


def prefetch_hit_rate(model) -> float | None:
    """The share of the real steps' top-k positions that the speculative steps had prefetched, summed over every site
    of a specache-compiled model's current sequence; None where nothing was prefetched (the decode bench's rows too)."""
    import specache

    store = specache.stats(model)["store"].values()
    sampled = sum(s.get("prefetch_sampled", 0) for s in store)
    return sum(s.get("prefetch_hits", 0) for s in store) / sampled if sampled else None


class Runner:
    """One policy over one copy of the model."""

    def __init__(self, base, spec: str, device: str, defaults: dict, measure_error: bool = True):
        import specache

        self.spec = spec
        self.name, overrides = parse_policy(spec)
        self.model = copy.deepcopy(base)
        self.config = None
        if self.name != "baseline":
            overrides = {**defaults, **overrides}
            self.model = specache.compile(self.model, policy=self.name, measure_error=measure_error, **overrides)
            self.config = specache.runtime_of(self.model).config

    def generate(self, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids], device=self.model.device)
        if self.config is not None and self.config.speculative:
            import specache

            if specache.runtime_of(self.model).policy.speculative:
                # SpeCache as published: pre-decoding, then [real, speculative] steps with prefetch; EOS masked as
                # model.generate(min_new_tokens=n) masks it for the reference (else the sequences part at its EOS)
                return specache.generate(self.model, x, n, suppress_tokens=self._eos())[0].tolist()
        # a DynamicCache, not the bucketed StaticCache a compiled model.generate defaults to for a policy with a static
        # path: the rows' KV compression is the policy's state over the written tokens, as the peers' rows measure
        # theirs, not a bucket's unused capacity (the static path's tokens equal the default path's: tests/policies)
        kw = {"cache_implementation": "dynamic"} if self.config is not None else {}
        with torch.no_grad():
            out = self.model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n, **kw)
        return out[0, len(ids) :].tolist()

    def forced(self, ids: list[int], ref: list[int]) -> list[int]:
        """The policy's next-token predictions along ``ref`` fed as the history (teacher forcing): position i is its
        argmax after the prompt and ref[:i]. The baseline's predictions are ``ref`` itself when ``ref`` is its own
        greedy output, so this is only called for compiled policies."""
        import specache

        x = torch.tensor([ids], device=self.model.device)
        r = torch.tensor([ref], device=self.model.device)
        # ref was generated with EOS masked (min_new_tokens): masked here too
        return specache.generate(self.model, x, len(ref), suppress_tokens=self._eos(), forced_tokens=r)[0].tolist()

    def _eos(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return [eos] if isinstance(eos, int) else list(eos or [])

    def compression(self, length: int) -> float | None:
        """Full-precision KV bytes at ``length`` / KV bytes specache keeps on the device (None: nothing kept)."""
        if self.name == "baseline":
            return 1.0
        dev = kv_bytes_device(self.model, length)
        return kv_bytes_full(self.model, length) / dev if dev else None

    def prefetch_hit_rate(self) -> float | None:
        """The share of the real steps' top-k positions that the speculative step had prefetched, over every site of
        the current sequence (a new sequence starts the counts afresh); None where nothing was prefetched."""
        return None if self.name == "baseline" else prefetch_hit_rate(self.model)

    def attention_error(self) -> float | None:
        if self.name == "baseline":
            return 0.0
        import specache

        errs = specache.attention_error(self.model)
        return sum(e["mean"] for e in errs.values()) / len(errs) if errs else None


def heatmap(rows: list[dict], policy: str, contexts: list[int], depths: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [[math.nan] * len(contexts) for _ in depths]
    for r in rows:
        if r["task"] == "needle" and r["policy"] == policy:
            grid[depths.index(r["depth"])][contexts.index(r["context"])] = r["score"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(contexts), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"needle accuracy: {policy}")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SIDE_BY_SIDE = ("needle", "passkey", "forced_agreement", "kv_compression")


def policies_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Every policy side by side: needle and passkey accuracy, forced agreement with the full cache, and the KV
    compression on the device (means over depths and trials), one line per policy against the context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(SIDE_BY_SIDE), figsize=(4.2 * len(SIDE_BY_SIDE), 4.2))
    colors = plt.get_cmap("tab20").colors
    for i, pol in enumerate(policies):
        style = {"marker": "o", "label": pol, "color": colors[i % 20], "linestyle": ("-", "--")[i // 10 % 2]}
        for ax, task in zip(axes, SIDE_BY_SIDE):
            cells: dict[int, list[float]] = {}
            for r in rows:
                if r["policy"] != pol:
                    continue
                v = r.get("kv_compression") if task == "kv_compression" else (
                    r["score"] if r["task"] == task else None)
                if v is not None:
                    cells.setdefault(r["context"], []).append(v)
            if cells:
                xs = sorted(cells)
                ax.plot(xs, [sum(cells[x]) / len(cells[x]) for x in xs], **style)
    for ax, task in zip(axes, SIDE_BY_SIDE):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(task.replace("_", " ") + (" (x, full cache / device KV)" if task == "kv_compression" else ""))
        ax.grid(alpha=0.3)
        if task != "kv_compression":
            ax.set_ylim(-0.03, 1.03)
    legend = {}  # every policy once, whichever panel it has a line in (full has no compression figure)
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    axes[-1].legend(legend.values(), legend.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_results(path: Path, shas: list[str] | None, out: Path) -> int:
    """Redraw the side-by-side plot from a results file: the rows of the given commits (default: the newest row's
    commit and device), each policy's newest run."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"specache eval --plot-only: expected rows in {path}, got none; fix: run the eval first")
    shas = shas or [rows[-1]["git_sha"]]
    device = rows[-1]["device"] if len(shas) == 1 and shas[0] == rows[-1]["git_sha"] else None
    picked = [r for r in rows if any(r["git_sha"].startswith(s) for s in shas)
              and (device is None or r["device"] == device)]
    if not picked:
        raise ValueError(f"specache eval --plot-only: expected rows of commit(s) {shas} in {path}, got none; fix: "
                         "pass --plot-sha with a commit the file holds")
    devices = sorted({r["device"] for r in picked})
    title = f"{picked[0].get('model', '')} {', '.join(devices)}, commit {', '.join(s[:7] for s in shas)}"
    policies_plot(picked, out, title)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specache eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny",
                   help="tiny (the shipped model), smollm2-135m, gemma3-270m (specache_compile.models) or a folder")
    p.add_argument("--suite", default="retrieval", choices=["retrieval", "ruler"],
                   help="retrieval: needle, passkey, agreement, attention error; ruler: the RULER-style tasks")
    p.add_argument("--tasks", nargs="+", default=None, help="with --suite ruler: the tasks to run (default: all)")
    # None: not given, so --quick can tell its own defaults from what was asked, however the command was started
    p.add_argument("--policies", nargs="+", default=None, help=f"default: {' '.join(POLICIES)}")
    p.add_argument("--contexts", nargs="+", type=int, default=None, help=f"default: {' '.join(map(str, CONTEXTS))}")
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the needle sits in the context (0: start, 1: end)")
    p.add_argument("--trials", type=int, default=4, help="needle/passkey tasks per cell")
    p.add_argument("--agree-tokens", type=int, default=256, help="tokens compared with the full cache's (agreement)")
    p.add_argument("--topk", type=int, default=None, help="default topk for specache policies")
    p.add_argument("--bits", type=int, default=None, help="low-bit width for specache policies (default: 2)")
    p.add_argument("--group-size", type=int, default=None, help="KIVI group size (default: 64)")
    p.add_argument("--window", type=int, default=None, help="full-precision recent tokens (default: 64)")
    p.add_argument("--inner", default=None, choices=["auto", "inductor", "aot_eager", "eager"],
                   help="inner compiler after specache's pass (eager skips Inductor's compile time)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="the model's dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--out", default=None,
                   help="rows file (default bench/results/accuracy.jsonl; accuracy_real.jsonl: real model or ruler)")
    p.add_argument("--quick", action="store_true", help="small CPU grid; fails unless the full cache finds the needle")
    p.add_argument("--plot-only", action="store_true",
                   help="no runs: every policy side by side from --out's rows (accuracy_policies.png beside it)")
    p.add_argument("--plot-sha", nargs="*", default=None, help="with --plot-only: the commits whose rows to plot")
    args = p.parse_args(argv)
    from .. import models

    real = args.model in models.MODELS
    if args.out is None:
        args.out = str(RESULTS / ("accuracy_real.jsonl" if real or args.suite == "ruler" else "accuracy.jsonl"))
    if args.plot_only:
        out = Path(args.out)
        return plot_results(out, args.plot_sha, out.parent / "accuracy_policies.png")
    if args.suite == "ruler":
        return run_ruler(args)
    if args.quick:
        args.contexts, args.depths, args.trials, args.agree_tokens = [320, 640], [0.1, 0.5, 0.9], 2, 24
        args.policies = args.policies or ["baseline", "specache"]
        args.topk = args.topk or 16
        args.group_size, args.window = args.group_size or 16, args.window or 16
    args.policies, args.contexts = args.policies or list(POLICIES), args.contexts or list(CONTEXTS)

    from rich.console import Console
    from rich.progress import Progress

    from .tasks import needle, passkey

    console = Console()
    base, tok, defaults, env, rows, out, emit = _setup(args)

    def emit_whole(run: Runner, ctx: int, common: dict, task: str, score, **extra) -> None:
        # a row of a task over one context's whole sequence (no depth); kv_compression read as it is emitted
        emit({"bench": "accuracy", "task": task, **common, "depth": None, "kv_compression": run.compression(ctx),
              "score": score, **extra, **env})

    contexts = sorted(args.contexts)
    runners = [Runner(base, spec, args.device, defaults) for spec in args.policies]
    # the full-cache reference for greedy agreement: the baseline runner, or one made for it
    reference = next((r for r in runners if r.name == "baseline"), None) or Runner(base, "baseline", args.device, {})
    agree_ref: dict[int, list[int]] = {}
    n_cells = len(runners) * len(contexts) * (2 * len(args.depths) + 1)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("eval", total=n_cells)
        for run in runners:
            cfg = run.config
            for ctx in contexts:  # ascending, so the device tier's capacity follows the current context
                common = {
                    "policy": run.spec,
                    "context": ctx,
                    "topk": cfg.topk if cfg else None,
                    "bits": cfg.bits if cfg else None,
                }
                for task_name, make in (("needle", needle), ("passkey", passkey)):
                    for depth in args.depths:
                        hits = 0
                        for trial in range(args.trials):
                            seed = zlib.crc32(f"{task_name}/{ctx}/{depth}/{trial}".encode())
                            task = make(tok, ctx, depth, rng=seed)
                            hits += run.generate(task.input_ids, len(task.answer_ids)) == task.answer_ids
                        emit(
                            {
                                "bench": "accuracy",
                                "task": task_name,
                                **common,
                                "depth": depth,
                                "kv_compression": run.compression(ctx),
                                "score": hits / args.trials,
                                "trials": args.trials,
                                **env,
                            }
                        )
                        progress.advance(bar)
                # greedy agreement with the full cache over generated tokens
                prompt = needle(tok, ctx, 0.5, rng=ctx).input_ids
                if ctx not in agree_ref:
                    agree_ref[ctx] = reference.generate(prompt, args.agree_tokens)
                gen = run.generate(prompt, args.agree_tokens) if run is not reference else agree_ref[ctx]
                emit_whole(run, ctx, common, "agreement", _agreement(gen, agree_ref[ctx]), tokens=args.agree_tokens)
                emit_whole(run, ctx, common, "attn_rel_error", run.attention_error())
                # the speculative prefetch's hit rate over the greedy run on trained weights (the decode bench's random
                # weights make attention near uniform, so its top-k, and its hit rate, near random)
                emit_whole(run, ctx, common, "prefetch_hit_rate", run.prefetch_hit_rate(), tokens=args.agree_tokens)
                # next-token agreement along the full cache's tokens, where one early flip does not decide the rest
                # as it does greedy agreement on near-tied continuations (after attn_rel_error: the forced run is a new
                # sequence, which starts the error averages afresh, so before it the row would read its errors)
                forced = run.forced(prompt, agree_ref[ctx]) if run is not reference else agree_ref[ctx]
                emit_whole(run, ctx, common, "forced_agreement", _agreement(forced, agree_ref[ctx]),
                           tokens=args.agree_tokens)
                progress.advance(bar)
            # this policy's heatmap as soon as its grid is done (a cut run keeps the finished ones)
            heatmap(rows, run.spec, contexts, args.depths, out.parent / f"needle_{_slug(run.spec)}.png")
    _summary(console, rows, runners, contexts)
    policies_plot(rows, out.parent / "accuracy_policies.png", f"{env['model']} {env.get('device', '')}")
    console.print(f"{len(rows)} rows -> {out} ({time.perf_counter() - t0:.0f} s)")
    if args.quick:
        base_rows = [r for r in rows if r["task"] == "needle" and r["policy"] == "baseline"]
        acc = sum(r["score"] for r in base_rows) / max(1, len(base_rows))
        if acc < 0.95:
            console.print(f"[red]quick check failed: the full-cache model found the needle in {acc:.0%} of cells")
            return 1
    return 0


def _setup(args):
    """What both suites start from: the model, its tokenizer, the Config defaults of the command line, the fields
    every row carries, and a row emitter that writes each row as soon as its cell is done."""
    sys.path.insert(0, str(REPO))
    from bench.common import env_fields, write_rows

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    base, tok, model_name = load_model(args.model, dtype, args.device)
    defaults = {
        k: v
        for k, v in (("topk", args.topk), ("bits", args.bits), ("group_size", args.group_size), ("window", args.window),
                     ("inner", args.inner))
        if v is not None
    }
    env = {**env_fields(), "model": model_name, "dtype": str(dtype).removeprefix("torch.")}
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        # a run cut short (a time limit) keeps what it measured
        rows.append(row)
        write_rows(out.name, [row]) if out.parent == RESULTS else _append(out, [row])

    return base, tok, defaults, env, rows, out, emit


def run_ruler(args) -> int:
    """The RULER-style suite: every policy x context x task x depth, ``--trials`` seeds per cell."""
    from rich.console import Console
    from rich.progress import Progress

    from . import ruler

    if args.quick:
        # 1K and 2K unless asked for (a grid at matched budgets runs one context per command)
        args.contexts = args.contexts or [1024, 2048]
        args.depths, args.trials = [0.5], 1
        args.policies = args.policies or ["baseline", "specache"]
    args.policies, args.contexts = args.policies or list(POLICIES), args.contexts or list(CONTEXTS)
    names = args.tasks or list(ruler.RULER)
    unknown = [n for n in names if n not in ruler.RULER]
    if unknown:
        raise ValueError(f"specache eval --tasks: expected names of {list(ruler.RULER)}, got {unknown}")
    console = Console()
    base, tok, defaults, env, rows, out, emit = _setup(args)
    template = ruler.prompt_template(tok)
    contexts = sorted(args.contexts)
    # the suite writes no attention-error row, so no exact attention is computed beside every decode step
    runners = [Runner(base, spec, args.device, defaults, measure_error=False) for spec in args.policies]
    cells = [(n, d) for n in names for d in ([None] if n in ruler.DEPTHLESS else args.depths)]
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("ruler", total=len(runners) * len(contexts) * len(cells))
        for run in runners:
            cfg = run.config
            for ctx in contexts:  # ascending, so the device tier's capacity follows the current context
                for name, depth in cells:
                    scores, outputs, t_cell = [], [], time.perf_counter()
                    for trial in range(args.trials):
                        seed = zlib.crc32(f"ruler/{name}/{ctx}/{depth}/{trial}".encode())
                        try:
                            task = ruler.RULER[name](tok, ctx, 0.5 if depth is None else depth, seed,
                                                     template=template)
                        except ValueError as e:  # a length the task cannot be made at: say so in the row
                            emit({"bench": "accuracy", "suite": "ruler", "task": name, "policy": run.spec,
                                  "context": ctx, "depth": depth, "score": None, "error": str(e), **env})
                            break
                        gen = run.generate(task.input_ids, task.max_new_tokens)
                        text = tok.decode(gen, skip_special_tokens=True)
                        scores.append(task.score(text))
                        outputs.append(text)
                    else:
                        emit({"bench": "accuracy", "suite": "ruler", "task": name, "policy": run.spec,
                              "context": ctx, "depth": depth, "topk": cfg.topk if cfg else None,
                              "bits": cfg.bits if cfg else None, "kv_compression": run.compression(ctx),
                              "score": sum(scores) / len(scores), "trials": args.trials,
                              "answers": list(task.answers), "output": outputs[-1][:200],
                              "seconds": round(time.perf_counter() - t_cell, 1), **env})
                    progress.advance(bar)
    _ruler_summary(console, rows, runners, contexts, names)
    console.print(f"{len(rows)} rows -> {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _ruler_summary(console, rows, runners, contexts, names) -> None:
    from rich.table import Table

    table = Table(title="RULER score per context length, tokens (mean over depths and trials); kv x = full-precision "
                        "KV / device KV")
    table.add_column("task")
    table.add_column("policy")
    for c in contexts:
        table.add_column(f"{c} tok", justify="right")
    for name in [*names, "mean", "kv x"]:
        for run in runners:
            cells = []
            for c in contexts:
                mine = [r for r in rows if r["policy"] == run.spec and r["context"] == c and r["score"] is not None]
                if name == "kv x":
                    vals = [r["kv_compression"] for r in mine if r.get("kv_compression") is not None]
                else:
                    vals = [r["score"] for r in mine if name == "mean" or r["task"] == name]
                    if name == "mean":  # the suite average: each task once (its depths averaged first)
                        per = {}
                        for r in mine:
                            per.setdefault(r["task"], []).append(r["score"])
                        vals = [sum(v) / len(v) for v in per.values()]
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
            table.add_row(name, _shown(run.spec), *cells)
    console.print(table)


def _agreement(tokens: list[int], ref: list[int]) -> float:
    """The fraction of positions where ``tokens`` equals the full cache's ``ref``."""
    return sum(a == b for a, b in zip(tokens, ref)) / len(ref)


def _slug(spec: str) -> str:
    """A file-name-safe form of a policy spec: letters, digits, '.', '_' and '-' only."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)


def _append(path: Path, rows: list[dict]) -> None:
    import json

    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _summary(console, rows, runners, contexts) -> None:
    from rich.table import Table

    table = Table(title="accuracy per context length, tokens (mean over depths)")
    table.add_column("task")
    table.add_column("policy")
    for c in contexts:
        table.add_column(f"{c} tok", justify="right")
    for task in ("needle", "passkey", "agreement", "forced_agreement", "attn_rel_error", "prefetch_hit_rate"):
        for run in runners:
            cells = []
            for c in contexts:
                vals = [
                    r["score"]
                    for r in rows
                    if r["task"] == task and r["policy"] == run.spec and r["context"] == c and r["score"] is not None
                ]
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
            table.add_row(task, _shown(run.spec), *cells)
    console.print(table)


def _shown(spec: str) -> str:
    """A policy spec as the tables show it: the unmodified model (rows: "baseline") is the full cache, as the demo
    says; the rows keep their name."""
    return "full cache (unmodified)" if spec == "baseline" else spec


if __name__ == "__main__":
    sys.exit(main())
