"""Figures and the README table of the RULER-style rows on real models, read from the rows files.

    python3 -m specache_compile.evals.report                  # one PNG per model, the markdown table on stdout
    python3 -m specache_compile.evals.report --tasks niah_single_essay niah_multikey
    python3 -m specache_compile.evals.report --models smollm2-135m --contexts 1024 2048 --no-figures  # all 9 tasks

A cell is one (model, method, context): the mean over the chosen tasks of each task's mean over its depths and trials
(each task counts once however many prompts it had), with the number of prompts behind it and the KV compression
measured on the device (full-precision KV bytes / device KV bytes). By default the tasks are those every context of
that model ran, so a line across contexts compares like with like. A method is a policy spec with its budget left out
(``snapkv:budget=400`` and ``snapkv:budget=480`` are one line: each grid sets the budget to specache's device bytes at
that context); peer rows (:mod:`specache_compile.evals.peers`: ``kvpress:<press>``,
``hf-quantized-cache:<backend>,nbits=N``, ``transformers:full_cache``; in accuracy_real.jsonl, and the first 1K ones in
``accuracy_real_peers_cpu.jsonl``) are methods of their own.

Rows of different devices never share a cell (CPU float32 and GPU bfloat16 grids differ in dtype and in which tasks
ran): each (model, device) gets its own table and figure, ``accuracy_real_<model>.png`` for CPU rows and
``accuracy_real_<model>_<device>.png`` for a GPU's (``--devices`` picks some).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
LABELS = {"baseline": "full cache"}


def load(paths: list[Path]) -> list[dict]:
    """Every scored RULER row of the files (rows a task could not be made for have no score and are left out)."""
    rows = []
    for p in paths:
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("suite") == "ruler" and r.get("score") is not None:
                    rows.append(r)
    return rows


def method(policy: str) -> str:
    """A policy spec without its budget: the line it belongs to."""
    name, _, rest = policy.partition(":")
    opts = [o for o in rest.split(",") if o and not o.startswith("budget=")]
    return LABELS.get(name, name) + (":" + ",".join(opts) if opts else "")


def common_tasks(rows: list[dict], model: str) -> list[str]:
    """The tasks that every context of ``model`` has rows for (from the full cache's rows: the reference)."""
    mine = [r for r in rows if r["model"] == model and r["policy"] == "baseline"] or [
        r for r in rows if r["model"] == model]
    per: dict[int, set] = {}
    for r in mine:
        per.setdefault(r["context"], set()).add(r["task"])
    sets = list(per.values())
    return sorted(set.intersection(*sets)) if sets else []


def cells(rows: list[dict], model: str, tasks: list[str]) -> dict[tuple[str, int], dict]:
    """(method, context) -> {score, prompts, compression, same, shas}: the newest commit's rows of each policy x
    context. Two budgets of one method at one context (a grid re-run to match specache's bytes): the policy whose rows
    came later in the files is the cell."""
    mine = [r for r in rows if r["model"] == model and r["task"] in tasks]
    # the full cache's text per prompt (a one-trial row is one prompt; seeds follow task, context, depth, trial, so
    # every policy, and the peers, got the same prompt)
    ref = {(r["context"], r["task"], r["depth"]): r.get("output") for r in mine
           if r["policy"] == "baseline" and r.get("trials", 1) == 1}
    newest: dict[tuple[str, int], str] = {}
    for r in mine:  # files are appended in time order: the last sha seen is the newest
        newest[(r["policy"], r["context"])] = r.get("git_sha") or r.get("peer", "")
    out: dict[tuple[str, int], dict] = {}
    for (policy, ctx), sha in newest.items():  # in first-seen order, so a later policy's cell replaces an earlier
        # a 1K/2K grid ran across two commits that compute the same thing: rows of the same policy x context from
        # other commits count only when the newest commit lacks their task
        got = [r for r in mine if r["policy"] == policy and r["context"] == ctx]
        by_task: dict[str, list[dict]] = {}
        for r in got:
            by_task.setdefault(r["task"], []).append(r)
        for t, rs in by_task.items():
            fresh = [r for r in rs if (r.get("git_sha") or r.get("peer", "")) == sha]
            by_task[t] = fresh or [r for r in rs if r.get("git_sha") == rs[-1].get("git_sha")]
        means = [sum(r["score"] for r in rs) / len(rs) for rs in by_task.values()]
        comp = [r["kv_compression"] for rs in by_task.values() for r in rs if r.get("kv_compression")]
        same = [r.get("output") == ref[k] for rs in by_task.values() for r in rs
                if r.get("trials", 1) == 1 and ref.get(k := (ctx, r["task"], r["depth"])) is not None]
        out[(method(policy), ctx)] = {
            "score": sum(means) / len(means),
            "tasks": len(by_task),
            "prompts": sum(r.get("trials", 1) for rs in by_task.values() for r in rs),
            "compression": sum(comp) / len(comp) if comp else None,
            # the share of prompts whose output is the full cache's, character for character (its first 200): far
            # more prompts move it than the score of a model that finds few needles
            "same": sum(same) / len(same) if same else None,
            # peers ran outside the project: no commit of ours
            "shas": sorted({r["git_sha"][:7] if r.get("git_sha") else "peers" for rs in by_task.values() for r in rs}),
        }
    return out


def device_slug(device: str) -> str:
    """The figure's file-name suffix for a device: none for the CPU, its last word lowercased for a GPU
    ("NVIDIA H200" -> "_h200")."""
    return "" if device == "cpu" else "_" + device.split()[-1].lower().replace("/", "-")


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def table(rows: list[dict], model: str, tasks: list[str]) -> str:
    """Markdown: one line per method, one column per context; a cell reads score (prompts), compression, the share of
    outputs equal to the full cache's."""
    got = cells(rows, model, tasks)
    contexts = sorted({c for _, c in got})
    methods = list(dict.fromkeys(m for m, _ in got))
    head = "| " + model + " | " + " | ".join(_ctx(c) for c in contexts) + " |"
    lines = [head, "|---" * (len(contexts) + 1) + "|"]
    for m in methods:
        out = []
        for c in contexts:
            cell = got.get((m, c))
            if cell is None:
                out.append("")
                continue
            comp = f", {cell['compression']:.1f}x" if cell["compression"] and m != "full cache" else ""
            same = f", {cell['same']:.0%} same" if cell["same"] is not None and m != "full cache" else ""
            out.append(f"{cell['score']:.2f} ({cell['prompts']}){comp}{same}")
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], model: str, tasks: list[str], path: Path) -> None:
    """Three panels: the mean score per method against the context and against the measured KV compression, and the
    share of outputs equal to the full cache's against the context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = cells(rows, model, tasks)
    methods = list(dict.fromkeys(m for m, _ in got))
    contexts = sorted({c for _, c in got})
    fig, (left, right, agree) = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for i, m in enumerate(methods):
        xs = [c for c in contexts if (m, c) in got]
        color = colors[i % 20]
        # methods side by side around each context: equal scores (few prompts make many) would hide each other
        nudge = 2 ** (0.025 * (i - len(methods) / 2))
        left.plot([c * nudge for c in xs], [got[(m, c)]["score"] for c in xs], marker="o", color=color, label=m)
        ys = [(c, got[(m, c)]["same"]) for c in xs if got[(m, c)]["same"] is not None]
        agree.plot([c * nudge for c, _ in ys], [y for _, y in ys], marker="o", color=color)
        pts = [(got[(m, c)]["compression"] or 1.0, got[(m, c)]["score"], c) for c in xs]
        right.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.4)
        for x, y, c in pts:
            right.scatter([x], [y], color=color, marker=markers[contexts.index(c) % len(markers)], zorder=3)
    for ax in (left, agree):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [_ctx(c) for c in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
    agree.set_ylabel("share of outputs equal to the full cache's")
    left.set_ylabel(f"mean score over {len(tasks)} tasks")
    right.set_xlabel("KV compression on the device (full-precision KV / device KV)")
    for c in contexts:  # marker legend: which context a point is
        right.scatter([], [], color="gray", marker=markers[contexts.index(c) % len(markers)], label=_ctx(c))
    right.legend(fontsize=7, loc="upper right")
    for ax in (left, right, agree):
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.84, 0.5))
    shas = sorted({s for cell in got.values() for s in cell["shas"]})
    device = sorted({r["device"] for r in rows if r["model"] == model})
    fig.suptitle(f"{model} on {', '.join(device)}, rows of {', '.join(shas)}\ntasks: {', '.join(tasks)}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m specache_compile.evals.report", description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=Path, default=None,
                   help="rows files (default: bench/results/accuracy_real*.jsonl)")
    p.add_argument("--models", nargs="+", default=None, help="default: every model in the rows")
    p.add_argument("--tasks", nargs="+", default=None, help="default: the tasks every context of a model ran")
    p.add_argument("--contexts", nargs="+", type=int, default=None, help="default: every context in the rows")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the figures (accuracy_real_<model>.png)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: every device in the rows (cpu, or a GPU's name as the rows spell it)")
    p.add_argument("--no-figures", action="store_true", help="the table only")
    args = p.parse_args(argv)
    rows = load(args.rows or sorted(RESULTS.glob("accuracy_real*.jsonl")))
    rows = [r for r in rows if args.contexts is None or r["context"] in args.contexts]
    if not rows:
        raise ValueError("specache_compile.evals.report: expected RULER rows in the rows files, got none; fix: run "
                         "specache eval --suite ruler first")
    devices = args.devices or list(dict.fromkeys(r.get("device", "cpu") for r in rows))
    for device in devices:
        mine = [r for r in rows if r.get("device", "cpu") == device]
        for model in args.models or list(dict.fromkeys(r["model"] for r in mine)):
            if not any(r["model"] == model for r in mine):
                continue
            tasks = args.tasks or common_tasks(mine, model)
            print(f"{model} on {device}:\n" + table(mine, model, tasks) + "\n")
            if not args.no_figures:
                figure(mine, model, tasks, args.out / f"accuracy_real_{model}{device_slug(device)}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
