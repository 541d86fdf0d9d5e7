"""Evaluation tasks for long-context retrieval (needle, passkey, associative recall), the RULER-style suite
(:mod:`specache_compile.evals.ruler`), and the text they draw on."""

from specache_compile.evals.ruler import RULER, RulerTask
from specache_compile.evals.tasks import (
    TASKS,
    CorpusFiller,
    Encoder,
    RepeatFiller,
    Task,
    build_corpus,
    kv_recall,
    load_corpus,
    needle,
    passkey,
    split_documents,
)

__all__ = [
    "RULER",
    "TASKS",
    "CorpusFiller",
    "Encoder",
    "RepeatFiller",
    "RulerTask",
    "Task",
    "build_corpus",
    "kv_recall",
    "load_corpus",
    "needle",
    "passkey",
    "split_documents",
]
