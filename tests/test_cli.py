"""``specache demo`` (the README's main job) on CPU: the shipped model, a short prompt, the side-by-side table."""

from __future__ import annotations

import re

from specache_compile import cli


def test_demo_prints_full_and_specache_side_by_side(capsys):
    assert cli.main(["demo", "--context", "1024", "--new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    rows = {name: re.search(rf"{name}[^\n]*", out) for name in
            ("KV bytes on the model's device", "KV bytes in host memory", "decode step", "greedy tokens equal")}
    assert all(rows.values()), out
    full_dev, spec_dev = re.findall(r"([\d.]+) (?:KiB|MiB)", rows["KV bytes on the model's device"].group())
    # the point of it: fewer KV bytes where the model runs (at 256 tokens the fixed buffers outweigh the cache)
    assert float(spec_dev) < float(full_dev)
    # the full cache's column is n/n by construction; specache's is the comparison (1.00 at 1K on this model)
    cells = [int(a) for a, _ in re.findall(r"(\d+)/(6)", rows["greedy tokens equal"].group())]
    assert len(cells) == 2 and cells[1] >= 4, rows["greedy tokens equal"].group()
    assert re.search(r"\d+\.\d ms\s.*\d+\.\d ms", rows["decode step"].group())
    assert "found 6, rewritten 6, left alone 0" in out
