import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier costs (large on a busy 2-core machine); restored after."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
