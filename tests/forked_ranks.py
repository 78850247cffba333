"""Run a function as the ranks of one Lightning run, in processes forked from the test's.

Lightning's ``ddp`` and ``ModelParallelStrategy`` (FSDP2) start the other ranks by running the
calling script again, which imports torch, Lightning and transformers once more: seconds of CPU
per rank, more than a tiny model's training (``ddp_fork`` avoids it, for DDP only). Here each
rank is a fork of the test process, everything already imported, given the environment of a run
whose processes were launched from outside (``LOCAL_RANK``, ``WORLD_SIZE``, ...), so Lightning
starts none: the Trainer's strategy sets up its process group with the other forks.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from lightning.fabric.plugins.environments.lightning import find_free_network_port


def run_ranks(target: Callable[..., Any], *args: Any, ranks: int = 2, timeout: float = 300) -> None:
    """Call ``target(*args)`` in ``ranks`` forked processes, the ranks of one run.

    Args:
        target: what each rank runs (builds its Trainer, fits); its return value is dropped.
        *args: the arguments of ``target``.
        ranks: the number of processes.
        timeout: seconds the ranks may take together.

    Raises:
        AssertionError: when a rank fails (its traceback goes to stderr) or the ranks do not
            end within ``timeout``; the ranks still running are killed then.
    """
    port = str(find_free_network_port())
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(
            target=_as_rank,
            args=(rank, ranks, port, target, args),
            name=f"rank {rank}",
        )
        for rank in range(ranks)
    ]
    for process in processes:
        process.start()
    try:
        deadline = time.monotonic() + timeout
        running = list(processes)
        while running:
            ended = wait([p.sentinel for p in running], timeout=max(deadline - time.monotonic(), 0))
            assert ended, f"the ranks did not end within {timeout:.0f} s"
            for process in [p for p in running if p.sentinel in ended]:
                process.join()
                running.remove(process)
                assert process.exitcode == 0, (
                    f"{process.name} ended with exit code {process.exitcode} (see its stderr)"
                )
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()


def _as_rank(rank: int, ranks: int, port: str, target: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        WORLD_SIZE=str(ranks),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
    )
    target(*args)
