"""``specache bench decode|kernels|memory``: the benchmark scripts of bench/, run in this process with a progress bar.

Each script keeps its own flags (``specache bench decode --help`` is ``python3 bench/decode.py --help``), rows
(bench/results/*.jsonl, each row's ``repro`` the script's command line) and plots; the bar advances as each row is
written and names the last one. The scripts live in the repository, next to the package: an editable install
(``pip install -e .``) of a clone has them.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    module: str  # bench.<name>, imported with the repository root on sys.path
    about: str
    needs_cuda: bool


BENCHES: dict[str, Bench] = {
    "decode": Bench("bench.decode", "decode step time, tok/s and KV bytes per method and context (CPU: --tiny)",
                    needs_cuda=False),
    # bench/kernel_bench.py, not kernels.py: a script's folder comes first on sys.path, where a kernels.py would
    # shadow the `kernels` package that transformers imports when it is installed
    "kernels": Bench("bench.kernel_bench", "specache's GPU kernels against SDPA and the copy peaks (CUDA)",
                     needs_cuda=True),
    "memory": Bench("bench.memory", "device memory around prefill, full cache and specache (CUDA)", needs_cuda=True),
}


def run(name: str, argv: list[str]) -> int:
    """Run the benchmark script's main with ``argv``; ValueError (expected, got, fix) where it cannot run here."""
    spec = BENCHES[name]
    script = REPO / (spec.module.replace(".", "/") + ".py")
    if not script.is_file():
        raise ValueError(f"specache bench {name}: expected the benchmark script {script}, got no such file (the "
                         "scripts are in the repository, not in a wheel); fix: run from a clone installed with "
                         "pip install -e .")
    asks_help = any(a in ("-h", "--help") for a in argv)
    if spec.needs_cuda and not asks_help and not torch.cuda.is_available():
        raise ValueError(f"specache bench {name}: expected a CUDA device (it times GPU kernels and memory), got "
                         f"none visible to torch {torch.__version__}; fix: run it on a GPU machine, or "
                         "specache bench decode --tiny on this one")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(spec.module)
    old_argv = sys.argv
    # the rows' repro field is the script's own command line (bench.common.repro_command reads sys.argv)
    sys.argv = [f"bench/{name}.py", *argv]
    try:
        if asks_help:
            return _call(module, argv)
        return _with_progress(name, module, argv)
    finally:
        sys.argv = old_argv


def _call(module, argv: list[str]) -> int:
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse's --help and its errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return 0 if rc is None else rc


def _with_progress(name: str, module, argv: list[str]) -> int:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    original = module.write_rows  # the script's own `from bench.common import write_rows`
    with Progress(SpinnerColumn(), TextColumn("[bold]bench {task.fields[bench]}[/]: {task.completed:.0f} row(s)"),
                  BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        bar = progress.add_task("starting", total=None, bench=name)

        def counted(file_name, rows):
            paths = original(file_name, rows)
            last = rows[-1] if rows else {}
            what = " ".join(str(last[k]) for k in ("method", "kernel", "context", "batch") if last.get(k) is not None)
            progress.update(bar, advance=len(rows), description=f"last: {what}" if what else "")
            return paths

        module.write_rows = counted
        try:
            return _call(module, argv)
        finally:
            module.write_rows = original
