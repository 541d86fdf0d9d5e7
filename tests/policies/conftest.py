import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: one intra-op thread, Dynamo reset around every test
    yield
