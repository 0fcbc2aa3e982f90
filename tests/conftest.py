"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny models and run two xdist workers on 2 cores: one intra-op thread each is
    faster than oversubscribed OpenMP threads. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
