"""RULER-style synthetic long-context tasks, generated locally at any length.

The task definitions are those of RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", COLM 2024, arXiv:2404.06654, §3 and Appendix B); the generators, word lists and haystack text
are this project's own:

- retrieval (needle in a haystack, NIAH): a needle "One of the special magic numbers for {key} is: {value}." is
  hidden at ``depth``. :func:`niah_single` over three haystacks: ``"repeat"`` (the repeated "The grass is green..."
  noise), ``"essay"`` (real text: held-out documents of the project's corpus, :func:`corpus_filler`, where RULER uses
  Paul Graham's essays) and ``"needles"`` (the haystack is distractor needles with other keys, RULER's MK-NIAH-2);
  :func:`niah_multikey` (distractor needles among essay text, one key asked), :func:`niah_multivalue` (one key, several
  values, all asked), :func:`niah_multiquery` (several keys, all asked);
- multi-hop tracing: :func:`variable_tracking`, chains ``VAR X = 12345`` -> ``VAR Y = VAR X`` -> ... in noise; the
  answer is every variable that ends up holding the value;
- aggregation: :func:`common_words` (CWE: a numbered word list where a few words appear many times, the rest a few
  times; the answer is the most common ones) and :func:`frequent_words` (FWE: "coded" words drawn from a Zeta
  distribution, the answer is the three most frequent).

Each generator is ``f(tok, length, depth, seed, *, template=None, **options) -> RulerTask``: ``length`` is the
prompt's exact token count (template included); ``depth`` in [0, 1] places the needle (or the first hop) in the
haystack (the aggregation tasks spread over the whole list and ignore it); ``template`` is the (before, after) text
around the prompt (:func:`prompt_template`: the user turn of a chat template, or BOS and a newline), after which the
answer prefix follows, as RULER does. The task's ``score(output)`` is RULER's string_match_all: the fraction of the
expected strings found in the generated text (case-insensitive).

Token ids are built as :mod:`specache_compile.evals.tasks` builds them: whole lines encoded and concatenated, never a
long string re-tokenized.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .tasks import (
    CorpusFiller,
    RepeatFiller,
    _Builder,
    _Chunk,
    _digits,
    _haystack,
    _rng,
    as_encoder,
    build_corpus,
    load_corpus,
    split_documents,
)

__all__ = [
    "DEPTHLESS",
    "HAYSTACKS",
    "RULER",
    "RulerTask",
    "common_words",
    "corpus_filler",
    "frequent_words",
    "niah_multikey",
    "niah_multiquery",
    "niah_multivalue",
    "niah_single",
    "prompt_template",
    "variable_tracking",
]

HAYSTACKS = ("repeat", "essay", "needles")


@dataclass(frozen=True)
class RulerTask:
    """One prompt (``input_ids``, exactly ``length`` tokens, ending right before the answer) and the strings the answer
    must contain; ``score(output)`` is the fraction of them found in ``output`` (RULER's string_match_all)."""

    kind: str
    input_ids: list[int]
    answers: tuple[str, ...]
    max_new_tokens: int
    depth: float | None
    length: int
    _parts: tuple = field(repr=False, compare=False, default=())

    @property
    def prompt(self) -> str:
        return "".join(p if isinstance(p, str) else p[0](p[1]) for p in self._parts)

    def score(self, output: str) -> float:
        out = output.lower()
        return sum(a.lower() in out for a in self.answers) / len(self.answers)


def prompt_template(tok: Any) -> tuple[str, str]:
    """The (before, after) text around the task's prompt: one user turn of ``tok``'s chat template with the generation
    prompt (an instruction model), else the BOS token if the tokenizer adds one (Gemma) and a newline."""
    if not getattr(tok, "chat_template", None):
        bos = getattr(tok, "bos_token", None)
        adds_bos = bos is not None and tok("x").input_ids[:1] == [tok.bos_token_id]
        return (bos if adds_bos else "", "\n")
    mark = "\x00USER\x00"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    before, sep, after = text.partition(mark)
    if not sep:
        raise ValueError(f"prompt_template: expected the chat template to keep the user's text verbatim, got {text!r}")
    return before, after


# ----------------------------------------------------------------------------------------------------------------------
# haystacks
# ----------------------------------------------------------------------------------------------------------------------

_CORPUS_FILLERS: dict[int, CorpusFiller] = {}


def corpus_filler(tok: Any, path: Any = None, max_docs_bytes: int = 3_000_000) -> CorpusFiller:
    """Real text for the ``essay`` haystack: the held-out documents (every 50th, which the shipped tiny model was not
    trained on) of the project's corpus (``.carry/specache-corpus.txt.gz``: Python standard-library sources and their
    docstrings, built on first use as bench/train_tiny.py builds it), tokenized with ``tok`` once per tokenizer."""
    from pathlib import Path

    key = id(tok)
    if key in _CORPUS_FILLERS:
        return _CORPUS_FILLERS[key]
    path = Path(path) if path else Path(__file__).resolve().parents[2] / ".carry" / "specache-corpus.txt.gz"
    if not path.exists():
        build_corpus(path)
    _, held = split_documents(load_corpus(path)[0])
    docs, size = [], 0
    for d in held:
        if size > max_docs_bytes:
            break
        docs.append(d)
        size += len(d)
    enc = as_encoder(tok)
    ids: list[int] = []
    for d in docs:
        lines = d.splitlines(keepends=True)
        for i in range(0, len(lines), 100):  # blocks of lines: a whole file at once trips tokenizers' length warning
            ids += enc._encode("".join(lines[i : i + 100]))
        ids.append(enc.newline_id)  # documents parted by a blank line
    decode = tok.decode if hasattr(tok, "decode") else None
    filler = _CORPUS_FILLERS[key] = CorpusFiller(ids, enc.newline_id, decode)
    return filler


class _NeedleFiller:
    """A haystack of distractor needles (RULER's MK-NIAH-2): the needle template with keys other than ``avoid``."""

    def __init__(self, enc, avoid: set[str], kind: str = "numbers"):
        self.enc, self.avoid, self.kind = enc, avoid, kind

    def take(self, n: int, rng: random.Random) -> _Chunk:
        ids, texts, bounds, chars = [], [], [0], [0]
        seen = set(self.avoid)
        while True:
            key = _key(rng, seen)
            text, line = _needle_line(self.enc, key, _digits(rng, 7), self.kind)
            if len(ids) + len(line) > n:
                break
            seen.add(key)
            ids += line
            texts.append(text)
            bounds.append(len(ids))
            chars.append(chars[-1] + len(text))
        while len(ids) < n:
            ids.append(self.enc.newline_id)
            texts.append("\n")
            bounds.append(len(ids))
            chars.append(chars[-1] + 1)
        return _Chunk(ids, bounds, text="".join(texts), chars=dict(zip(bounds, chars)))


def _filler(enc, tok, haystack: str, filler: Any, avoid: set[str]):
    if haystack == "repeat":
        return RepeatFiller(enc)
    if haystack == "essay":
        return filler if filler is not None else corpus_filler(tok)
    if haystack == "needles":
        return _NeedleFiller(enc, avoid)
    raise ValueError(f"ruler: haystack must be one of {HAYSTACKS}, got {haystack!r}")


# ----------------------------------------------------------------------------------------------------------------------
# words
# ----------------------------------------------------------------------------------------------------------------------

# keys are two words (RULER draws single English words; two give enough distinct keys for a haystack of needles)
_KEY_WORDS = (
    "amber apple arrow aspen atlas autumn badger bamboo basil beacon birch bison blossom bridge bronze cactus canyon "
    "carbon cedar cherry cobalt comet copper coral cotton crane crystal daisy delta desert dolphin dragon eagle "
    "ember falcon fern forest fossil garden garnet ginger glacier granite harbor hazel heron honey horizon indigo "
    "island ivory jasmine jungle kernel kite lagoon lantern lemon lily lotus lunar magnet maple marble meadow "
    "meteor mint monsoon mosaic nectar nickel oak ocean olive onyx orbit orchid otter panda pebble pepper pine"
).split()
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def _key(rng: random.Random, avoid: set[str]) -> str:
    while True:
        key = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"
        if key not in avoid:
            return key


def _pseudo_words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct pronounceable made-up words ("kemato"): RULER's FWE codes its words; CWE here does the same, so
    that no word is more familiar to the model than another."""
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))] = None
    return list(out)


def _needle_line(enc, key: str, value: str, kind: str = "numbers") -> tuple[str, list[int]]:
    prefix = f"One of the special magic {kind} for {key} is: "
    return f"{prefix}{value}.\n", enc.join(prefix, value, ".\n")


# ----------------------------------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------------------------------


def _head_tail(enc, template, head: str, tail: str, answer_prefix: str):
    # no template: a bare prompt, the answer prefix on a line of its own after the question
    before, after = template or ("", "\n")
    head_text = before + head
    tail_text = tail + after + answer_prefix
    return (head_text, enc(before) + enc(head)), (tail_text, enc(tail) + enc(after) + enc(answer_prefix))


def _check(name: str, length: int, depth: float | None) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"{name}: depth must be in [0, 1], got {depth}")
    if length < 1:
        raise ValueError(f"{name}: length must be a positive number of tokens, got {length}")


def _done(kind, out: _Builder, answers, max_new, depth, length) -> RulerTask:
    assert len(out.ids) == length, (kind, len(out.ids), length)
    return RulerTask(kind, out.ids, tuple(answers), max_new, depth, length, tuple(out.parts))


_NIAH_HEAD = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. I will quiz "
              "you about the {kind} afterwards.\n")
_NIAH_ONE = "\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
_NIAH_PREFIX = "The special magic {kind} for {key} mentioned in the provided text are"


def _niah(name, tok, length, depth, seed, *, template, haystack, filler, n_keys, n_values, n_queries):
    """The NIAH family: ``n_keys`` keys with ``n_values`` values each, ``n_queries`` of the keys asked for; the first
    key's first value sits at ``depth``, the other needles at random depths."""
    _check(name, length, depth)
    rng, enc = _rng(seed), as_encoder(tok)
    keys: list[str] = []
    while len(keys) < n_keys:
        keys.append(_key(rng, set(keys)))
    values = {k: [_digits(rng, 7) for _ in range(n_values)] for k in keys}
    facts = []
    for i, k in enumerate(keys):
        for j, v in enumerate(values[k]):
            text, ids = _needle_line(enc, k, v)
            facts.append((depth if i == j == 0 else rng.random(), text, ids))
    asked = keys[:n_queries]
    key_text = asked[0] if n_queries == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    kind = "numbers"
    head, tail = _head_tail(enc, template, _NIAH_HEAD.format(kind=kind), _NIAH_ONE.format(kind=kind, key=key_text),
                            _NIAH_PREFIX.format(kind=kind, key=key_text))
    hay = _filler(enc, tok, haystack, filler, set(keys))
    out, _ = _haystack(name, enc, hay, length, rng, head, facts, tail, [])
    answers = [v for k in asked for v in values[k]]
    return _done(name, out, answers, 4 + 9 * len(answers), depth, length)  # 7 digits, a comma, a space


def niah_single(tok, length: int, depth: float, seed, *, template=None, haystack: str = "repeat",
                filler: Any = None) -> RulerTask:
    """S-NIAH: one needle at ``depth`` in a ``haystack`` of repeated noise, real text, or other needles."""
    return _niah(f"niah_single_{haystack}", tok, length, depth, seed, template=template, haystack=haystack,
                 filler=filler, n_keys=1, n_values=1, n_queries=1)


def niah_multikey(tok, length: int, depth: float, seed, *, template=None, n_keys: int = 4, haystack: str = "essay",
                  filler: Any = None) -> RulerTask:
    """MK-NIAH: ``n_keys`` needles with different keys; the one at ``depth`` is asked for."""
    return _niah("niah_multikey", tok, length, depth, seed, template=template, haystack=haystack, filler=filler,
                 n_keys=n_keys, n_values=1, n_queries=1)


def niah_multivalue(tok, length: int, depth: float, seed, *, template=None, n_values: int = 4,
                    haystack: str = "essay", filler: Any = None) -> RulerTask:
    """MV-NIAH: one key with ``n_values`` values (the first at ``depth``); every value is asked for."""
    return _niah("niah_multivalue", tok, length, depth, seed, template=template, haystack=haystack, filler=filler,
                 n_keys=1, n_values=n_values, n_queries=1)


def niah_multiquery(tok, length: int, depth: float, seed, *, template=None, n_queries: int = 4,
                    haystack: str = "essay", filler: Any = None) -> RulerTask:
    """MQ-NIAH: ``n_queries`` needles with different keys (the first at ``depth``); every key is asked for."""
    return _niah("niah_multiquery", tok, length, depth, seed, template=template, haystack=haystack, filler=filler,
                 n_keys=n_queries, n_values=1, n_queries=n_queries)


_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_VT_TAIL = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
_VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
              "the value {value}, they are:")


def variable_tracking(tok, length: int, depth: float, seed, *, template=None, n_chains: int = 1,
                      n_hops: int = 4) -> RulerTask:
    """VT: ``n_chains`` chains of ``n_hops`` + 1 assignments (``VAR QXKZP = 12345``, then ``VAR MBTRE = VAR QXKZP``
    ...) in repeated noise; the asked chain's first assignment sits at ``depth`` and its hops follow in order up to the
    end; the answer is the asked chain's variables."""
    _check("variable_tracking", length, depth)
    rng, enc = _rng(seed), as_encoder(tok)
    names: list[str] = []
    while len(names) < n_chains * (n_hops + 1):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    facts, first_value = [], ""
    for c in range(n_chains):
        chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
        value = _digits(rng, 5)
        first_value = first_value or value
        # the asked chain (c == 0) climbs from depth to the end; the others at random, in order
        start = depth if c == 0 else rng.random() * 0.5
        for h, var in enumerate(chain):
            at = start + (1 - start) * h / (n_hops + 1)
            text = f"VAR {var} = {value if h == 0 else 'VAR ' + chain[h - 1]}.\n"
            ids = enc.join(f"VAR {var} = ", value, ".\n") if h == 0 else enc(text)
            facts.append((at, text, ids))
    head, tail = _head_tail(enc, template, _VT_HEAD, _VT_TAIL.format(value=first_value),
                            _VT_PREFIX.format(n=n_hops + 1, value=first_value))
    out, _ = _haystack("variable_tracking", enc, RepeatFiller(enc), length, rng, head, facts, tail, [])
    answers = names[: n_hops + 1]
    return _done("variable_tracking", out, answers, 4 * len(answers) + 4, depth, length)


def _fit_list(name, enc, length, head, tail, lines: list[tuple[str, list[int]]]) -> _Builder:
    """head + as many ``lines`` as fit + blank lines up to ``length`` + tail."""
    out = _Builder()
    out.add(*head)
    budget = length - len(head[1]) - len(tail[1])
    used = 0
    for text, ids in lines:
        if used + len(ids) > budget:
            break
        out.add(text, ids)
        used += len(ids)
    if budget < 0:
        raise ValueError(f"{name}: length={length} is too short for the task's fixed text; ask for more")
    out.add("\n" * (budget - used), [enc.newline_id] * (budget - used))
    out.add(*tail)
    return out


_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
             "that appear most often.\n")
_CWE_TAIL = "\nQuestion: What are the {n} most common words in the above list?"
_CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"


def common_words(tok, length: int, depth: float | None = None, seed=0, *, template=None, n_common: int = 10,
                 freq_common: int = 30, freq_uncommon: int = 3) -> RulerTask:
    """CWE: a numbered list where ``n_common`` words appear ``freq_common`` times each and every other word
    ``freq_uncommon`` times, shuffled; the answer is the common words. At short lengths ``freq_common`` shrinks so that
    the common words fill at most half the list (RULER's lengths start at 4K), and ``freq_uncommon`` below it.
    ``depth`` is not used."""
    _check("common_words", length, depth)
    rng, enc = _rng(seed), as_encoder(tok)
    head, tail = _head_tail(enc, template, _CWE_HEAD, _CWE_TAIL.format(n=n_common), _CWE_PREFIX.format(n=n_common))
    budget = length - len(head[1]) - len(tail[1])
    per_entry = len(enc("123. kemato\n"))  # numbering and a made-up word: about the same size for every entry
    entries = budget // per_entry
    freq = min(freq_common, entries // (2 * n_common))
    if freq < 2:
        raise ValueError(f"common_words: length={length} leaves the common words {freq} repeat(s), the others need "
                         "fewer; ask for a longer length or fewer common words")
    freq_uncommon = min(freq_uncommon, freq - 1)
    n_uncommon = (entries - n_common * freq) // freq_uncommon + 1  # one more than fits: the list is cut at the budget
    words = _pseudo_words(rng, n_common + n_uncommon)
    common = words[:n_common]
    seq = [w for w in common for _ in range(freq)] + [w for w in words[n_common:] for _ in range(freq_uncommon)]
    rng.shuffle(seq)
    lines = []
    for i, w in enumerate(seq):
        text = f"{i + 1}. {w}\n"
        lines.append((text, enc(text)))
    out = _fit_list("common_words", enc, length, head, tail, lines)
    return _done("common_words", out, common, 5 * n_common + 4, depth, length)


_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
             "appeared coded words.\n")
_FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
             "frequently appeared words in the above coded text?")
_FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


def frequent_words(tok, length: int, depth: float | None = None, seed=0, *, template=None, alpha: float = 2.0,
                   n_vocab: int = 200, n_top: int = 3) -> RulerTask:
    """FWE: coded words (``n_vocab`` made-up words) with frequencies in proportion to a Zeta distribution of exponent
    ``alpha`` (rank r: r^-alpha), shuffled into lines with '....' between runs; the answer is the ``n_top`` most
    frequent. The counts are the distribution's expectation, rounded, not a sample: the top words never tie.
    ``depth`` is not used."""
    _check("frequent_words", length, depth)
    rng, enc = _rng(seed), as_encoder(tok)
    head, tail = _head_tail(enc, template, _FWE_HEAD, _FWE_TAIL, _FWE_PREFIX)
    budget = length - len(head[1]) - len(tail[1])
    words = _pseudo_words(rng, n_vocab, syllables=2)
    per_word = len(enc(" ".join(words[:50]))) / 50 + 0.3  # '....' every few words
    total = int(1.2 * budget / per_word) + 20  # more than fits: the text is cut at the budget
    weights = [r ** -alpha for r in range(1, n_vocab + 1)]
    scale = total / sum(weights)
    seq = [w for w, p in zip(words, weights) for _ in range(max(1, round(p * scale)))]
    rng.shuffle(seq)
    lines, i = [], 0
    while i < len(seq):
        n = rng.randint(4, 10)
        text = " ".join(seq[i:i + n]) + " ....\n"
        lines.append((text, enc(text)))
        i += n
    out = _fit_list("frequent_words", enc, length, head, tail, lines)
    return _done("frequent_words", out, words[:n_top], 4 * n_top + 4, depth, length)


def _single(haystack: str) -> Callable[..., RulerTask]:
    def make(tok, length, depth, seed, **kw):
        return niah_single(tok, length, depth, seed, haystack=haystack, **kw)

    make.__name__ = f"niah_single_{haystack}"
    return make


# The suite: name -> generator, in RULER's order (retrieval, multi-hop tracing, aggregation).
RULER: dict[str, Callable[..., RulerTask]] = {
    "niah_single_repeat": _single("repeat"),
    "niah_single_essay": _single("essay"),
    "niah_single_needles": _single("needles"),
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}
# Tasks whose answer is spread over the whole context: one row per length, no depth.
DEPTHLESS = frozenset({"common_words", "frequent_words"})
