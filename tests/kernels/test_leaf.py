"""The kernels package is a leaf (graph -> pass -> op -> runtime -> kernels): no module under
specache_compile/kernels imports another part of specache."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "specache_compile" / "kernels"


def _imports(path: Path) -> list[str]:
    """Absolute names of the specache modules ``path`` imports (relative imports resolved from its package)."""
    pkg = ["specache_compile", *path.relative_to(KERNELS.parent).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out += [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [n for n in out if n.split(".")[0] in ("specache_compile", "specache")]


def test_kernels_import_only_kernels():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) > 5
    bad = {str(p.relative_to(KERNELS)): n for p in files for n in _imports(p)
           if not n.startswith("specache_compile.kernels")}
    assert not bad, bad


def test_the_check_sees_an_upward_import(monkeypatch):
    """The resolver on a module two levels down that imports the runtime: named, so the check above can fail."""
    monkeypatch.setattr(Path, "read_text", lambda self: "from ...runtime import runtime\nfrom . import select\n")
    got = _imports(KERNELS / "triton" / "x.py")
    assert got == ["specache_compile.runtime", "specache_compile.kernels.triton.select"]
