"""Run a kernel test module's cases under Triton's interpreter in child processes, and merge what they saved.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported, and setting it for the whole session would slow
every other test, so each module's cases run in children: each imports the module and calls its
``_run_interpreted(path, shard, shards)``, which runs every ``shards``-th case and saves a dict of result dicts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]  # the repo root: `import specache_compile` without installing
HERE = Path(__file__).resolve().parent  # tests/kernels: the test modules (and tests/ for numerics)


def run_interpreted(module: str, tmp: Path, keys: tuple[str, ...], shards: int | None = None,
                    timeout: int = 900) -> dict[str, dict]:
    """Every case of ``module`` through the interpreted kernels, in ``shards`` children (default: one per two cores,
    up to 4: the interpreter is single-threaded numpy). Fails the test with the child's stderr if one fails."""
    if shards is None:
        shards = max(1, min(4, (os.cpu_count() or 1) // 2))
    code = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3], sys.argv[3] + '/..']; "
            f"import {module} as t; t._run_interpreted(sys.argv[1], int(sys.argv[4]), int(sys.argv[5]))")
    # CUDA hidden: the interpreter runs on CPU tensors and must not touch a GPU another test is using. TRITON_DEBUG
    # off: device asserts compiled out, as on the GPU by default.
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEBUG": "0", "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for i in range(shards):
        argv = [sys.executable, "-c", code, str(tmp / f"{i}.pt"), str(ROOT), str(HERE), str(i), str(shards)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results: dict[str, dict] = {key: {} for key in keys}
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{module}: interpreted run {i} of {shards} failed (rc {proc.returncode}):\n{err[-6000:]}")
        part = torch.load(tmp / f"{i}.pt", weights_only=False)
        for key in results:
            results[key].update(part.get(key, {}))  # a key only some shards fill
    return results
