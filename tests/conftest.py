"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Two cores shared by several jobs: one thread is several times faster (and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
