"""Progress bars: on stderr, only where it is a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterable[T]:
    """Wraps ``iterable`` in a progress bar with an ETA.

    The bar is written to stderr and shown only when stderr is a terminal, so logs,
    notebooks and captured output get no control characters.

    Args:
        iterable: what to iterate over.
        description: the bar's label.
        total: the number of items, when ``iterable`` has no length.
        enabled: False never shows the bar.

    Returns:
        The items of ``iterable``, in order.
    """
    disable = None if enabled else True  # None: tqdm hides the bar off a terminal
    return tqdm(
        iterable,
        desc=description,
        total=total,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
    )
