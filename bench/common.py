"""What every benchmark row carries: git sha, device, versions, and the exact command line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def git_sha() -> str:
    # the device machine's copy of the tree can carry a stale .git: the sha the caller exports wins
    if os.environ.get("SPECACHE_GIT_SHA"):
        return os.environ["SPECACHE_GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # the device machine gets a copy of the tree without .git history sometimes
        return os.environ.get("SPECACHE_GIT_SHA", "unknown")


def env_fields() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "repro": repro_command(),
    }


def repro_command() -> str:
    """The command line that ran this process, runnable as written: ``python -m pkg.mod ...`` for a module run with
    -m (sys.argv[0] is then the module's file, which run as a script loses its package's relative imports)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name != "__main__" else sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]])


def write_rows(name: str, rows: list[dict]) -> list[Path]:
    """Append rows to bench/results/<name> and, on the device machine, to $OUT/<name> (what comes back)."""
    paths = [RESULTS / name]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return paths
