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


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A one-process gloo group and its device mesh: ``DTensor``s of one shard each."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
