"""The peer runner's pure parts on the shipped tiny tokenizer and model: its prompts are the ones the harness's RULER
suite feeds its policies (recorded from the harness itself), its rows carry the suite's fields and the report reads
them as a line of their own, the KV bytes it measures, and the press ratio that matches a compression. The peers
themselves run only where kvpress / optimum-quanto are installed (their own venv); elsewhere those tests skip."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from specache_compile.evals import harness, peers, report, ruler
from specache_compile.evals.tasks import CorpusFiller

TINY = Path(__file__).resolve().parents[2] / "models" / "specache-tiny"
TASKS = ["niah_single_essay", "niah_multikey", "variable_tracking", "common_words"]  # common_words: no depth


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture
def essay(tok, monkeypatch):
    """Real-text filler without building the corpus (this package's sources), for the harness and the peers alike."""
    text = "".join(p.read_text() for p in sorted((TINY.parents[1] / "specache_compile" / "evals").glob("*.py")))
    nl = tok("\n", add_special_tokens=False).input_ids[0]
    filler = CorpusFiller(tok(text, add_special_tokens=False).input_ids, nl, tok.decode)
    monkeypatch.setattr(ruler, "corpus_filler", lambda *a, **k: filler)
    return filler


@pytest.fixture
def harness_run(tok, essay, monkeypatch, tmp_path):
    """What the harness's RULER suite feeds a policy and the rows it writes, with a recorder in place of the model."""
    fed, rows = [], []

    class Recorder:
        def __init__(self, base, spec, device, defaults, measure_error=True):
            self.spec, self.name, self.config = spec, spec, None

        def generate(self, ids, n):
            fed.append((list(ids), n))
            return tok("- 1234567", add_special_tokens=False).input_ids[:n]

        def compression(self, length):
            return 1.0

    def setup(args):
        return None, tok, {}, {"model": "tiny", "git_sha": "x"}, rows, tmp_path / "rows.jsonl", rows.append

    monkeypatch.setattr(harness, "Runner", Recorder)
    monkeypatch.setattr(harness, "_setup", setup)
    argv = ["--suite", "ruler", "--tasks", *TASKS, "--contexts", "700", "900", "--depths", "0.2", "0.8",
            "--trials", "2", "--policies", "baseline", "--out", str(tmp_path / "rows.jsonl")]
    assert harness.main(argv) == 0
    return fed, rows


def test_prompts_are_the_harness_prompts(tok, harness_run):
    fed, _ = harness_run
    ours = [(t.input_ids, t.max_new_tokens) for ctx in (700, 900)
            for _, _, _, t in peers.prompts(tok, TASKS, ctx, [0.2, 0.8], 2)]
    assert len(fed) == (3 * 2 + 1) * 2 * 2  # three tasks at two depths, one depthless, two trials, two contexts
    assert ours == fed
    assert len({peers.prompt_sha(ids) for ids, _ in fed}) == len(fed)  # every prompt its own digest


def test_cells_keep_the_harness_order_and_a_depthless_task_once():
    assert peers.cells(["niah_multikey", "common_words"], [0.2, 0.8]) == [
        ("niah_multikey", 0.2), ("niah_multikey", 0.8), ("common_words", None)]


def test_a_row_has_the_suite_fields_and_the_report_shows_it(tok, harness_run, tmp_path):
    _, rows = harness_run
    ours = next(r for r in rows if r["task"] == "niah_multikey")
    name, depth, _, task = next(p for p in peers.prompts(tok, ["niah_multikey"], 700, [0.2], 1))
    env = {"git_sha": "abcdef0", "device": "cpu", "transformers": "5.2.0", "model": "tiny"}
    peer = peers.parse_peer("kvpress:snapkv")
    r = peers.row(peer, task=task, name=name, ctx=700, depth=depth, text=f"- {task.answers[0]}", compression=6.4,
                  ratio=0.84, seconds=1.0, sha=peers.prompt_sha(task.input_ids), env=env)
    missing = set(ours) - set(r)
    assert not missing, missing
    assert r["score"] == 1.0 and r["policy"] == "kvpress:snapkv" and r["peer"].startswith("kvpress ")
    assert r["transformers"] == "5.2.0" and r["compression"] == "measured" and r["compression_ratio_kvpress"] == 0.84
    failed = peers.row(peers.parse_peer("hf-quantized-cache:quanto,nbits=2"), task=task, name=name, ctx=700,
                       depth=depth, text=None, compression=None, ratio=None, seconds=0.0, sha="s", env=env,
                       note="ImportError: no quanto")
    assert failed["score"] is None and failed["note"] == "ImportError: no quanto" and failed["bits"] == 2
    # the report: the peer is a line of its own, compared with the full cache's output on the same prompt
    base = {**r, "policy": "baseline", "kv_compression": 1.0, "peer": None}
    path = tmp_path / "accuracy_real.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in (base, r, failed)))
    got = report.cells(report.load([path]), "tiny", ["niah_multikey"])
    assert got[("kvpress:snapkv", 700)] == {**got[("kvpress:snapkv", 700)], "score": 1.0, "same": 1.0,
                                            "compression": 6.4, "prompts": 1}
    assert "| kvpress:snapkv | 1.00 (1), 6.4x, 100% same |" in report.table(report.load([path]), "tiny",
                                                                           ["niah_multikey"])


def test_parse_peer():
    assert peers.parse_peer("hf-quantized-cache:quanto,nbits=2").options == (("nbits", 2),)
    assert peers.parse_peer("kvpress:knorm").kind == "press"
    assert peers.parse_peer("transformers:full_cache").kind == "full"
    for bad in ("kvpress:nope", "kvpress:snapkv,x=1", "hf-quantized-cache:quanto,bits=2", "snapkv"):
        with pytest.raises(ValueError, match="expected"):
            peers.parse_peer(bad)


def test_press_ratio_matches_the_compression_after_generation():
    ratio = peers.press_ratio(4096, 6.38, 13)
    kept = int(4096 * (1 - ratio) + 1e-6)  # kvpress keeps int(len * (1 - ratio))
    assert abs(4096 / (kept + 12) - 6.38) < 0.02
    with pytest.raises(ValueError, match="expected"):
        peers.press_ratio(4096, 1000.0, 13)


def test_nominal_counts_the_kept_tokens():
    # a cache holding all 4096 + 12 tokens, of which a press keeps 630 of the prompt and the 12 generated
    per_token = 10
    assert peers.nominal(4096 * per_token, 4108 * per_token, 4096, 1 - 630 / 4096, 13) == 4096 / 642


def test_cache_bytes_counts_what_the_cache_holds():
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(3):
        cache.update(torch.zeros(1, 2, 10, 64), torch.zeros(1, 2, 10, 64), layer)
    assert peers.cache_bytes(cache) == 3 * 2 * (2 * 10 * 64 * 4)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a namespace package's parent missing (optimum)
        return False


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.skipif(not _has("kvpress"), reason="kvpress is not installed here (it runs in a venv of its own)")
@pytest.mark.parametrize("press", list(peers.PRESSES))
def test_a_press_keeps_its_share_of_the_prompt(tiny_model, press):
    gen, cache = peers.run_prompt(peers.parse_peer(f"kvpress:{press}"), tiny_model, list(range(5, 205)), 4, 0.5)
    assert len(gen) == 4
    per_token = tiny_model.config.num_hidden_layers * 2 * (2 * 64 * 4)
    held = peers.cache_bytes(cache)
    if press in peers.MASKING:  # every token stays in the cache; the nominal figure counts what is not masked
        assert held == 203 * per_token
        assert peers.nominal(harness.kv_bytes_full(tiny_model, 200), held, 200, 0.5, 4) == 200 / 103
    else:  # 100 of the 200 prompt tokens (PyramidKV: on average over layers), 3 of the 4 generated
        assert held == 103 * per_token


@pytest.mark.skipif(not _has("optimum.quanto"), reason="optimum-quanto is not installed here")
def test_a_quantized_cache_holds_fewer_bytes(tiny_model):
    gen, cache = peers.run_prompt(peers.parse_peer("hf-quantized-cache:quanto,nbits=2"), tiny_model,
                                  list(range(5, 205)), 4, None)
    full = harness.kv_bytes_full(tiny_model, 200)
    assert len(gen) == 4 and 6 < full / peers.cache_bytes(cache) < 16
