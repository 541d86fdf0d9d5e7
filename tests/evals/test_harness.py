"""`specache eval --quick` on CPU with the shipped model: the full-cache model must find the needle."""

import json

from specache_compile.evals.harness import main, parse_policy


def test_parse_policy():
    assert parse_policy("specache:bits=1,topk=32,lowbit_remainder=false") == (
        "specache", {"bits": 1, "topk": 32, "lowbit_remainder": False})
    assert parse_policy("baseline") == ("baseline", {})


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
