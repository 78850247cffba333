"""Progress: bars on stderr (only where it is a terminal), and a log line per finished block."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from typing import TypeVar
from weakref import WeakSet

from loguru import logger
from tqdm import tqdm

__all__ = ["BlockProgress", "format_duration", "progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T],
    description: str,
    total: int | None = None,
    enabled: bool = True,
    unit: str = "it",
) -> Iterable[T]:
    """Wraps ``iterable`` in a progress bar with an ETA.

    The bar is written to stderr and shown only when stderr is a terminal, so logs,
    notebooks and captured output get no control characters. Off a terminal no bar is made
    at all. A bar takes a lock; tqdm's own is shared with forked processes, so one killed
    while holding it (a save's child, a worker) would leave it locked for ever: these bars
    take a lock of their own process (:class:`_Bar`).

    Args:
        iterable: what to iterate over.
        description: the bar's label.
        total: the number of items, when ``iterable`` has no length.
        enabled: False never shows the bar.
        unit: what an item is, for the rate (``s/block``).

    Returns:
        The items of ``iterable``, in order.
    """
    if not enabled or not _is_terminal(sys.stderr):
        return iterable
    return _Bar(
        iterable, desc=description, total=total, file=sys.stderr, dynamic_ncols=True, unit=unit
    )


class _Bar(tqdm):
    """A tqdm bar whose lock and list of bars are this process's alone (a thread lock, not
    tqdm's shared multiprocessing one)."""

    _lock = threading.RLock()
    _instances: WeakSet = WeakSet()


def _is_terminal(stream: object) -> bool:
    """Whether ``stream`` is an open terminal (tqdm's test for showing a bar)."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """A duration for people: ``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``.

    Args:
        seconds: the duration (>= 0).

    Returns:
        The text.
    """
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class BlockProgress:
    """Counts finished blocks and logs, for each, its time, the mean time per block and the
    estimated time left (the mean so far times the blocks left), at loguru INFO.

    Args:
        total: the blocks of the whole run.
        done: blocks finished before this run started (a resumed run), not timed.
        enabled: False logs nothing (e.g. on ranks other than zero).
    """

    def __init__(self, total: int, done: int = 0, enabled: bool = True) -> None:
        self.total = total
        self.done = done
        self.enabled = enabled
        self._seconds: list[float] = []

    @property
    def seconds_per_block(self) -> float | None:
        """The mean time of the blocks finished in this run, or None before the first."""
        return sum(self._seconds) / len(self._seconds) if self._seconds else None

    @property
    def seconds_left(self) -> float | None:
        """The estimated time until the last block is done, or None before the first."""
        mean = self.seconds_per_block
        return None if mean is None else mean * (self.total - self.done)

    def block_done(self, name: str, seconds: float) -> None:
        """Records a finished block and logs the progress line.

        Args:
            name: the block's name.
            seconds: how long it took.
        """
        self.done += 1
        self._seconds.append(seconds)
        if not self.enabled:
            return
        logger.info(
            "Block {}/{} ({}) done in {}; {} per block, about {} left",
            self.done,
            self.total,
            name,
            format_duration(seconds),
            format_duration(self.seconds_per_block),
            format_duration(self.seconds_left),
        )
