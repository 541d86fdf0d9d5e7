"""What the harness's command line asks for reaches the run whether it was started as `specache eval` (argv handed
over) or as `python3 -m specache_compile.evals.harness` (argv None, read from sys.argv): --quick keeps the asked
--policies / --contexts and fills in only what was not given."""

import sys

import pytest

from specache_compile.evals import harness


class _Stop(Exception):
    pass


@pytest.fixture
def seen(monkeypatch):
    """The parsed arguments at the point the run would load the model (nothing is loaded or run)."""
    got = []

    def setup(args):
        got.append(args)
        raise _Stop

    monkeypatch.setattr(harness, "_setup", setup)
    return got


def _run(monkeypatch, argv, as_module):
    if as_module:
        monkeypatch.setattr(sys, "argv", ["harness.py", *argv])
    with pytest.raises(_Stop):
        harness.main(None if as_module else argv)


@pytest.mark.parametrize("as_module", [False, True])
def test_quick_keeps_the_asked_policies(monkeypatch, seen, as_module):
    _run(monkeypatch, ["--quick", "--policies", "full", "quant", "--out", "x.jsonl"], as_module)
    assert seen[-1].policies == ["full", "quant"]
    assert seen[-1].contexts == [320, 640]  # the retrieval --quick grid is its own


@pytest.mark.parametrize("as_module", [False, True])
def test_quick_ruler_keeps_the_asked_policies_and_contexts(monkeypatch, seen, as_module):
    _run(monkeypatch, ["--suite", "ruler", "--quick", "--contexts", "4096", "--policies", "snapkv:budget=400",
                       "--out", "x.jsonl"], as_module)
    assert seen[-1].policies == ["snapkv:budget=400"] and seen[-1].contexts == [4096]
    assert seen[-1].trials == 1 and seen[-1].depths == [0.5]


@pytest.mark.parametrize("as_module", [False, True])
def test_quick_defaults_when_nothing_is_asked(monkeypatch, seen, as_module):
    # sys.argv of the test runner must not leak into a call that hands its own argv over
    monkeypatch.setattr(sys, "argv", ["pytest", "--policies", "leak"])
    _run(monkeypatch, ["--quick", "--out", "x.jsonl"], as_module)
    assert seen[-1].policies == ["baseline", "specache"]
    _run(monkeypatch, ["--suite", "ruler", "--quick", "--out", "x.jsonl"], as_module)
    assert seen[-1].policies == ["baseline", "specache"] and seen[-1].contexts == [1024, 2048]
    _run(monkeypatch, ["--out", "x.jsonl"], as_module)
    assert seen[-1].policies == harness.POLICIES and seen[-1].contexts == harness.CONTEXTS
