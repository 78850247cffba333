"""Runs model-free tasks in this process or in a pool of spawned worker processes."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

__all__ = ["run_all"]


def run_all(
    function: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int
) -> Iterator[tuple[int, Any]]:
    """Yields ``(index, function(*calls[index]))`` for every call, as each finishes.

    With ``workers > 1`` the calls run in that many spawned processes (each with an equal
    share of this machine's CPU threads); the first error cancels the calls not yet started
    and is raised here once the running ones are done.

    Args:
        function: a module-level function (spawned workers import it).
        calls: the arguments of each call.
        workers: how many processes run calls at once; 1 runs them here, in order.

    Yields:
        Each call's index and result.

    Raises:
        ValueError: when ``workers`` is not a positive int.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int, got {workers!r}")
    if workers == 1 or len(calls) <= 1:
        for index, args in enumerate(calls):
            yield index, function(*args)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _limit_threads, (threads,)) as pool:
        pending: dict[Future, int] = {pool.submit(function, *a): i for i, a in enumerate(calls)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    index = pending.pop(future)
                    yield index, future.result()
        finally:
            for future in pending:
                future.cancel()


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)
