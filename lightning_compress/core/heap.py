"""Giving the process's freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from loguru import logger

__all__ = ["return_free_heap"]


def return_free_heap() -> bool:
    """Returns the C heap's free pages to the operating system (glibc's ``malloc_trim``).

    PyTorch's CPU tensors live on the C heap. After many tensors of varied sizes are freed
    (a model's blocks read, calibrated and freed one after another), glibc keeps much of their
    memory: it raises its threshold for giving large allocations their own mapping as they are
    freed, so later ones come from the heap, and the heap's free pages between live allocations
    stay resident. Resident memory then grows with each block although nothing holds it. This
    gives those pages back, so what is resident is what is in use.

    Returns:
        True when the heap was trimmed; False where the C library has no ``malloc_trim``
        (not glibc: musl, macOS, Windows), which is logged once.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        logger.info(
            "the C library ({}) has no malloc_trim: memory freed between blocks may stay "
            "resident until the allocator reuses it",
            name,
        )
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
