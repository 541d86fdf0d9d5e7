import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # tiny per-step tensors: one intra-op thread is faster than two spinning on a 2-core box (tests/conftest.py resets
    # Dynamo around every test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
