"""Train specache-tiny: a small Llama (GQA, RoPE) whose attention is sharp, for evaluating KV-cache policies.

Random weights attend diffusely, and no real model can be downloaded here, so this script trains one from scratch on
data made on the machine: language modelling on Python standard-library text (the corpus file of
``specache_compile.evals.tasks.build_corpus``) mixed with copy rows (spans of a window repeated verbatim: the plain
induction signal) and synthetic long-context retrieval (needle in a haystack, pass key, multi-key associative recall),
60% of the rows. Those make heads that attend to a few far-away tokens, which is what top-k KV fetching must get
right. Loss: LM on every token, plus the mean loss of the answer tokens and of the copied tokens, each its own term so
that a handful of answer tokens in a 4K row still steer training.

GPU run (the README holds the exact command; the corpus and the tokenizer/ids caches travel in .carry/):

    python bench/train_tiny.py --device cuda --minutes 8 --out models/specache-tiny

CPU smoke test (tiny model, a few steps, temp dir, < 60 s):

    python bench/train_tiny.py --smoke

A run longer than one command may take: ``--plan-minutes 12 --minutes 8`` trains the first part of a 12-minute
schedule and leaves a checkpoint in ``--ckpt-dir``; the same command with ``--resume`` finishes it. Batches depend
only on (seed, step), so a resumed run sees the data an uninterrupted one would.

Writes to ``--out``: the model (bf16 safetensors) and tokenizer, ``train_log.jsonl`` (one line per ``--log-every``
steps) and ``eval.json`` (retrieval accuracy by task, context and depth, and held-out LM loss).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from specache_compile.evals.tasks import (  # noqa: E402
    DOC_SEP,
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

KINDS = ("lm", "copy", "needle", "passkey", "kv_recall")  # row kinds; the last three are evals.tasks generators
TASK_KINDS = KINDS[2:]


# ----------------------------------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--out", default=None, help="output folder (default models/specache-tiny; --smoke: a temp dir)")
    a("--corpus", default=None, help="corpus file, built if absent (default .carry/specache-corpus.txt.gz)")
    a("--cache-dir", default=None, help="where the tokenizer and token ids are cached (default: the corpus's folder)")
    a("--ckpt-dir", default=None, help="resume checkpoint folder (default build/train_tiny, git-ignored)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=0)
    a("--minutes", type=float, default=8.0, help="wall-clock budget of this invocation's training loop")
    a("--plan-minutes", type=float, default=None, help="length of the whole schedule, for --steps (default --minutes)")
    a("--steps", type=int, default=None, help="total optimizer steps; default: what --plan-minutes allows (measured)")
    a("--resume", action="store_true", help="continue the run whose checkpoint is in --ckpt-dir")
    # model: see build_model for why these sizes
    a("--vocab", type=int, default=2048)
    a("--hidden", type=int, default=384)
    a("--layers", type=int, default=6)
    a("--heads", type=int, default=6)
    a("--kv-heads", type=int, default=2)
    a("--intermediate", type=int, default=704)
    # data and optimisation
    a("--seq-len", type=int, default=4096)
    a("--tokens-per-step", type=int, default=131072, help="batch size in tokens; rows = this // length")
    a("--mix", default="lm=0.3,copy=0.1,needle=0.25,passkey=0.1,kv_recall=0.25", help="row mixture by kind")
    a("--answer-weight", type=float, default=1.0, help="weight of the mean answer-token loss added to the LM loss")
    a("--copy-weight", type=float, default=1.0, help="weight of the mean copied-token loss of copy rows")
    a("--lr", type=float, default=2e-3)
    a("--min-lr-frac", type=float, default=0.1)
    a("--warmup", type=int, default=300, help="warmup steps (capped at 5%% of the run)")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--workers", type=int, default=8, help="DataLoader worker processes making batches")
    a("--compile", action="store_true", help="torch.compile the model (one graph per curriculum length)")
    a("--log-every", type=int, default=25)
    a("--eval-samples", type=int, default=8, help="samples per (task, context, depth) cell in the final check")
    a("--smoke", action="store_true", help="tiny model, a few steps, seq 256, CPU, temp dir: a < 60 s check")
    args = p.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 512, 64, 2, 4, 2, 128
        args.seq_len, args.tokens_per_step, args.lr, args.warmup = 256, 2048, 3e-3, 5
        args.steps = args.steps or 16
        args.log_every, args.eval_samples, args.workers = 8, 1, min(args.workers, 1)
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
        tmp = Path(tempfile.mkdtemp(prefix="specache-tiny-smoke-"))
        args.out = args.out or str(tmp / "model")
        args.corpus = args.corpus or str(tmp / "corpus.txt")
        args.ckpt_dir = args.ckpt_dir or str(tmp / "ckpt")
    args.out = args.out or str(REPO / "models" / "specache-tiny")
    args.corpus = args.corpus or str(REPO / ".carry" / "specache-corpus.txt.gz")
    args.cache_dir = args.cache_dir or str(Path(args.corpus).parent)
    args.ckpt_dir = args.ckpt_dir or str(REPO / "build" / "train_tiny")
    args.plan_minutes = args.plan_minutes or args.minutes
    mix = dict(kv.split("=") for kv in args.mix.split(","))
    if set(mix) - set(KINDS):
        p.error(f"--mix: kinds must be among {KINDS}, got {sorted(mix)}")
    args.mix_weights = [float(mix.get(k, 0)) for k in KINDS]
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# corpus, tokenizer, token ids
# ----------------------------------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with digits split one per token and every newline its own token.

    Why a small byte-level BPE (2048 by default) rather than raw bytes: about 2.7 bytes per token on this corpus, so a
    4K context holds ~11 KB of text (real-looking long context), while the embedding stays 6% of an 8M-parameter model
    and the softmax over the vocabulary stays cheap. Byte-level means no unknown tokens.
    Digits one per token: an answer like 48213 is always the same 5 tokens wherever it appears, so copying it is a
    token-by-token lookup and accuracy is exact-match on digit tokens.
    Newlines isolated: tokens never span a line break, so text assembled from whole lines tokenizes to the
    concatenation of the lines' tokens (the task generators rely on it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[DOC_SEP],  # id 0: document separator, used as BOS/EOS/PAD
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_docs(tok, docs: list[str]) -> torch.Tensor:
    """All documents as one int16 tensor, each followed by the separator token."""
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.21)
    sep = tok.token_to_id(DOC_SEP)
    out: list[int] = []
    for enc in batch(docs, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(sep)
    assert tok.get_vocab_size() < 2**15
    return torch.tensor(out, dtype=torch.int16)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(args) -> dict:
    """Corpus -> (cached) tokenizer -> (cached) train/held-out token ids. Caches are keyed by content hashes."""
    from tokenizers import Tokenizer

    t0 = time.time()
    corpus = Path(args.corpus)
    if not corpus.exists():
        print(f"[data] building corpus {corpus}", flush=True)
        build_corpus(corpus, max_bytes=1_000_000 if args.smoke else 64_000_000)
    text, corpus_sha = load_corpus(corpus)
    train_docs, heldout_docs = split_documents(text)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tok_path = cache / f"specache-tok-v{args.vocab}-{corpus_sha[:12]}.json"
    if tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        print(f"[data] training tokenizer (vocab {args.vocab}) -> {tok_path}", flush=True)
        tok = train_tokenizer(train_docs, args.vocab)
        tok.save(str(tok_path))
    tok_sha = _sha(tok_path)
    ids_path = cache / f"specache-ids-{corpus_sha[:12]}-{tok_sha[:12]}.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        print(f"[data] tokenizing corpus -> {ids_path}", flush=True)
        ids = {"train": encode_docs(tok, train_docs), "heldout": encode_docs(tok, heldout_docs)}
        torch.save(ids, ids_path)
    print(
        f"[data] corpus {corpus} sha256 {corpus_sha[:16]}…: {len(text) / 1e6:.1f} MB text, {len(train_docs)} train / "
        f"{len(heldout_docs)} held-out docs, {len(ids['train']) / 1e6:.2f}M / {len(ids['heldout']) / 1e6:.2f}M tokens "
        f"({len(text) / (len(ids['train']) + len(ids['heldout'])):.2f} chars/token), vocab {tok.get_vocab_size()}, "
        f"{time.time() - t0:.1f}s",
        flush=True,
    )
    return {"tok": tok, "ids": ids, "corpus_sha": corpus_sha, "tok_sha": tok_sha}


# ----------------------------------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------------------------------


def build_model(args, vocab_size: int):
    """A Llama with GQA and RoPE.

    Size: the defaults (hidden 384, 6 layers, 6 query heads of 64, 2 KV heads, MLP 704, tied 2048-token embedding)
    give 8.0M parameters, 16.0 MB in bf16: under the 25 MB the repo allows and under the 16 MiB one file may have to
    come back from the GPU machine. Head dim 64 matches real models (and the kernels' tiles); 2 KV heads per layer
    make GQA groups of 3. Attention gets most of the budget, the MLP is thin: retrieval is attention's job.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def save_model(model, tok, out: Path) -> None:
    """bf16 safetensors + tokenizer files that AutoTokenizer / PreTrainedTokenizerFast load from the folder."""
    import copy

    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one shard: a progress bar is noise in the log
    out.mkdir(parents=True, exist_ok=True)
    bf16 = copy.deepcopy(model).to(device="cpu", dtype=torch.bfloat16)
    # safetensors is save_pretrained's only format in transformers 5 (safe_serialization is no longer an argument).
    bf16.save_pretrained(out)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=DOC_SEP,
        eos_token=DOC_SEP,
        pad_token=DOC_SEP,
        model_max_length=model.config.max_position_embeddings,
    )
    hf_tok.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------


def curriculum(progress: float, seq_len: int) -> tuple[list[int], list[float]]:
    """Context lengths and their probabilities at a point of the run.

    Short contexts first: 8x more (shorter) rows per step means 8x more answers to learn from while the retrieval
    heads form, and the distance to the needle is small. Then mostly full length, where the model is evaluated, with
    some short rows kept so retrieval stays right at every length up to seq_len.
    """
    lengths = [max(seq_len // k, min(seq_len, 256)) for k in (8, 4, 2, 1)]  # >= 256: room for the tasks' text
    if progress < 0.08:
        return lengths, [0.5, 0.5, 0.0, 0.0]
    if progress < 0.2:
        return lengths, [0.2, 0.3, 0.5, 0.0]
    if progress < 0.35:
        return lengths, [0.1, 0.2, 0.3, 0.4]
    return lengths, [0.1, 0.1, 0.2, 0.6]


class Batches(torch.utils.data.IterableDataset):
    """Batches for steps [start, stop): batch i is a function of (seed, i) only, whatever the number of workers.

    Rows are ``length + 1`` tokens (inputs and shifted targets). LM rows are random windows of the training corpus;
    task rows are one generated task each: prompt + answer + separator, with the answer's target positions marked.
    """

    def __init__(self, args, ids: torch.Tensor, enc: Encoder, filler: CorpusFiller, start: int, stop: int, total: int):
        self.args, self.ids, self.enc, self.filler = args, ids, enc, filler
        self.start, self.stop, self.total = start, stop, total
        self.classic = RepeatFiller(enc)
        self.vocab_size = int(ids.max()) + 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + wid, self.stop, nw):
            yield self.make(step)

    def row_for(self, kind: str, length: int, rng: random.Random) -> tuple[list[int], int, int, tuple]:
        """(row of length + 1 ids, first answer target index, answer length, other supervised spans) for a task row.

        Tasks carry more than one retrieval each where they can (earlier questions answered in the same format, the
        pass key's second mention): one row then teaches several copies instead of one.
        """
        depth = rng.random()
        if kind == "needle":
            # Distractors (other people's facts) make the model match the name, not copy any digits after "is";
            # fewer of them in short rows, where their fixed text would crowd out the haystack.
            n_distractors = rng.randint(0, min(3, length // 192))
            t = needle(
                self.enc,
                length,
                depth,
                rng,
                filler=self.filler,
                n_digits=rng.randint(3, 7),
                n_distractors=n_distractors,
                n_queries=rng.randint(1, 1 + n_distractors),
            )
        elif kind == "passkey":
            filler = self.classic if rng.random() < 0.5 else self.filler
            t = passkey(self.enc, length, depth, rng, filler=filler, n_digits=rng.randint(3, 7))
        else:
            t = kv_recall(
                self.enc,
                length,
                depth,
                rng,
                n_digits=rng.randint(3, 5),
                n_queries=rng.randint(1, max(1, min(8, length // 256))),
            )
        row = t.input_ids + t.answer_ids + [0]
        # Target index j predicts row[j + 1]: the answer's first token is predicted at len(input_ids) - 1.
        return row, len(t.input_ids) - 1, len(t.answer_ids), t.spans

    def copy_row(self, length: int, rng: random.Random) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """A window (corpus text or random tokens), then spans of it repeated verbatim: (row of length + 1 ids,
        [(start, length)] of the copies).

        The plainest induction signal there is: half the row can be predicted only by finding the earlier
        occurrence of the current text and reading on. Retrieval is learned only once such heads exist, and they
        form abruptly after a plateau whose length shrinks with the copy signal per step. Seen on CPU: with LM and
        tasks alone, a 4-layer 128-wide model's answer loss sat at ln(10) through 4M tokens (4K-token steps); a
        2-layer one on pure random-offset copies jumped from 0% to 94% copy accuracy at step ~200 of 16K tokens.
        In the default GPU run copy accuracy rises abruptly a few hundred steps in and the tasks follow soon after.
        """
        first = length // 2
        if rng.random() < 0.5:
            s = rng.randrange(len(self.ids) - first)
            window = self.ids[s : s + first]
        else:
            # Random tokens: nothing but copying predicts them, so the copy is learned sooner than from text,
            # where n-gram guessing competes with it.
            g = torch.Generator().manual_seed(rng.getrandbits(62))
            window = torch.randint(1, self.vocab_size, (first,), generator=g, dtype=torch.int16)
        pieces, spans, at = [window], [], first
        while at < length + 1:
            n = min(rng.randint(16, 128), length + 1 - at, first)
            src = rng.randrange(first - n + 1)
            pieces.append(window[src : src + n])
            spans.append((at, n))
            at += n
        return torch.cat(pieces), spans

    def make(self, step: int, length: int | None = None) -> dict:
        rng = random.Random((self.args.seed << 32) + step)
        if length is None:
            lengths, probs = curriculum(step / self.total, self.args.seq_len)
            length = rng.choices(lengths, probs)[0]
        rows = max(1, self.args.tokens_per_step // length)
        data = torch.empty(rows, length + 1, dtype=torch.int32)
        ans = torch.zeros(rows, length, dtype=torch.bool)  # targets of the task's answer (scored)
        aux = torch.zeros(rows, length, dtype=torch.bool)  # targets of its other copies (supervised, not scored)
        cpy = torch.zeros(rows, length, dtype=torch.bool)  # targets inside the repeated spans of copy rows
        kinds = torch.zeros(rows, dtype=torch.int64)
        n_ids = len(self.ids)
        for r in range(rows):
            k = rng.choices(range(len(KINDS)), self.args.mix_weights)[0]
            kinds[r] = k
            if KINDS[k] == "lm":
                s = rng.randrange(n_ids - length - 1)
                data[r] = self.ids[s : s + length + 1]
            elif KINDS[k] == "copy":
                data[r], spans = self.copy_row(length, rng)
                for a, n in spans:
                    # Target j predicts row[j + 1]: a span's first token is a jump, the rest follow the source.
                    cpy[r, a : a + n - 1] = True
            else:
                row, a0, na, spans = self.row_for(KINDS[k], length, rng)
                data[r] = torch.tensor(row, dtype=torch.int32)
                ans[r, a0 : a0 + na] = True
                for a, n in spans:
                    aux[r, a - 1 : a - 1 + n] = True
        return {"step": step, "data": data, "ans": ans, "aux": aux, "cpy": cpy, "kinds": kinds}


# ----------------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------------


def autocast(device: torch.device):
    # bf16 autocast on CUDA (params and optimizer state stay fp32); plain fp32 on CPU, where bf16 matmuls are slow.
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def forward_loss(model, batch: dict, device: torch.device, answer_weight: float, copy_weight: float = 1.0):
    data = batch["data"].to(device, non_blocking=True).long()
    ans = batch["ans"].to(device, non_blocking=True)
    inp, tgt = data[:, :-1], data[:, 1:]
    with autocast(device):
        logits = model(input_ids=inp, use_cache=False).logits
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
    lm_loss = ce.mean()
    # The answers are ~5 of 4096 tokens in a task row: averaged in with the rest their gradient would be ~1e-3 of
    # the loss. Their own mean (with the task's other copies), added with --answer-weight, gives retrieval equal
    # standing at every context length.
    sup = ans | batch["aux"].to(device, non_blocking=True)
    ans_loss = (ce * sup).sum() / sup.sum().clamp(min=1)
    cpy = batch["cpy"].to(device, non_blocking=True)
    n_cpy = cpy.sum()
    copy_loss = (ce * cpy).sum() / n_cpy.clamp(min=1)
    loss = lm_loss + answer_weight * ans_loss + copy_weight * copy_loss
    with torch.no_grad():
        # A task row is right when every answer token is the argmax (= greedy decoding emits the whole answer).
        wrong = ((logits.argmax(-1) != tgt) & ans).any(dim=1)
        has_ans = ans.any(dim=1)
        kinds = batch["kinds"].to(device, non_blocking=True)
        correct = torch.zeros(len(KINDS), device=device).index_add_(0, kinds, (has_ans & ~wrong).float())
        count = torch.zeros(len(KINDS), device=device).index_add_(0, kinds, has_ans.float())
        # Copy rows: token accuracy of the copied tokens (in the "copy" slot; their rows have no answer).
        correct[KINDS.index("copy")] = ((logits.argmax(-1) == tgt) & cpy).sum()
        count[KINDS.index("copy")] = n_cpy
    return loss, torch.stack([loss.detach(), lm_loss.detach(), ans_loss.detach(), copy_loss.detach()]), correct, count


def lr_at(step: int, total: int, args) -> float:
    warmup = max(1, min(args.warmup, total // 20))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(model, ds: Batches, device, args) -> dict[int, float]:
    """Seconds per step (forward + backward, no update) at each curriculum length, to fit --steps to a time budget."""
    lengths, _ = curriculum(1.0, args.seq_len)
    times = {}
    for length in lengths:
        b = ds.make(-1, length)
        per = []
        for i in range(3):
            sync(device)
            t = time.perf_counter()
            loss = forward_loss(model, b, device, args.answer_weight, args.copy_weight)[0]
            loss.backward()
            sync(device)
            if i:  # the first run at a shape pays for allocator growth and kernel selection
                per.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        times[length] = sum(per) / len(per) * 1.08  # +8%: optimizer step, data transfer, logging
    return times


def planned_steps(times: dict[int, float], seconds: float) -> int:
    """Steps whose expected time fills ``seconds`` (the mix of lengths depends on progress alone, not on steps)."""
    grid = [(i + 0.5) / 200 for i in range(200)]
    per_step = 0.0
    for p in grid:
        lengths, probs = curriculum(p, max(times))
        per_step += sum(pr * times[length] for length, pr in zip(lengths, probs)) / len(grid)
    return max(1, int(seconds / per_step))


# ----------------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, enc: Encoder, filler: CorpusFiller, heldout: torch.Tensor, device, args) -> dict:
    """Greedy exact-match accuracy of the answer digits by (task, context, depth), and held-out LM loss.

    Greedy decoding emits the answer iff every answer token is the argmax given the prompt and the answer's earlier
    tokens, so one teacher-forced forward per prompt gives exactly the greedy result.
    """
    model.eval()
    contexts = [c for c in (1024, 2048, 4096) if c <= args.seq_len] or [args.seq_len]
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    gens = {
        "needle": lambda c, d, r: needle(enc, c, d, r, filler=filler, n_digits=5),
        "needle_x3": lambda c, d, r: needle(enc, c, d, r, filler=filler, n_digits=5, n_distractors=2),
        "passkey": lambda c, d, r: passkey(enc, c, d, r, n_digits=5),
        "kv_recall": lambda c, d, r: kv_recall(enc, c, d, r, n_digits=4),
    }
    base, head = model.model, model.lm_head
    results: dict = {"contexts": contexts, "depths": depths, "samples_per_cell": args.eval_samples, "tasks": {}}
    for kind, gen in gens.items():
        per_ctx = {}
        for c in contexts:
            cells = []
            for d in depths:
                hits = 0
                # String seeds: disjoint from the training batches' integer seeds.
                tasks = [
                    gen(c, d, random.Random(f"eval:{args.seed}:{kind}:{c}:{d}:{s}")) for s in range(args.eval_samples)
                ]
                for i in range(0, len(tasks), 8):
                    chunk = tasks[i : i + 8]
                    x = torch.tensor([t.full_ids for t in chunk], device=device)
                    with autocast(device):
                        h = base(input_ids=x, use_cache=False).last_hidden_state
                        na = len(chunk[0].answer_ids)
                        pred = head(h[:, c - na - 1 : c - 1]).argmax(-1)
                    hits += int((pred == x[:, c - na :]).all(dim=1).sum())
                cells.append(hits / len(tasks))
            per_ctx[str(c)] = cells
        results["tasks"][kind] = per_ctx
    # Cross-check with real greedy decoding through generate() and its KV cache (the path KV-cache policies take):
    # it should emit what the teacher-forced argmax says, up to bf16 near-ties.
    agree = total = 0
    for kind in ("needle", "passkey"):
        tasks = [gens[kind](contexts[-1], 0.5, random.Random(f"gen:{args.seed}:{kind}:{s}")) for s in range(4)]
        x = torch.tensor([t.full_ids for t in tasks], device=device)
        c, na = x.shape[1], len(tasks[0].answer_ids)
        with autocast(device):
            teacher = model(input_ids=x, use_cache=False).logits[:, c - na - 1 : c - 1].argmax(-1)
            greedy = model.generate(
                input_ids=x[:, : c - na],
                attention_mask=torch.ones_like(x[:, : c - na]),
                max_new_tokens=na,
                min_new_tokens=na,
                do_sample=False,
                pad_token_id=0,
            )[:, c - na :]
        agree += int((teacher == greedy).all(dim=1).sum())
        total += len(tasks)
    results["generate_agrees_with_teacher_forced"] = agree / total
    # Held-out LM loss: 16 windows of seq_len from documents never trained on.
    g = random.Random(args.seed + 7)
    n = min(16, max(1, len(heldout) // (args.seq_len + 1)))
    starts = [g.randrange(max(1, len(heldout) - args.seq_len - 1)) for _ in range(n)]
    x = torch.stack([heldout[s : s + args.seq_len + 1].long() for s in starts]).to(device)
    losses = []
    for i in range(0, n, 4):
        with autocast(device):
            logits = model(input_ids=x[i : i + 4, :-1], use_cache=False).logits
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), x[i : i + 4, 1:].flatten()).item())
    results["heldout_lm_loss"] = sum(losses) / len(losses)
    model.train()
    return results


def print_eval(res: dict) -> None:
    print(f"[eval] greedy exact-match by depth {res['depths']} ({res['samples_per_cell']} samples each)")
    for kind, per_ctx in res["tasks"].items():
        for c, cells in per_ctx.items():
            mean = sum(cells) / len(cells)
            print(f"[eval] {kind:9s} ctx {c:>5s}: mean {mean:6.1%}  " + " ".join(f"{v:5.0%}" for v in cells))
    print(
        f"[eval] held-out LM loss {res['heldout_lm_loss']:.3f}; generate() agrees with the teacher-forced argmax on "
        f"{res['generate_agrees_with_teacher_forced']:.0%} of prompts",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    device = torch.device(args.device)
    out, ckpt_dir = Path(args.out), Path(args.ckpt_dir)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    state = None
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}; run without --resume first")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        keep = {"minutes", "resume", "device", "out", "ckpt_dir", "workers", "corpus", "cache_dir", "log_every"}
        for k, v in state["args"].items():
            if k not in keep:
                setattr(args, k, v)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = prepare_data(args)
    tok, ids = data["tok"], data["ids"]
    enc = Encoder(tok)
    train_filler = CorpusFiller(ids["train"], enc.newline_id, tok.decode, sep_id=0)
    heldout_filler = CorpusFiller(ids["heldout"], enc.newline_id, tok.decode, sep_id=0)
    # Workers fork after the Rust tokenizer used its thread pool; say so up front instead of a warning per worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    model = build_model(args, tok.get_vocab_size()).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, args, device)
    step, log_lines = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log_lines = state["step"], state["log"]
    cfg = model.config
    print(
        f"[model] Llama {n_params / 1e6:.2f}M params ({n_params * 2 / 2**20:.1f} MiB bf16): hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads of "
        f"{cfg.head_dim}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}, attn {cfg._attn_implementation}, "
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        flush=True,
    )
    fwd_model = torch.compile(model, dynamic=False) if args.compile else model

    plan = None
    if state is not None:
        total = state["total"]
    elif args.steps:
        total = args.steps
    else:
        probe = Batches(args, ids["train"], enc, train_filler, 0, 1, 1)
        times = calibrate(fwd_model, probe, device, args)
        total = planned_steps(times, args.plan_minutes * 60)
        plan = {"seconds_per_step_by_length": times, "plan_minutes": args.plan_minutes, "steps": total}
        flops = 6 * n_params + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * args.seq_len
        print(
            "[plan] s/step by length: "
            + ", ".join(f"{k}: {v * 1e3:.0f} ms" for k, v in times.items())
            + f"; {total} steps in {args.plan_minutes:g} min ({total * args.tokens_per_step / 1e6:.0f}M tokens); "
            f"at {args.seq_len}: {args.tokens_per_step / times[args.seq_len] / 1e3:.0f}K tok/s, "
            f"{flops * args.tokens_per_step / times[args.seq_len] / 1e12:.0f} TFLOP/s (6N + attention). "
            f"Rerun exactly with --steps {total}",
            flush=True,
        )
    args.steps = total

    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    with open(log_path, "w") as f:  # restore earlier invocations' lines on resume: the out folder may be new
        for line in log_lines:
            f.write(json.dumps(line) + "\n")
    header = {
        "event": "start",
        "step": step,
        "total_steps": total,
        "n_params": n_params,
        "device": str(device),
        "corpus_sha256": data["corpus_sha"],
        "tokenizer_sha256": data["tok_sha"],
        "torch": torch.__version__,
        "plan": plan,
        "repro": shlex.join([sys.executable, *sys.argv]),
        "args": {k: v for k, v in vars(args).items()},
    }
    log_lines.append(header)
    with open(log_path, "a") as f:
        f.write(json.dumps(header) + "\n")

    ds = Batches(args, ids["train"], enc, train_filler, step, total, total)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )
    model.train()
    deadline = time.time() + args.minutes * 60
    acc_loss = torch.zeros(4, device=device)
    acc_correct = torch.zeros(len(KINDS), device=device)
    acc_count = torch.zeros(len(KINDS), device=device)
    t_log, tokens_log, steps_log = time.perf_counter(), 0, 0
    t_train = time.time()
    tokens_run = 0
    stopped_early = False
    for batch in loader:
        assert batch["step"] == step, (batch["step"], step)
        lr = lr_at(step, total, args)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, losses, correct, count = forward_loss(fwd_model, batch, device, args.answer_weight, args.copy_weight)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc_loss += losses
        acc_correct += correct
        acc_count += count
        tokens_log += batch["data"].shape[0] * (batch["data"].shape[1] - 1)
        tokens_run += batch["data"].shape[0] * (batch["data"].shape[1] - 1)
        steps_log += 1
        step += 1
        if step % args.log_every == 0 or step == total:
            sync(device)
            dt = time.perf_counter() - t_log
            lv = (acc_loss / steps_log).tolist()
            acc = (acc_correct / acc_count.clamp(min=1)).tolist()
            line = {
                "step": step,
                "total_steps": total,
                "lr": lr,
                "loss": lv[0],
                "lm_loss": lv[1],
                "ans_loss": lv[2],
                "copy_loss": lv[3],
                "len": batch["data"].shape[1] - 1,
                "rows": batch["data"].shape[0],
                "grad_norm": float(gnorm),
                "tok_s": tokens_log / dt,
                "elapsed_s": time.time() - t_train,
            }
            line.update({f"acc_{k}": a for k, a in zip(KINDS[1:], acc[1:])})  # copy: per token; tasks: per answer
            log_lines.append(line)
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            print(
                f"step {step:5d}/{total} len {line['len']:4d} lr {lr:.2e} loss {lv[0]:.3f} (lm {lv[1]:.3f} ans "
                f"{lv[2]:.3f} copy {lv[3]:.3f}) acc "
                + " ".join(f"{k} {a:4.0%}" for k, a in zip(KINDS[1:], acc[1:]))
                + f" | {line['tok_s'] / 1e3:.0f}K tok/s, {line['elapsed_s']:.0f}s",
                flush=True,
            )
            acc_loss.zero_()
            acc_correct.zero_()
            acc_count.zero_()
            t_log, tokens_log, steps_log = time.perf_counter(), 0, 0
        if step >= total:
            break
        if time.time() > deadline:
            stopped_early = True
            break
    del loader
    sync(device)
    train_s = time.time() - t_train

    if stopped_early:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        saved_args = {k: v for k, v in vars(args).items()}
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "total": total,
                "args": saved_args,
                "log": log_lines,
            },
            ckpt_path,
        )
        print(
            f"[stop] time budget spent at step {step}/{total}; checkpoint {ckpt_path}: rerun with --resume", flush=True
        )
    elif ckpt_path.exists() and args.resume:
        ckpt_path.unlink()

    save_model(model, tok, out)
    res = evaluate(model, enc, heldout_filler, ids["heldout"], device, args)
    res.update(
        {
            "step": step,
            "total_steps": total,
            "finished": not stopped_early,
            "n_params": n_params,
            "train_seconds_this_run": train_s,
            "train_tokens_this_run": tokens_run,
            "corpus_sha256": data["corpus_sha"],
        }
    )
    (out / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    print_eval(res)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    print(
        f"[done] step {step}/{total}, {tokens_run / 1e6:.0f}M tokens in {train_s:.0f}s of training "
        f"({tokens_run / max(train_s, 1e-9) / 1e3:.0f}K tok/s); saved {out} ({size / 2**20:.1f} MiB weights); "
        f"{time.time() - t_start:.0f}s total",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
