"""``specache demo``: one question about a long document, answered by the same model twice: with its own full KV
cache, then compiled by specache. The table says what changed: the KV bytes on the device (N x smaller), whether
specache's answer is the full cache's token for token, both answers side by side, and how long each run took.

The model is SmolLM2-135M-Instruct where it is installed (``python3 -m specache_compile.models fetch smollm2-135m``),
else the shipped tiny model (models/specache-tiny), with a line saying so. The document is a ship's log of
``--context`` tokens with one fact hidden in the middle; the question asks for it.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "models" / "specache-tiny"
PREFERRED = "smollm2-135m"

# the ship's log the question is about: readable, made up, the same for every run of one seed and tokenizer
_SHIPS = ("Northwind", "Marigold", "Osprey", "Calypso", "Heron", "Juniper", "Albatross", "Meridian")
_PORTS = ("Lisbon", "Genoa", "Bergen", "Valletta", "Cadiz", "Antwerp", "Tangier", "Palermo", "Marseille", "Porto")
_GOODS = ("olive oil", "salt cod", "wool", "copper wire", "oranges", "timber", "coffee", "linen", "tea", "cork")
_WEATHER = ("The sea was calm.", "A squall came up from the west.", "Fog kept the crew on deck.",
            "The wind held steady.", "Rain fell all afternoon.", "The swell rose after dark.")
_PERSON = "Nora Keller"
# the fact and question in the shipped tiny model's training format (evals.tasks.needle), which SmolLM2 reads as well
_FACT = "The secret code of {who} is {code}.\n"
_QUESTION = "What is the secret code of {who}?"


class DemoError(ValueError):
    """A demo input that cannot run; the message is one line: expected, got, fix."""


@dataclass(frozen=True)
class Prompt:
    ids: torch.Tensor  # [1, n] token ids
    question: str
    expected: str  # the code hidden in the document
    doc_tokens: int


@dataclass
class Run:
    tokens: list[int]
    text: str
    first_s: float  # from the call to the first token: prefill (and for specache the first compile)
    step_ms: float | None  # median time between tokens, past the decode steps that may compile
    total_s: float


def pick_model(name: str | None) -> tuple[str, str | None]:
    """(what to load, a note for the user or None): ``name`` as given, else SmolLM2 when installed, else tiny."""
    from . import models

    if name is not None:
        return name, None
    if models.available(PREFERRED):
        return PREFERRED, None
    return "tiny", (f"{PREFERRED} is not installed, so this runs the shipped 8M-parameter tiny model instead; "
                    f"for the real model: python3 -m specache_compile.models fetch {PREFERRED}")


def check_model(name: str) -> None:
    """Refuse a model that cannot load, before anything slow starts (DemoError with the fix)."""
    from . import models

    if name in models.MODELS:
        if not models.available(name):
            raise DemoError(f"--model {name}: expected it installed, got not installed; fix: python3 -m "
                            f"specache_compile.models fetch {name}")
        return
    folder = TINY if name == "tiny" else Path(name)
    if not (folder / "config.json").is_file():
        what = "no such folder" if not folder.exists() else "a folder without config.json"
        fix = ("use a checkout of the repository (it ships models/specache-tiny)" if name == "tiny" else
               "pass a folder that from_pretrained reads, or tiny")
        raise DemoError(f"--model: expected tiny, one of {sorted(models.MODELS)} or a transformers model folder "
                        f"(with config.json), got {name!r} ({what}); fix: {fix}")


def _models():
    from . import models

    return models


def load(name: str, dtype: torch.dtype, device: str) -> tuple[Any, Any, str]:
    """(model in eval mode on ``device``, tokenizer, a description)."""
    from transformers.utils import logging as hf_logging

    from . import models

    hf_logging.disable_progress_bar()  # the demo's own progress display stands for the loading bars

    if name in models.MODELS:
        model, tok = models.load(name, dtype=dtype, device=device)
        return model, tok, models.MODELS[name].about
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = TINY if name == "tiny" else Path(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    about = ("specache-tiny, the project's own 8M-parameter Llama (6 layers, 6 query / 2 KV heads of 64)"
             if name == "tiny" else str(folder))
    return model.eval().to(device), AutoTokenizer.from_pretrained(folder), about


def document_prompt(tok: Any, context: int, seed: int = 0) -> Prompt:
    """A ship's log of about ``context`` tokens with one fact in the middle, and the question that asks for it: in
    the chat template where the tokenizer has one, else as plain text ending where the answer starts."""
    rng = random.Random(seed)
    code = f"{rng.randrange(10_000, 100_000)}"

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    # lines encoded one by one and concatenated: a long string re-tokenized can merge across line ends
    lines, ids, day = [], [], 1
    while True:
        line = (f"Day {day}: the {rng.choice(_SHIPS)} left {rng.choice(_PORTS)} with {rng.randint(20, 900)} crates "
                f"of {rng.choice(_GOODS)}. {rng.choice(_WEATHER)}\n")
        line_ids = enc(line)
        if ids and len(ids) + len(line_ids) > context:
            break
        lines.append((line, line_ids))
        ids += line_ids
        day += 1
    fact = _FACT.format(who=_PERSON, code=code)
    lines.insert(len(lines) // 2, (fact, enc(fact)))
    question = _QUESTION.format(who=_PERSON)
    doc = "".join(text for text, _ in lines)
    if getattr(tok, "chat_template", None):
        content = f"{doc}\nAnswer from the ship's log above: {question[0].lower()}{question[1:]}"
        out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    else:
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("x").input_ids[:1] == [tok.bos_token_id] \
            else []
        tail = f"\nQuestion: {question}\nAnswer: The secret code of {_PERSON} is "
        out = bos + [i for _, line_ids in lines for i in line_ids] + enc(tail)
    return Prompt(torch.tensor([out]), question, code, sum(len(i) for _, i in lines))


def generate(model, ids: torch.Tensor, n: int, tok: Any, on_token=None) -> Run:
    """Greedy ``model.generate`` of up to ``n`` tokens, timed per token by a logits processor (called once per step,
    after the step's forward); ``on_token()`` after each."""
    from transformers import LogitsProcessor, LogitsProcessorList

    marks: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            if on_token is not None:
                on_token()
            return scores

    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, logits_processor=LogitsProcessorList([Clock()]),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    total = time.perf_counter() - t0
    # the first two decode steps may compile (a static graph, then a dynamic one once the length changes again)
    steps = [b - a for a, b in zip(marks, marks[1:])]  # decode step k ends at marks[k]
    steps = steps[2:] if len(steps) > 3 else steps[1:]
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True).strip()
    return Run(new, text, marks[0] - t0 if marks else total, 1e3 * statistics.median(steps) if steps else None, total)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    """The demo: ``args`` as parsed by ``specache demo`` (cli.py). Raises DemoError for input that cannot run."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import specache

    from .evals.harness import kv_bytes_device, kv_bytes_full

    console = Console()
    name, note = pick_model(args.model)
    check_model(name)
    if name not in _models().MODELS:  # a folder: its config says the limit before the weights load
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(TINY if name == "tiny" else Path(name))
        _check_fits(name, getattr(config, "max_position_embeddings", None), args.context, args.new_tokens)
    if note:
        console.print(f"[yellow]note[/]: {note}")
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        step = progress.add_task(f"loading {name} (a first load of a PyPI model converts it once: 30-90 s)", total=1)
        model, tok, about = load(name, getattr(torch, args.dtype), args.device)
        progress.advance(step)
        limit = getattr(model.config, "max_position_embeddings", None)
        _check_fits(name, limit, args.context, args.new_tokens)  # before building a document that long
        prompt = document_prompt(tok, args.context)
        total_len = prompt.ids.shape[1] + args.new_tokens
        _check_fits(name, limit, total_len - args.new_tokens, args.new_tokens)  # with the question and template
        ids = prompt.ids.to(args.device)
        console.print(f"[bold]specache demo[/]: {about}, on {args.device}")
        console.print(f"document: a ship's log of {prompt.doc_tokens} tokens ({ids.shape[1]} with the question), "
                      f"one fact hidden in the middle")
        console.print(f"question: {prompt.question}  (the answer in the document: {prompt.expected})")
        full = None
        if args.compare:
            bar = progress.add_task("full cache: reading the document, then answering", total=args.new_tokens)
            full = generate(model, ids, args.new_tokens, tok, lambda: progress.advance(bar))
            progress.update(bar, total=len(full.tokens), completed=len(full.tokens))
        overrides = {"policy": args.policy, "max_seq_len": total_len}  # host buffers allocated once, at their size
        if args.topk is not None:
            overrides["topk"] = args.topk
        specache.compile(model, **overrides)
        bar = progress.add_task("specache: compiling, reading the document, then answering", total=args.new_tokens)
        ours = generate(model, ids, args.new_tokens, tok, lambda: progress.advance(bar))
        progress.update(bar, total=len(ours.tokens), completed=len(ours.tokens))
    st = specache.stats(model)
    console.print(_table(args, full, ours, st, kv_bytes_full(model, total_len), kv_bytes_device(model, total_len),
                         prompt))
    on_cuda = args.device.startswith("cuda")
    if not on_cuda:
        console.print("On CPU the device and the host are the same memory: the KV line is what would stay on a GPU "
                      "(--device cuda). specache's kernels run here as their pure-torch references, so its times say "
                      "nothing about a GPU (the README's table does).")
    console.print(f"attention layers: {st['found']} found, {st['rewritten']} rewritten by specache, "
                  f"{st['skipped']} left alone")
    return 0


def _check_fits(name: str, limit: int | None, prompt_len: int, new_tokens: int) -> None:
    if limit and prompt_len + new_tokens > limit:
        raise DemoError(f"--context: expected a prompt that fits {name}'s {limit} positions with --new-tokens "
                        f"{new_tokens}, got {prompt_len + new_tokens}; fix: --context {limit - new_tokens - 128} or "
                        "less")


def _table(args, full: Run | None, ours: Run, st: dict, full_bytes: int, dev: int, prompt: Prompt):
    """``dev``: specache's device KV bytes, the model's own cache of any attention left alone included."""
    from rich.table import Table

    label = "specache" if args.policy == "specache" else f"specache ({args.policy})"
    vs = f"full KV cache vs {label}" if full is not None else label
    table = Table(title=f"the same model and {prompt.ids.shape[1]}-token prompt: {vs}")
    table.add_column("")
    if full is not None:
        table.add_column("full cache", justify="right")
    table.add_column(label, justify="right")

    def row(what: str, mine: str, theirs: str) -> None:
        table.add_row(what, *([theirs] if full is not None else []), mine)

    where = "GPU" if args.device.startswith("cuda") else "device (CPU)"
    smaller = (f", {full_bytes / dev:.1f}x smaller" + ("" if full is not None else " than the full cache")) if dev \
        else ""
    row(f"KV cache on the {where}", _fmt_bytes(dev) + smaller, _fmt_bytes(full_bytes))
    row("KV cache in host memory", _fmt_bytes(st["bytes"]["host"]), "none")
    row("answer", ours.text or "(nothing)", (full.text or "(nothing)") if full else "")
    expected = prompt.expected

    def found(r: Run) -> str:
        return "yes" if expected in r.text else "no"

    row(f"answer has the code {expected}", found(ours), found(full) if full else "")
    if full is not None:
        same = sum(a == b for a, b in zip(ours.tokens, full.tokens))
        row("tokens equal to the full cache's", f"{same}/{len(full.tokens)}", "(the reference)")
    row("first token (prefill)", f"{ours.first_s:.1f} s, compiling included", f"{full.first_s:.1f} s" if full else "")
    ms = (lambda r: "-" if r.step_ms is None else f"{r.step_ms:.0f} ms")
    row("each token after (median)", ms(ours), ms(full) if full else "")
    row("whole run", f"{ours.total_s:.1f} s", f"{full.total_s:.1f} s" if full else "")
    return table
