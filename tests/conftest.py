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


@pytest.fixture(params=["fused", "pytorch"])
def hat_kernels(request):
    """Run a test on both paths of a HAT layer's vector work: the fused CPU kernels (skipped where they
    cannot be built) and the PyTorch operations."""
    from avalanche_hat.mechanism import fused

    if request.param == "pytorch":
        with fused.disabled():
            yield request.param
        return
    if not fused.build():
        pytest.skip("the fused CPU kernels cannot be built here")
    yield request.param
