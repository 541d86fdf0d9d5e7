"""The real-model report: cells read from rows (each task once, the newest commit's rows), budgets folded into one
line per method, the table and the figure drawn from the same cells."""

import json

from specache_compile.evals import report


def _row(policy, ctx, task, score, sha="aaaaaaa", depth=0.5, comp=None, model="m"):
    return {"suite": "ruler", "model": model, "policy": policy, "context": ctx, "task": task, "depth": depth,
            "score": score, "trials": 1, "kv_compression": comp, "git_sha": sha, "device": "cpu"}


def _rows():
    rows = []
    for ctx in (1024, 4096):
        rows += [_row("baseline", ctx, "a", 1.0, comp=1.0), _row("baseline", ctx, "b", 0.0, comp=1.0)]
        # two depths of one task and one of the other: the task means are averaged, not the prompts
        rows += [_row(f"snapkv:budget={ctx // 4}", ctx, "a", 1.0, depth=0.2, comp=4.0),
                 _row(f"snapkv:budget={ctx // 4}", ctx, "a", 0.0, depth=0.8, comp=4.0),
                 _row(f"snapkv:budget={ctx // 4}", ctx, "b", 1.0, comp=4.0)]
    rows.append(_row("baseline", 1024, "only_1k", 1.0))  # not at every context: left out by default
    return rows


def test_cells_fold_budgets_and_average_tasks():
    rows = _rows()
    assert report.common_tasks(rows, "m") == ["a", "b"]
    got = report.cells(rows, "m", ["a", "b"])
    assert set(got) == {("full cache", 1024), ("full cache", 4096), ("snapkv", 1024), ("snapkv", 4096)}
    assert got[("snapkv", 4096)]["score"] == 0.75 and got[("snapkv", 4096)]["prompts"] == 3
    assert got[("snapkv", 4096)]["compression"] == 4.0
    assert got[("full cache", 1024)]["score"] == 0.5
    assert report.method("specache:bits=1,budget=3") == "specache:bits=1"


def test_a_newer_commit_replaces_the_older_rows_of_its_cells():
    rows = [*_rows(), _row("baseline", 4096, "a", 0.0, sha="bbbbbbb", comp=1.0),
            _row("baseline", 4096, "b", 0.0, sha="bbbbbbb", comp=1.0)]
    got = report.cells(rows, "m", ["a", "b"])
    assert got[("full cache", 4096)]["score"] == 0.0 and got[("full cache", 4096)]["shas"] == ["bbbbbbb"]
    assert got[("full cache", 1024)]["score"] == 0.5


def test_main_writes_the_table_and_a_figure_per_model(tmp_path, capsys):
    path = tmp_path / "accuracy_real.jsonl"
    rows = [*_rows(), *(_row("baseline", 4096, "a", 1.0, model="g") for _ in range(1))]
    rows.append({"suite": "ruler", "model": "m", "task": "a", "score": None, "error": "too short"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.main(["--rows", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| m | 1K | 4K |" in out and "| snapkv | 0.75 (3), 4.0x | 0.75 (3), 4.0x |" in out
    assert "| full cache | 0.50 (2) | 0.50 (2) |" in out
    assert (tmp_path / "accuracy_real_m.png").exists() and (tmp_path / "accuracy_real_g.png").exists()


def test_same_counts_outputs_equal_to_the_full_cache_s_on_the_same_prompt():
    rows = [{**_row("baseline", 1024, "a", 1.0, depth=d), "output": f"out {d}"} for d in (0.2, 0.8)]
    rows += [{**_row("quant", 1024, "a", 0.0, depth=0.2), "output": "out 0.2"},
             {**_row("quant", 1024, "a", 0.0, depth=0.8), "output": "other"}]
    got = report.cells(rows, "m", ["a"])
    assert got[("quant", 1024)]["same"] == 0.5 and got[("full cache", 1024)]["same"] == 1.0
    assert "0.00 (2), 50% same" in report.table(rows, "m", ["a"])


def test_a_later_budget_of_one_method_is_its_cell():
    rows = [*_rows(), _row("snapkv:budget=9", 4096, "a", 0.0, comp=9.0), _row("snapkv:budget=9", 4096, "b", 0.0,
                                                                                comp=9.0)]
    got = report.cells(rows, "m", ["a", "b"])
    assert got[("snapkv", 4096)]["compression"] == 9.0 and got[("snapkv", 4096)]["score"] == 0.0


def test_devices_get_tables_and_figures_of_their_own(tmp_path, capsys):
    """CPU float32 rows and GPU bfloat16 rows never share a cell: each device has its own table and figure."""
    path = tmp_path / "accuracy_real.jsonl"
    gpu = [{**r, "device": "NVIDIA H200", "score": 0.0} for r in _rows()]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*_rows(), *gpu]))
    assert report.main(["--rows", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "m on cpu:" in out and "m on NVIDIA H200:" in out
    assert "| full cache | 0.50 (2) | 0.50 (2) |" in out and "| full cache | 0.00 (2) | 0.00 (2) |" in out
    assert (tmp_path / "accuracy_real_m.png").exists() and (tmp_path / "accuracy_real_m_h200.png").exists()
    assert report.main(["--rows", str(path), "--devices", "cpu", "--no-figures"]) == 0
    assert "H200" not in capsys.readouterr().out
