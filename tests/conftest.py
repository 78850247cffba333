"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from helpers import TwoLayer


@pytest.fixture
def model() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tests use tiny tensors: on a shared 2-core machine, extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
