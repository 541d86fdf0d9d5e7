"""`specache eval --quick` on CPU with the shipped model: the full-cache model must find the needle."""

import json

import pytest

from specache_compile.evals.harness import main, parse_policy


def test_parse_policy():
    assert parse_policy("specache:bits=1,topk=32,lowbit_remainder=false") == (
        "specache", {"bits": 1, "topk": 32, "lowbit_remainder": False})
    assert parse_policy("baseline") == ("baseline", {})


@pytest.mark.slow  # the whole `specache eval --quick` grid on the trained model: ~25 s warm on 2 cores, ~2 min cold
def test_quick_eval_finds_the_needle(tmp_path):
    out = tmp_path / "accuracy.jsonl"
    assert main(["--quick", "--out", str(out)]) == 0  # returns 1 if the full cache misses the needle
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["policy"] for r in rows} == {"baseline", "specache"}
    fields = {"bench", "task", "policy", "context", "depth", "topk", "bits", "kv_compression", "score", "git_sha",
              "device", "repro"}
    assert all(fields <= set(r) for r in rows)
    needle = [r for r in rows if r["task"] == "needle" and r["policy"] == "baseline"]
    assert needle and min(r["score"] for r in needle) == 1.0
    spec = [r for r in rows if r["policy"] == "specache" and r["task"] == "attn_rel_error"]
    assert all(0 < r["score"] < 1 for r in spec)  # small topk: measurably inexact, but not garbage
    # teacher forced along the baseline's tokens: predictions one position off would agree almost nowhere
    forced = [r for r in rows if r["policy"] == "specache" and r["task"] == "forced_agreement"]
    assert len(forced) == 2 and all(r["score"] >= 0.75 for r in forced)
    # the speculative prefetch's hit rate, per context: a share, counted by the specache runs only
    hits = [r for r in rows if r["task"] == "prefetch_hit_rate"]
    assert len(hits) == 4 and all(r["score"] is None for r in hits if r["policy"] == "baseline")
    assert all(0 < r["score"] <= 1 for r in hits if r["policy"] == "specache")
    assert (tmp_path / "needle_baseline.png").exists() and (tmp_path / "needle_specache.png").exists()
    assert (tmp_path / "accuracy_policies.png").exists()  # every policy side by side


def test_a_cut_run_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """Rows are written per cell: a run stopped in its second policy (a time limit, a crash) keeps the first's."""
    from specache_compile.evals import harness

    real = harness.Runner.generate

    def generate(self, ids, n):
        if self.spec != "baseline":
            raise RuntimeError("stopped here")
        return real(self, ids, n)

    monkeypatch.setattr(harness.Runner, "generate", generate)
    out = tmp_path / "accuracy.jsonl"
    try:
        main(["--quick", "--policies", "baseline", "specache", "--out", str(out)])
    except RuntimeError as e:
        assert "stopped here" in str(e)
    else:
        raise AssertionError("the patched runner should have stopped the run")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 2 contexts x (needle + passkey at 3 depths, agreement, attention error, hit rate, forced agreement) of the
    # baseline only
    assert len(rows) == 2 * (2 * 3 + 4) and {r["policy"] for r in rows} == {"baseline"}
    assert (tmp_path / "needle_baseline.png").exists()


def test_plot_only_draws_the_commits_asked_for(tmp_path, monkeypatch):
    from specache_compile.evals import harness

    out = tmp_path / "accuracy.jsonl"
    rows = []
    for sha, pol, score in (("aaaaaaa1", "specache", 1.0), ("bbbbbbb2", "quant", 0.5), ("bbbbbbb2", "full", 1.0)):
        for ctx in (1024, 2048):
            rows.append({"task": "needle", "policy": pol, "context": ctx, "score": score, "git_sha": sha,
                         "device": "cpu", "model": "m", "kv_compression": None if pol == "full" else 3.0})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    monkeypatch.setattr(harness, "policies_plot", lambda rs, path, title: drawn.append((rs, path, title)))
    assert main(["--plot-only", "--out", str(out)]) == 0  # default: the newest row's commit
    assert {r["policy"] for r in drawn[-1][0]} == {"quant", "full"} and "bbbbbbb" in drawn[-1][2]
    assert drawn[-1][1] == tmp_path / "accuracy_policies.png"
    assert main(["--plot-only", "--out", str(out), "--plot-sha", "aaaaaaa", "bbbbbbb"]) == 0
    assert {r["policy"] for r in drawn[-1][0]} == {"specache", "quant", "full"}
    with pytest.raises(ValueError, match="expected rows of commit"):
        main(["--plot-only", "--out", str(out), "--plot-sha", "ccccccc"])


def test_ruler_suite_rows(tmp_path):
    """--suite ruler on the tiny model: one row per (task, policy, context, depth), the depthless tasks once, each with
    the model, the transformers version and its measured compression; a length a task cannot be made at is a row
    with the reason (common_words needs ~600 tokens on this tokenizer)."""
    out = tmp_path / "accuracy_real.jsonl"
    assert main(["--suite", "ruler", "--tasks", "niah_single_repeat", "common_words", "--contexts", "256",
                 "--depths", "0.5", "--trials", "1", "--policies", "baseline", "quant", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["task"]) for r in rows] == [
        ("baseline", "niah_single_repeat"), ("baseline", "common_words"),
        ("quant", "niah_single_repeat"), ("quant", "common_words")]
    assert all(r["model"] == "specache-tiny" and r["transformers"] and r["suite"] == "ruler" for r in rows)
    needle = [r for r in rows if r["task"] == "niah_single_repeat"]
    assert all(0 <= r["score"] <= 1 and r["answers"] and r["context"] == 256 for r in needle)
    assert needle[0]["kv_compression"] == 1.0 and needle[1]["kv_compression"] > 1.1  # measured per row
    words = [r for r in rows if r["task"] == "common_words"]
    assert all(r["score"] is None and "ask for a longer length" in r["error"] for r in words)


def test_model_names_and_sliding_window_kv_bytes():
    from types import SimpleNamespace

    import torch

    from specache_compile.evals.harness import kv_bytes_full, load_model

    with pytest.raises(ValueError, match="expected 'tiny', one of .*smollm2-135m.* got 'nope'"):
        load_model("nope", torch.float32, "cpu")
    cfg = SimpleNamespace(num_key_value_heads=1, num_attention_heads=4, head_dim=256, hidden_size=640,
                          num_hidden_layers=3, sliding_window=512,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    model = SimpleNamespace(config=cfg, dtype=torch.float32)
    per_token = 2 * 256 * 4
    assert kv_bytes_full(model, 100) == 3 * 100 * per_token
    assert kv_bytes_full(model, 4096) == (512 + 512 + 4096) * per_token  # a sliding layer holds its window only
    assert kv_bytes_full(model, 4096, layers={0, 2}) == (512 + 4096) * per_token  # of the named layers only
