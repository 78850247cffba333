"""Shared fixtures."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from helpers import TwoLayer

if TYPE_CHECKING:
    from notebook_runs import NotebookRuns

# A process forked from the test process (a DDP rank: ``ddp_fork``, tests/forked_ranks.py) must
# not finalize what the parent left for the garbage collector: a gloo process group of an earlier
# test, collected in the child, joins threads by ids that the child's own process group threads
# may reuse, and waits for ever. Frozen objects are never collected.
os.register_at_fork(after_in_child=gc.freeze)


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


@pytest.fixture(autouse=True, scope="session")
def notebook_runs(request, tmp_path_factory) -> Iterator[NotebookRuns | None]:
    """The notebooks the selected tests check, executing in the background from the start.

    A test marked ``@pytest.mark.notebook("NAME.ipynb")`` checks that notebook's outputs; the
    session runs the selected ones on the core the main pass leaves idle (``notebook_runs.py``).
    """
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    paths = [
        notebooks / marker.args[0]
        for item in request.session.items
        if (marker := item.get_closest_marker("notebook")) is not None and marker.args
    ]
    if not paths:
        yield None
        return
    from notebook_runs import NotebookRuns

    runs = NotebookRuns(paths, tmp_path_factory.mktemp("notebooks"))
    yield runs
    runs.stop()


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
