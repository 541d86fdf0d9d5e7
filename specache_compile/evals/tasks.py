"""Long-context retrieval tasks, and the real-text corpus that fills their haystacks.

Three generators, each ``f(tok, context_len, depth, rng, **options) -> Task``:

- :func:`needle`: a fact ("The secret code of Ada Moreno is 48213.") hidden at ``depth`` in filler text, with
  optional distractor facts about other people, and a question about it at the end.
- :func:`passkey`: the classic pass-key retrieval of Mohtashami & Jaggi (2023): "The pass key is 71432. Remember it."
  hidden in repeated filler ("The grass is green. The sky is blue. ...").
- :func:`kv_recall`: multi-key associative recall: a dense list of ``key: value`` lines, then one key is asked for.

A :class:`Task` holds ``input_ids`` that end right before the answer and ``answer_ids`` (the answer's digits), with
``len(input_ids) + len(answer_ids) == context_len`` exactly, and the index of the answer's occurrence in the context.
Everything is drawn from a seeded ``random.Random``: the same seed gives the same task.

Token ids are built by concatenating the encodings of whole lines ("segments" that end in a newline), so the
generators never re-tokenize a long string. With a tokenizer whose pre-tokenizer isolates "\\n" (the one
``bench/train_tiny.py`` trains) or any byte-level encoder, ``encode(task.text) == task.input_ids``.

Filler comes from a :class:`RepeatFiller` (fixed sentences, the default) or a :class:`CorpusFiller` over the
corpus file written by :func:`build_corpus`: Python standard-library sources and docs of the machine that built it,
gathered in path order and recorded with a sha256, so training and evaluation read one file, never the live
filesystem.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DOC_SEP",
    "TASKS",
    "CorpusFiller",
    "Encoder",
    "RepeatFiller",
    "Task",
    "build_corpus",
    "kv_recall",
    "load_corpus",
    "needle",
    "passkey",
    "split_documents",
]

# The document separator of the corpus file. The tokenizer trained on the corpus makes it a special token (its EOS).
DOC_SEP = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------------------

# What counts as text under the stdlib folder: sources and docs. Test data (decTest, .xml, .json) is left out: it is
# mostly numbers and markup that would teach the model little and crowd out prose and code.
_TEXT_SUFFIXES = (".py", ".txt", ".rst", ".md")
# Folders under stdlib that are not the standard library's text: installed packages, build config, compiled code.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}
_MAX_FILE_BYTES = 2_000_000  # a few generated tables are larger; they are data, not text
_MAX_LINE_CHARS = 1000  # minified or embedded-data files have longer lines
# Control characters other than \t \n \f (and \r, normalized away) mark binary-ish or escape-heavy files.
_BAD_CONTROL = {chr(c) for c in range(32) if chr(c) not in "\t\n\f"} | {"\x7f"}


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _text_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into installed packages (GBs of torch under site-packages).
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(_TEXT_SUFFIXES))
    # Sort by the path relative to root (as a POSIX string): independent of where Python is installed.
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _clean_text(raw: bytes) -> str | None:
    """The file's text with \\n line ends, or None if it is not clean UTF-8 text."""
    if len(raw) > _MAX_FILE_BYTES or not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if DOC_SEP in text or any(c in _BAD_CONTROL for c in set(text)):
        return None
    if max(len(line) for line in text.split("\n")) > _MAX_LINE_CHARS:
        return None
    return text if text.endswith("\n") else text + "\n"


def build_corpus(
    out_path: str | os.PathLike, max_bytes: int = 64_000_000, root: str | os.PathLike | None = None
) -> dict:
    """Gather the text files under the stdlib folder (or ``root``) into one corpus file; return its manifest.

    Files are taken in path order until ``max_bytes`` of text is reached; documents are separated by a line holding
    :data:`DOC_SEP`. A path ending in ``.gz`` is written gzip-compressed with a zero timestamp, so the same text gives
    the same bytes. The manifest (sha256 of the UTF-8 text, sizes, file count, Python version) is returned and
    written next to the corpus as ``<out_path>.json``; :func:`load_corpus` checks the text against it.
    """
    root = Path(root) if root is not None else _stdlib_root()
    if not root.is_dir():
        raise ValueError(f"build_corpus: root must be a folder, got {str(root)!r}; pass root= or leave it None")
    docs, n_bytes, n_skipped = [], 0, 0
    for path in _text_files(root):
        text = _clean_text(path.read_bytes())
        if text is None:
            n_skipped += 1
            continue
        size = len(text.encode("utf-8")) + len(DOC_SEP) + 1
        if n_bytes + size > max_bytes:
            break
        docs.append(text + DOC_SEP + "\n")
        n_bytes += size
    if not docs:
        raise ValueError(f"build_corpus: no text files found under {str(root)!r} within max_bytes={max_bytes}")
    data = "".join(docs).encode("utf-8")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    if out_path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            gz.write(data)
        tmp.write_bytes(buf.getvalue())
    else:
        tmp.write_bytes(data)
    os.replace(tmp, out_path)  # atomic: a killed build never leaves a truncated corpus behind
    manifest = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "text_bytes": len(data),
        "file_bytes": out_path.stat().st_size,
        "n_documents": len(docs),
        "n_skipped_files": n_skipped,
        "source": "python stdlib text files (" + ", ".join(_TEXT_SUFFIXES) + ") in path order",
        "python": sys.version.split()[0],
        "max_bytes": max_bytes,
    }
    Path(str(out_path) + ".json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_corpus(path: str | os.PathLike, expect_sha256: str | None = None) -> tuple[str, str]:
    """The corpus text and its sha256. Checks it against ``expect_sha256`` or, if absent, the ``.json`` manifest."""
    path = Path(path)
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    digest = hashlib.sha256(data).hexdigest()
    manifest = Path(str(path) + ".json")
    if expect_sha256 is None and manifest.exists():
        expect_sha256 = json.loads(manifest.read_text())["sha256"]
    if expect_sha256 is not None and digest != expect_sha256:
        raise ValueError(
            f"load_corpus: {str(path)!r} has sha256 {digest}, expected {expect_sha256}; rebuild it with build_corpus "
            "or carry the original file"
        )
    return data.decode("utf-8"), digest


def split_documents(text: str, heldout_every: int = 50) -> tuple[list[str], list[str]]:
    """Split corpus text into (train, held-out) documents: every ``heldout_every``-th document (at least one) is held
    out."""
    docs = [d.lstrip("\n") for d in text.split(DOC_SEP)]
    docs = [d for d in docs if d.strip()]
    held = {i for i in range(len(docs)) if i % heldout_every == heldout_every - 1} or {len(docs) - 1}  # never empty
    if len(held) == len(docs):
        raise ValueError(f"split_documents: need at least 2 documents, got {len(docs)}")
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# ----------------------------------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------------------------------


class Encoder:
    """``str -> list[int]`` from a tokenizers.Tokenizer, a transformers tokenizer or a plain function, with a cache.

    Generators encode the same short strings (filler sentences, templates, names) over and over; the cache makes
    that free. No special tokens are added.
    """

    def __init__(self, tok: Any, cache_size: int = 1 << 16):
        if isinstance(tok, Encoder):
            tok = tok.tok
        self.tok = tok
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        if hasattr(tok, "encode"):
            self._encode = self._encode_method
        elif callable(tok):
            self._encode = lambda s: list(tok(s))
        else:
            raise ValueError(
                f"Encoder: expected a tokenizer with .encode or a function str -> ids, got {type(tok).__name__}"
            )
        self.memo: dict[str, Any] = {}  # per-tokenizer constants of the generators
        nl = self("\n")
        if len(nl) != 1:
            raise ValueError(f"Encoder: '\\n' must be one token (fillers pad with it), got {nl}; use a byte-level BPE")
        self.newline_id = nl[0]
        # Fast path for numbers: with digits split one per token (the trained tokenizer, byte-level encoders),
        # "prefix 48213.\n" encodes as prefix + one token per digit + suffix, so only the short pieces need the
        # tokenizer and their encodings are cached. Checked here, not assumed.
        probe = ("The code of Ada Moreno is ", "9081726354", ".\n")
        self.digits_isolated = self("".join(probe)) == self._encode(probe[0]) + [
            i for c in probe[1] for i in self._encode(c)
        ] + self._encode(probe[2])

    def join(self, prefix: str, number: str, suffix: str = "") -> list[int]:
        """ids of ``prefix + number + suffix`` (``number``: decimal digits)."""
        if not self.digits_isolated:
            return self(prefix + number + suffix)
        return self(prefix) + [i for c in number for i in self(c)] + (self(suffix) if suffix else [])

    def _encode_method(self, s: str) -> list[int]:
        out = self.tok.encode(s, add_special_tokens=False)
        return list(out.ids) if hasattr(out, "ids") else list(out)

    def __call__(self, s: str) -> list[int]:
        ids = self._cache.get(s)
        if ids is None:
            ids = self._encode(s)
            if len(self._cache) < self._cache_size:
                self._cache[s] = ids
        return ids


_ENCODERS: dict[int, Encoder] = {}


def as_encoder(tok: Any) -> Encoder:
    """``tok`` itself if it is an :class:`Encoder`, else one Encoder per tokenizer object (so its cache is reused)."""
    if isinstance(tok, Encoder):
        return tok
    enc = _ENCODERS.get(id(tok))
    if enc is None or enc.tok is not tok:  # the Encoder holds tok, so a live entry's id cannot be reused
        if len(_ENCODERS) > 64:
            _ENCODERS.clear()
        enc = _ENCODERS[id(tok)] = Encoder(tok)
    return enc


def _rng(rng: random.Random | int) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int):
        return random.Random(rng)
    raise ValueError(f"expected a random.Random or an int seed, got {type(rng).__name__}")


def _check_args(name: str, context_len: int, depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{name}: depth must be in [0, 1], got {depth}")
    if context_len < 1:
        raise ValueError(f"{name}: context_len must be a positive number of tokens, got {context_len}")


# ----------------------------------------------------------------------------------------------------------------------
# fillers
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Filler of an exact token count: ids, the offsets where lines start (0 and len(ids) included), and its text:
    ``text`` with the character offset of each bound in ``chars``, or ``decode`` (ids -> text) to make it later."""

    ids: list[int]
    bounds: list[int]
    text: str | None = None
    chars: dict[int, int] | None = None
    decode: Callable[[list[int]], str] | None = None

    def part(self, a: int, b: int) -> str | tuple:
        """ids[a:b] as a prompt part: its text, or (decode, ids) for a text decoded only if asked for."""
        if self.text is not None:
            return self.text[self.chars[a] : self.chars[b]]
        return (self.decode, self.ids[a:b])


# The classic pass-key haystack (Mohtashami & Jaggi 2023, "Landmark Attention", Appendix; reused by LongLoRA et al.).
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
_CLASSIC_SHORT = ("The grass is green.\n", "The sky is blue.\n", "The sun is yellow.\n", "Here we go.\n")


class RepeatFiller:
    """Filler made of fixed lines repeated; remainders are closed with shorter lines, then blank lines."""

    def __init__(self, tok: Any, unit: str = CLASSIC_FILLER, short_units: Sequence[str] = _CLASSIC_SHORT):
        self.enc = as_encoder(tok)
        for u in (unit, *short_units):
            if not u.endswith("\n"):
                raise ValueError(f"RepeatFiller: each unit must end in a newline, got {u!r}")
        self.unit = (unit, self.enc(unit))
        self.short = sorted(((u, self.enc(u)) for u in short_units), key=lambda x: -len(x[1]))

    def take(self, n: int, rng: random.Random) -> _Chunk:
        ids: list[int] = []
        texts: list[str] = []
        bounds, chars = [0], [0]

        def add(text: str, unit_ids: list[int]) -> None:
            ids.extend(unit_ids)
            texts.append(text)
            bounds.append(len(ids))
            chars.append(chars[-1] + len(text))

        text, unit_ids = self.unit
        while len(ids) + len(unit_ids) <= n:
            add(text, unit_ids)
        for text_s, ids_s in self.short:
            while len(ids) + len(ids_s) <= n:
                add(text_s, ids_s)
        while len(ids) < n:
            add("\n", [self.enc.newline_id])
        return _Chunk(ids, bounds, text="".join(texts), chars=dict(zip(bounds, chars)))


class CorpusFiller:
    """Filler cut from a tokenized corpus at line starts; document separators are turned into blank lines.

    ``ids``: the corpus token ids (a 1-D torch tensor or a list), tokenized so that every "\\n" is its own token.
    ``decode``: ids -> text (``tokenizer.decode``). A chunk of n tokens is the longest run of whole lines that fits,
    starting at a random line, closed with blank lines up to exactly n.
    """

    def __init__(self, ids: Any, newline_id: int, decode: Callable[[list[int]], str], sep_id: int | None = None):
        import torch  # the training script and the eval harness have torch; the generators alone do not need it

        ids = torch.as_tensor(ids, dtype=torch.int32).flatten()
        if sep_id is not None:
            ids = torch.where(ids == sep_id, torch.tensor(newline_id, dtype=torch.int32), ids)
        self.ids = ids.contiguous()
        self.newline_id = newline_id
        self.decode = decode
        is_nl = self.ids == newline_id
        # starts[i]: offsets that begin a line (0, and every offset right after a newline).
        self.starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.nonzero(is_nl).flatten() + 1])
        if self.starts[-1] != len(self.ids):
            self.starts = torch.cat([self.starts, torch.tensor([len(self.ids)])])
        if len(self.starts) < 3:
            raise ValueError(f"CorpusFiller: the corpus needs several lines, got {len(self.ids)} tokens")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any) -> CorpusFiller:
        """Tokenize corpus text (documents separated by :data:`DOC_SEP`) with a ``tokenizers.Tokenizer``."""
        docs = [d for d in text.split(DOC_SEP) if d.strip()]
        ids: list[int] = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
        nl = tokenizer.encode("\n", add_special_tokens=False).ids
        if len(nl) != 1:
            raise ValueError(f"CorpusFiller: '\\n' must be one token, got {nl}")
        return cls(ids, nl[0], tokenizer.decode)

    def take(self, n: int, rng: random.Random) -> _Chunk:
        import torch

        total = len(self.ids)
        # Start at a line start that leaves n tokens of corpus after it (wrapping is not needed: corpora are large).
        last = int(torch.searchsorted(self.starts, total - n, right=True)) - 1
        s = int(self.starts[rng.randrange(max(last, 0) + 1)])
        lo = int(torch.searchsorted(self.starts, s))
        hi = int(torch.searchsorted(self.starts, s + n, right=True))
        line_starts = self.starts[lo:hi]
        e = int(line_starts[-1])
        ids = self.ids[s:e].tolist()
        pad = n - len(ids)
        ids.extend([self.newline_id] * pad)
        bounds = (line_starts - s).tolist() + list(range(e - s + 1, n + 1))
        return _Chunk(ids, bounds, decode=self.decode)


# ----------------------------------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One retrieval problem. ``input_ids`` end right before the answer; the model should continue with ``answer_ids``.

    ``answer_pos``: index in ``input_ids`` where the answer's tokens appear in the context (the fact itself), so
    ``input_ids[answer_pos : answer_pos + len(answer_ids)] == answer_ids``. ``depth``: the requested depth;
    ``answer_pos / context_len`` is the achieved one (facts sit at line starts, so they differ by up to a line).
    ``spans``: (start, length) of other tokens in ``input_ids`` that earlier context determines, a copy to make:
    the pass key's second mention, the answers of the questions asked before the last (``n_queries > 1``). Training
    supervises them too (more retrieval signal per row); an evaluation scores ``answer_ids``.
    """

    kind: str
    input_ids: list[int]
    answer_ids: list[int]
    answer: str
    answer_pos: int
    depth: float
    context_len: int
    spans: tuple[tuple[int, int], ...] = ()
    _parts: tuple = field(repr=False, compare=False, default=())

    @property
    def text(self) -> str:
        """The prompt text (decoded lazily: training never needs it)."""
        return "".join(p if isinstance(p, str) else p[0](p[1]) for p in self._parts)

    @property
    def full_ids(self) -> list[int]:
        return self.input_ids + self.answer_ids


class _Builder:
    """Concatenates segments (text + ids) into a prompt, remembering where each segment starts."""

    def __init__(self):
        self.ids: list[int] = []
        self.parts: list[Any] = []

    def add(self, text: str, ids: list[int]) -> int:
        at = len(self.ids)
        self.ids.extend(ids)
        self.parts.append(text)
        return at

    def add_filler(self, chunk: _Chunk, a: int, b: int) -> None:
        if b > a:
            self.ids.extend(chunk.ids[a:b])
            self.parts.append(chunk.part(a, b))


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))  # n digits, no leading zero


def _haystack(
    name: str,
    enc: Encoder,
    filler: Any,
    context_len: int,
    rng: random.Random,
    head: tuple[str, list[int]] | None,
    facts: list[tuple[float, str, list[int]]],
    tail: tuple[str, list[int]],
    answer_ids: list[int],
) -> tuple[_Builder, list[int]]:
    """head + filler with ``facts`` (depth, text, ids) inserted at line starts + tail; returns the fact positions."""
    fixed = (len(head[1]) if head else 0) + sum(len(f[2]) for f in facts) + len(tail[1]) + len(answer_ids)
    n_fill = context_len - fixed
    if n_fill < 0:
        raise ValueError(
            f"{name}: context_len={context_len} is too short for the task's fixed text ({fixed} tokens); "
            f"ask for at least {fixed}"
        )
    chunk = filler.take(n_fill, rng)
    assert len(chunk.ids) == n_fill, (len(chunk.ids), n_fill)
    # Each fact goes to the line start nearest its depth in the filler (ties: the earlier line).
    cuts = []
    for depth, _, _ in facts:
        target = depth * n_fill
        i = bisect.bisect_left(chunk.bounds, target)
        cands = [chunk.bounds[j] for j in (i - 1, i) if 0 <= j < len(chunk.bounds)]
        cuts.append(min(cands, key=lambda b: (abs(b - target), b)))
    order = sorted(range(len(facts)), key=lambda k: (cuts[k], k))
    out = _Builder()
    if head:
        out.add(*head)
    pos = [0] * len(facts)
    prev = 0
    for k in order:
        out.add_filler(chunk, prev, cuts[k])
        prev = cuts[k]
        pos[k] = out.add(facts[k][1], facts[k][2])
    out.add_filler(chunk, prev, n_fill)
    out.add(*tail)
    return out, pos


_FIRST = (
    "Ada Alan Alice Amara Anton Aria Bruno Carla Cedric Clara Dario Diana Edgar Elena Emil Erin Felix Fiona Gael "
    "Greta Hugo Ines Ivan Iris Jonas Julia Karim Kira Lars Lena Luca Maya Milo Nadia Nico Nora Omar Olga Pablo Petra "
    "Quinn Rosa Ruben Sara Soren Tara Theo Uma Victor Vera Walter Wendy Xavier Yara Yusuf Zoe"
).split()
_LAST = (
    "Abbott Baker Becker Castro Chen Costa Dalton Diaz Eriksen Evans Fischer Flores Garcia Gomez Hansen Hughes "
    "Ibrahim Ito Jansen Jones Kato Keller Kim Larsen Lopez Meyer Moreno Nakamura Novak Olsen Ortiz Patel Perez "
    "Quinn Rossi Santos Schmidt Silva Suzuki Tanaka Torres Vargas Weber Wong Young Zimmer"
).split()
_ATTRIBUTES = ("secret code", "access code", "badge number", "locker number", "account number", "room number")
_WORDS = (
    "amber apple arrow aspen atlas autumn badger bamboo basil beacon birch bison blossom bridge bronze cactus canyon "
    "carbon cedar cherry cobalt comet copper coral cotton crane crystal daisy delta desert dolphin dragon eagle "
    "ember falcon fern forest fossil garden garnet ginger glacier granite harbor hazel heron honey horizon indigo "
    "island ivory jasmine jungle kernel kite lagoon lantern lemon lily lotus lunar magnet maple marble meadow "
    "meteor mint monsoon mosaic nectar nickel oak ocean olive onyx orbit orchid otter panda pebble pepper pine "
    "planet plum polar poppy prairie quartz rabbit raven reef river robin ruby saffron salmon sapphire shadow "
    "silver spruce squirrel storm summit sunset thunder tiger timber topaz tulip valley velvet violet walnut "
    "willow winter wolf zephyr"
).split()


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def needle(
    tok: Any,
    context_len: int,
    depth: float,
    rng: random.Random | int,
    *,
    filler: Any = None,
    n_digits: int = 5,
    n_distractors: int = 0,
    n_queries: int = 1,
) -> Task:
    """A fact about one person hidden at ``depth`` in filler, asked for at the end; answer: its digits.

    ``n_distractors`` other facts (other people, same or other attributes) are spread at random depths, so the
    model has to match the name and attribute, not just copy the digits after "is". With ``n_queries`` > 1, that
    many minus one distractors are asked about (and answered) first, in the same format: see :attr:`Task.spans`.
    """
    _check_args("needle", context_len, depth)
    if not 1 <= n_queries <= 1 + n_distractors:
        raise ValueError(f"needle: n_queries must be in [1, 1 + n_distractors], got {n_queries}; add distractors")
    rng, enc = _rng(rng), as_encoder(tok)
    filler = filler if filler is not None else RepeatFiller(enc)
    names = set()
    while len(names) < 1 + n_distractors:
        names.add(_name(rng))
    names = sorted(names)
    rng.shuffle(names)
    attr = rng.choice(_ATTRIBUTES)
    code = _digits(rng, n_digits)
    prefix = f"The {attr} of {names[0]} is "
    facts = [(depth, f"{prefix}{code}.\n", enc.join(prefix, code, ".\n"))]
    others = []
    for other in names[1:]:
        other_attr, value = rng.choice(_ATTRIBUTES), _digits(rng, n_digits)
        p = f"The {other_attr} of {other} is "
        facts.append((rng.random(), f"{p}{value}.\n", enc.join(p, value, ".\n")))
        others.append((other_attr, other, value))
    # Earlier questions (answered), then the one whose answer is the task's.
    tail_text, tail_ids, tail_spans = "", [], []
    for other_attr, other, value in rng.sample(others, n_queries - 1):
        q = f"\nQuestion: What is the {other_attr} of {other}?\nAnswer: The {other_attr} of {other} is "
        tail_spans.append((len(tail_ids) + len(enc(q)), len(enc.join("", value))))
        tail_text += f"{q}{value}.\n"
        tail_ids += enc.join(q, value, ".\n")
    question = f"\nQuestion: What is the {attr} of {names[0]}?\nAnswer: The {attr} of {names[0]} is "
    tail_text, tail_ids = tail_text + question, tail_ids + enc(question)
    answer_ids = enc.join("", code)
    out, pos = _haystack("needle", enc, filler, context_len, rng, None, facts, (tail_text, tail_ids), answer_ids)
    answer_pos = pos[0] + len(enc(prefix))
    tail_at = len(out.ids) - len(tail_ids)
    spans = [(tail_at + a, n) for a, n in tail_spans]
    return _task("needle", out, answer_ids, code, answer_pos, depth, context_len, spans)


_PASSKEY_HEAD = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)


def passkey(
    tok: Any,
    context_len: int,
    depth: float,
    rng: random.Random | int,
    *,
    filler: Any = None,
    n_digits: int = 5,
) -> Task:
    """Classic pass-key retrieval: "The pass key is 71432. Remember it." at ``depth`` in repeated filler."""
    _check_args("passkey", context_len, depth)
    rng, enc = _rng(rng), as_encoder(tok)
    filler = filler if filler is not None else RepeatFiller(enc)
    key = _digits(rng, n_digits)
    fact = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    fact_ids = enc.join("The pass key is ", key, ". Remember it. ") + enc.join("", key, " is the pass key.\n")
    question = "What is the pass key? The pass key is "
    answer_ids = enc.join("", key)
    out, pos = _haystack(
        "passkey",
        enc,
        filler,
        context_len,
        rng,
        (_PASSKEY_HEAD, enc(_PASSKEY_HEAD)),
        [(depth, fact, fact_ids)],
        (question, enc(question)),
        answer_ids,
    )
    answer_pos = pos[0] + len(enc("The pass key is "))
    second = pos[0] + len(enc.join("The pass key is ", key, ". Remember it. "))  # the key's second mention
    return _task("passkey", out, answer_ids, key, answer_pos, depth, context_len, [(second, len(answer_ids))])


_KV_HEAD = "Below is a list of keys and their values. Remember the value of every key.\n"


def kv_recall(
    tok: Any,
    context_len: int,
    depth: float,
    rng: random.Random | int,
    *,
    n_digits: int = 4,
    max_pairs: int | None = None,
    n_queries: int = 1,
) -> Task:
    """Multi-key associative recall: as many distinct ``key: value`` lines as fit, then one key is asked for.

    Keys are two words ("amber-falcon"), values ``n_digits`` digits; the queried pair is the one at ``depth`` in the
    list. ``max_pairs`` caps the list (the rest of the context is blank lines after it). With ``n_queries`` > 1,
    that many minus one other keys are asked for (and answered) first, in the same format: see :attr:`Task.spans`.
    """
    if n_queries < 1:
        raise ValueError(f"kv_recall: n_queries must be >= 1, got {n_queries}")
    _check_args("kv_recall", context_len, depth)
    rng, enc = _rng(rng), as_encoder(tok)
    head_ids = enc(_KV_HEAD)
    # The question's length depends on the key; reserve room for the longest key (padding absorbs the difference).
    longest = enc.memo.get("kv_longest_question")
    if longest is None:
        longest = enc.memo["kv_longest_question"] = max(
            len(enc._encode(f"\nWhat is the value of {a}-{b}?\n{a}-{b}: ")) for a in _WORDS for b in _WORDS
        )
    budget = context_len - len(head_ids) - n_queries * (longest + n_digits + 1)
    if budget < 1:
        raise ValueError(
            f"kv_recall: context_len={context_len} is too short; ask for at least {context_len - budget + 1}"
        )
    lines: list[tuple[str, str, str, list[int]]] = []
    used, seen = 0, set()
    while max_pairs is None or len(lines) < max_pairs:
        key = f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
        if key in seen:
            if len(seen) > len(_WORDS) ** 2 // 2:
                break
            continue
        value = _digits(rng, n_digits)
        line = f"{key}: {value}\n"
        ids = enc.join(f"{key}: ", value, "\n")
        if used + len(ids) > budget:
            break
        seen.add(key)
        lines.append((key, value, line, ids))
        used += len(ids)
    if len(lines) < n_queries:
        raise ValueError(f"kv_recall: context_len={context_len} leaves too few pairs to ask {n_queries}; ask for more")
    q = round(depth * (len(lines) - 1))
    key, value = lines[q][0], lines[q][1]
    # Earlier questions (answered), then the one whose answer is the task's.
    tail_text, tail_ids, tail_spans = "", [], []
    for k, v, _, _ in rng.sample(lines[:q] + lines[q + 1 :], n_queries - 1):
        question = f"\nWhat is the value of {k}?\n{k}: "
        tail_spans.append((len(tail_ids) + len(enc(question)), len(enc.join("", v))))
        tail_text += f"{question}{v}\n"
        tail_ids += enc.join(question, v, "\n")
    question = f"\nWhat is the value of {key}?\n{key}: "
    q_ids, answer_ids = tail_ids + enc(question), enc.join("", value)
    out = _Builder()
    out.add(_KV_HEAD, head_ids)
    answer_pos = 0
    for i, (k, _, line, ids) in enumerate(lines):
        at = out.add(line, ids)
        if i == q:
            answer_pos = at + len(enc(f"{k}: "))
    pad = context_len - len(out.ids) - len(q_ids) - len(answer_ids)
    out.add("\n" * pad, [enc.newline_id] * pad)
    tail_at = out.add(tail_text + question, q_ids)
    spans = [(tail_at + a, n) for a, n in tail_spans]
    return _task("kv_recall", out, answer_ids, value, answer_pos, depth, context_len, spans)


def _task(
    kind: str,
    out: _Builder,
    answer_ids: list[int],
    answer: str,
    answer_pos: int,
    depth: float,
    context_len: int,
    spans: list[tuple[int, int]] = (),
) -> Task:
    assert len(out.ids) + len(answer_ids) == context_len, (kind, len(out.ids), len(answer_ids), context_len)
    assert out.ids[answer_pos : answer_pos + len(answer_ids)] == answer_ids, kind
    assert all(0 < a and a + n <= len(out.ids) for a, n in spans), (kind, spans)
    return Task(kind, out.ids, list(answer_ids), answer, answer_pos, depth, context_len, tuple(spans), tuple(out.parts))


TASKS: dict[str, Callable[..., Task]] = {"needle": needle, "passkey": passkey, "kv_recall": kv_recall}
