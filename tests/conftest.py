import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `import specache` without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: shared helpers (hf_models, numerics)

TINY = Path(__file__).resolve().parents[1] / "models" / "specache-tiny"  # the shipped trained model


def pytest_configure(config):
    # Under pytest-xdist (-n N) each worker gets its share of the cores: N workers with torch's default of one
    # intra-op thread per core would spin 2N threads on N cores, slower than one worker alone.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles from scratch: a recompile limit hit by an earlier test would make a later one silently run
    # eagerly (and pass for the wrong reason).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_thread():
    # tiny per-step tensors: one intra-op thread is faster than two spinning on a 2-core box (the policy and runtime
    # suites use it for every test, through their conftest.py)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model():
    """models/specache-tiny in float32, loaded once per process. Shared: a test compiles copy.deepcopy(tiny_model),
    never the fixture itself (specache.compile works in place)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
