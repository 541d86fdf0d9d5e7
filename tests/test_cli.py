"""The ``specache`` command: its help, its one-line errors (exit code 2), the demo's table and the bench subcommand."""

from __future__ import annotations

import argparse
import json
import re
import sys

import pytest
import torch

from specache_compile import cli, demo


def _fails(capsys, *argv: str) -> str:
    """Run the command; it must exit 2 with one line on stderr, nothing on stdout; returns that line."""
    assert cli.main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out.strip() == "", out  # (a progress display that stopped may leave a newline)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _says(line: str, *parts: str) -> None:
    for part in ("expected", "got", "fix:", *parts):
        assert part in line, (part, line)


# ----------------------------------------------------------------------------------------------------------------------
# errors: one line, exit code 2
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_policy(capsys):
    line = _fails(capsys, "demo", "--policy", "specash")
    _says(line, "--policy", "'specash'", "kcache", "specache")


def test_missing_model_folder(capsys, tmp_path):
    line = _fails(capsys, "demo", "--model", str(tmp_path / "nowhere"))
    _says(line, "--model", "no such folder", "transformers model folder")
    assert "Repo id" not in line  # not the hub's complaint about a name


def test_model_folder_without_config(capsys, tmp_path):
    line = _fails(capsys, "demo", "--model", str(tmp_path))
    _says(line, "without config.json")


def test_real_model_not_installed(capsys, monkeypatch):
    from specache_compile import models

    monkeypatch.setattr(models, "available", lambda name: False)
    line = _fails(capsys, "demo", "--model", "smollm2-135m")
    _says(line, "not installed", "python3 -m specache_compile.models fetch smollm2-135m")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_cuda_without_cuda(capsys):
    line = _fails(capsys, "demo", "--device", "cuda")
    _says(line, "--device", "'cuda'", "--device cpu")
    assert "AssertionError" not in line


def test_unknown_device(capsys):
    _says(_fails(capsys, "demo", "--device", "tpu"), "cpu, cuda or cuda:N", "'tpu'")


@pytest.mark.parametrize("flag,value", [("--context", "0"), ("--context", "-5"), ("--context", "2k"),
                                        ("--new-tokens", "0"), ("--topk", "0")])
def test_counts_must_be_positive(capsys, flag, value):
    line = _fails(capsys, "demo", flag, value)
    _says(line, flag, f"got {value!r}", "an integer > 0")


def test_context_longer_than_the_model_takes(capsys):
    line = _fails(capsys, "demo", "--model", "tiny", "--context", "100000")
    _says(line, "4096 positions", "--context")


def test_unknown_command_and_benchmark(capsys):
    _says(_fails(capsys, "demp"), "expected one of 'demo', 'eval', 'bench', got 'demp'")
    _says(_fails(capsys, "bench", "decoed"), "got 'decoed'", "'decode'")
    _says(_fails(capsys, "demo", "--dtype", "f8"), "expected one of 'float32'", "got 'f8'")
    _says(_fails(capsys, "bench"), "expected BENCHMARK, got none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
@pytest.mark.parametrize("name", ["kernels", "memory"])
def test_gpu_benchmarks_without_cuda(capsys, name):
    _says(_fails(capsys, "bench", name), "CUDA device", f"specache bench {name}")


def test_eval_refusals_are_one_line(capsys):
    _says(_fails(capsys, "eval", "--model", "/no/such/model"), "--model", "'/no/such/model'")
    _says(_fails(capsys, "eval", "--inner", "None"), "specache eval", "expected one of 'auto'", "got 'None'")
    _says(_fails(capsys, "eval", "--trials", "x"), "specache eval", "--trials", "'x'")
    import argparse

    assert argparse.ArgumentParser.error is not None and "specache" not in argparse.ArgumentParser.error.__qualname__


# ----------------------------------------------------------------------------------------------------------------------
# help
# ----------------------------------------------------------------------------------------------------------------------


def test_version(capsys):
    from specache_compile import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"specache {__version__}")


def test_top_level_help_is_plain_and_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out  # no RST markup
    for cmd in ("demo", "eval", "bench", "--version"):
        assert re.search(rf"^\s+{re.escape(cmd)}\s+\S", out, re.M), (cmd, out)


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, action


def test_every_flag_has_help_and_no_none_choice():
    seen = 0
    for prog, action in _actions(cli._parser()):
        if not action.option_strings:
            continue
        seen += 1
        assert action.help, (prog, action.option_strings)
        assert None not in (action.choices or ()), (prog, action.option_strings)
    assert seen >= 10


def test_demo_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--context", "2048"), ("--new-tokens", "16"), ("--policy", "specache"),
                          ("--dtype", "float32")):
        assert re.search(rf"{flag} .*?\(default: {default}\)", out), (flag, out)
    assert "default: None" not in out


# ----------------------------------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------------------------------


def test_model_choice_falls_back_to_tiny_and_says_so(monkeypatch):
    from specache_compile import models

    monkeypatch.setattr(models, "available", lambda name: False)
    name, note = demo.pick_model(None)
    assert name == "tiny" and "not installed" in note and "fetch smollm2-135m" in note
    monkeypatch.setattr(models, "available", lambda name: name == "smollm2-135m")
    assert demo.pick_model(None) == ("smollm2-135m", None)
    assert demo.pick_model("tiny") == ("tiny", None)  # asked for: no note


def test_document_prompt_hides_the_code_and_asks_for_it():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.TINY)
    p = demo.document_prompt(tok, 600)
    text = tok.decode(p.ids[0])
    assert text.count(p.expected) == 1 and f"The secret code of {demo._PERSON} is {p.expected}." in text
    assert text.rstrip().endswith(f"The secret code of {demo._PERSON} is")  # the answer comes next
    assert 560 <= p.doc_tokens <= 620 and p.ids.shape[1] > p.doc_tokens
    assert demo.document_prompt(tok, 600).expected == p.expected  # the same document for the same seed
    assert demo.document_prompt(tok, 600, seed=1).expected != p.expected


@pytest.mark.slow  # ~15 s on 2 cores: the tiny model compiled and run twice over a 1K prompt
def test_demo_table_on_the_tiny_model(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")  # one table row a line
    assert cli.main(["demo", "--model", "tiny", "--context", "1024", "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    dev = re.search(r"KV cache on the device \(CPU\)\s*│\s*([\d.]+) MiB\s*│\s*([\d.]+) (KiB|MiB), ([\d.]+)x smaller",
                    out)
    assert dev, out
    full, ours, unit, ratio = float(dev[1]), float(dev[2]), dev[3], float(dev[4])
    ours_mib = ours / 1024 if unit == "KiB" else ours
    assert ours_mib < full and abs(full / ours_mib - ratio) < 0.1 * ratio
    code = re.search(r"the answer in the document: (\d+)", out)[1]
    assert re.search(rf"answer has the code {code}\s*│\s*yes\s*│\s*yes", out), out  # the tiny model finds it at 1K
    equal = re.search(r"tokens equal to the full cache's\s*│\s*\(the reference\)\s*│\s*(\d+)/(\d+)", out)
    assert equal and int(equal[2]) >= 1 and int(equal[1]) >= int(equal[2]) - 1, out
    assert re.search(r"first token \(prefill\)\s*│\s*[\d.]+ s\s*│\s*[\d.]+ s, compiling included", out), out
    assert "6 found, 6 rewritten by specache, 0 left alone" in out
    assert "[" + ", ".join(["1"] * 3) not in out and not re.search(r"\[\d+, \d+, \d+", out)  # no raw token lists


# ----------------------------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------------------------


def test_bench_help_is_the_scripts(capsys):
    assert cli.main(["bench", "decode", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--contexts" in out and "--tiny" in out


@pytest.mark.slow  # ~25 s: the decode bench's CPU smoke run, two methods at one context
def test_bench_decode_writes_the_scripts_rows(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    # as under the `specache` console script (pytest's __main__ is a module, which repro would name instead)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    out = tmp_path / "decode.jsonl"
    argv = ["--tiny", "--contexts", "64", "--methods", "specache", "full-flash", "--steps", "3", "--warmup", "1",
            "--profile-steps", "0", "--timed-fetch", "0", "--no-plot", "--out", str(out)]
    assert cli.main(["bench", "decode", *argv]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["specache", "full-flash"]
    assert all(r["step_ms"] and not r.get("error") for r in rows), rows
    assert rows[0]["repro"].split()[1:3] == ["bench/decode.py", "--tiny"]  # the script's own command line
