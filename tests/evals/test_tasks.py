"""The retrieval task generators, the corpus file, and a CPU smoke run of bench/train_tiny.py."""

import gzip
import importlib.util
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from specache_compile.evals.tasks import (
    DOC_SEP,
    TASKS,
    CorpusFiller,
    Encoder,
    RepeatFiller,
    build_corpus,
    kv_recall,
    load_corpus,
    needle,
    passkey,
    split_documents,
)

REPO = Path(__file__).resolve().parents[2]
TRAIN_TINY = REPO / "bench" / "train_tiny.py"


def byte_encode(s: str) -> list[int]:
    return list(s.encode("utf-8"))


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", TRAIN_TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt.gz"
    manifest = build_corpus(path, max_bytes=400_000)
    return path, manifest


@pytest.fixture(scope="module")
def bpe(train_tiny, corpus):
    """The tokenizer train_tiny trains, on a small corpus, and a filler over the corpus tokens."""
    text, _ = load_corpus(corpus[0])
    train_docs, _ = split_documents(text)
    tok = train_tiny.train_tokenizer(train_docs, 512)
    ids = train_tiny.encode_docs(tok, train_docs)
    enc = Encoder(tok)
    filler = CorpusFiller(ids, enc.newline_id, tok.decode, sep_id=tok.token_to_id(DOC_SEP))
    return tok, enc, filler


def check_task(task, context_len):
    assert len(task.input_ids) + len(task.answer_ids) == context_len
    assert task.answer.isdigit() and len(task.answer_ids) >= 1
    assert task.input_ids[task.answer_pos : task.answer_pos + len(task.answer_ids)] == task.answer_ids
    assert task.answer_pos + len(task.answer_ids) <= len(task.input_ids)


@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("context_len", [300, 1000, 4096])
def test_lengths_and_answer_in_context(kind, context_len):
    for depth in (0.0, 0.37, 1.0):
        task = TASKS[kind](byte_encode, context_len, depth, random.Random(1))
        check_task(task, context_len)
        # Byte-level: the answer digits are the answer's bytes, and the text is the prompt's bytes.
        assert bytes(task.answer_ids).decode() == task.answer
        assert byte_encode(task.text) == task.input_ids
        assert task.text[-1] == " "  # the prompt stops right before the answer ("... is ", "key: ")
        assert task.text.count(task.answer) >= 1


@pytest.mark.parametrize("kind", ["needle", "passkey"])
def test_fact_sits_at_requested_depth(kind):
    ctx = 4096
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        task = TASKS[kind](byte_encode, ctx, depth, random.Random(7))
        # Facts go to the nearest line start: the classic filler's lines are ~90 bytes, ~2% of 4096.
        assert abs(task.answer_pos / ctx - depth) < 0.05, (depth, task.answer_pos)


def test_needle_depth_with_corpus_filler(bpe):
    _, enc, filler = bpe
    for depth in (0.0, 0.2, 0.5, 0.8, 1.0):
        task = needle(enc, 4096, depth, random.Random(3), filler=filler, n_distractors=3)
        check_task(task, 4096)
        assert abs(task.answer_pos / 4096 - depth) < 0.05, (depth, task.answer_pos)


def test_kv_recall_queries_pair_at_depth():
    ctx = 2048
    for depth in (0.0, 0.5, 1.0):
        task = kv_recall(byte_encode, ctx, depth, random.Random(5))
        lines = task.text.split("\n")
        pairs = [ln for ln in lines if ": " in ln and ln.split(": ")[1].isdigit()]
        key = lines[-1][: -len(": ")]
        keys = [ln.split(": ")[0] for ln in pairs]
        assert len(keys) == len(set(keys)) > 50  # dense and distinct
        idx = keys.index(key)
        assert pairs[idx] == f"{key}: {task.answer}"
        assert abs(idx / (len(keys) - 1) - depth) < 0.01


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_spans_are_copies_of_earlier_context(kind):
    """Extra supervised spans (earlier questions' answers, the pass key's second mention) are copies of a fact."""
    opts = {"needle": {"n_distractors": 3, "n_queries": 3}, "kv_recall": {"n_queries": 5}, "passkey": {}}[kind]
    task = TASKS[kind](byte_encode, 2048, 0.5, random.Random(11), **opts)
    check_task(task, 2048)
    assert len(task.spans) == {"needle": 2, "kv_recall": 4, "passkey": 1}[kind]
    ids = task.input_ids
    for a, n in task.spans:
        piece = ids[a : a + n]
        assert bytes(piece).decode().isdigit()
        assert any(ids[j : j + n] == piece for j in range(a - n)), "the copied digits appear earlier"
    assert byte_encode(task.text) == ids
    single = TASKS[kind](byte_encode, 2048, 0.5, random.Random(11))
    assert len(single.spans) == (1 if kind == "passkey" else 0)  # one query by default


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_deterministic_per_seed(kind):
    gen = TASKS[kind]
    a = gen(byte_encode, 1500, 0.4, 123)
    b = gen(byte_encode, 1500, 0.4, random.Random(123))
    c = gen(byte_encode, 1500, 0.4, 124)
    assert a.input_ids == b.input_ids and a.answer_ids == b.answer_ids and a.answer_pos == b.answer_pos
    assert a.input_ids != c.input_ids


def test_bpe_tokenization_is_consistent(bpe):
    """With the trained tokenizer, re-encoding the text gives the ids, and answers are one token per digit."""
    tok, enc, filler = bpe
    tasks = [
        needle(enc, 2048, 0.3, 1, filler=filler, n_distractors=2, n_queries=3),
        kv_recall(enc, 2048, 0.7, 6, n_queries=4),
        needle(tok, 1024, 0.9, 2),
        passkey(enc, 2048, 0.6, 3, filler=filler),
        passkey(enc, 1024, 0.1, 4),
        kv_recall(enc, 2048, 0.5, 5),
    ]
    assert enc.digits_isolated
    for task in tasks:
        check_task(task, task.context_len)
        assert tok.encode(task.text, add_special_tokens=False).ids == task.input_ids
        assert len(task.answer_ids) == len(task.answer)
        assert tok.encode(task.text + task.answer, add_special_tokens=False).ids == task.full_ids
        assert DOC_SEP not in task.text
        assert pickle.loads(pickle.dumps(task)).text == task.text  # picklable, e.g. for worker processes


def test_fillers_cut_whole_lines(bpe):
    tok, enc, filler = bpe
    rng = random.Random(0)
    for n in (1, 50, 999, 4000):
        for f in (filler, RepeatFiller(enc)):
            chunk = f.take(n, rng)
            assert len(chunk.ids) == n and chunk.bounds[0] == 0 and chunk.bounds[-1] == n
            assert all(chunk.ids[b - 1] == enc.newline_id for b in chunk.bounds[1:])
            part = chunk.part(0, n)
            text = part if isinstance(part, str) else part[0](part[1])
            assert tok.encode(text, add_special_tokens=False).ids == chunk.ids


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="too short"):
        needle(byte_encode, 20, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        passkey(byte_encode, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="too short"):
        kv_recall(byte_encode, 30, 0.5, 0)


def test_corpus_is_reproducible(corpus, tmp_path):
    path, manifest = corpus
    again = build_corpus(tmp_path / "again.txt.gz", max_bytes=400_000)
    assert again["sha256"] == manifest["sha256"]
    assert (tmp_path / "again.txt.gz").read_bytes() == path.read_bytes()  # gzip with a zero timestamp
    text, sha = load_corpus(path)
    assert sha == manifest["sha256"] and json.loads(Path(str(path) + ".json").read_text())["sha256"] == sha
    assert manifest["text_bytes"] <= 400_000 and text.count(DOC_SEP) == manifest["n_documents"]
    assert "def " in text and "\r" not in text
    train, heldout = split_documents(text, heldout_every=5)
    assert heldout and len(train) + len(heldout) == manifest["n_documents"]
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(text.encode()[:-10], mtime=0))
    with pytest.raises(ValueError, match="sha256"):
        load_corpus(bad, expect_sha256=sha)


@pytest.mark.slow  # trains a model in a child process (bench/train_tiny.py --smoke): ~10 s alone, more beside a worker
def test_train_tiny_smoke_saves_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(TRAIN_TINY), "--smoke", "--out", str(out), "--corpus", str(tmp_path / "c.txt")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[eval]" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert next(out.glob("*.safetensors")).stat().st_size < 25 * 2**20
    tok = AutoTokenizer.from_pretrained(out)
    text = "The secret code of Ada Moreno is 48213.\n    def f(x):\n        return x\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    lines = text.splitlines(keepends=True)  # no token spans a newline: lines encode independently
    assert ids == [i for line in lines for i in tok.encode(line, add_special_tokens=False)]
    assert tok.eos_token == DOC_SEP
    # The saved model runs on the tokenizer's ids and the log and eval files are there.
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["step"] == log[0]["total_steps"]
    assert "tok_s" in log[-1]
    res = json.loads((out / "eval.json").read_text())
    assert set(res["tasks"]) >= {"needle", "passkey", "kv_recall"} and res["finished"]
