"""Evaluation tasks for long-context retrieval (needle, passkey, associative recall) and the text they draw on."""

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
    "TASKS",
    "CorpusFiller",
    "Encoder",
    "RepeatFiller",
    "Task",
    "build_corpus",
    "kv_recall",
    "load_corpus",
    "needle",
    "passkey",
    "split_documents",
]
