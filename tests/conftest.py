import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `import specache` without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: shared helpers (hf_models, numerics)


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
