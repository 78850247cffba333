"""Giving the process's freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from loguru import logger

__all__ = ["MMAP_THRESHOLD", "map_large_allocations", "return_free_heap"]

MMAP_THRESHOLD = 128 * 1024
"""Bytes from which glibc gives an allocation its own mapping (its initial default)."""
_M_MMAP_THRESHOLD = -3


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
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True


def map_large_allocations() -> bool:
    """Makes every allocation of at least :data:`MMAP_THRESHOLD` bytes get its own mapping,
    returned to the operating system when freed (glibc's ``mallopt(M_MMAP_THRESHOLD)``).

    By default glibc raises that threshold (up to 32 MiB) each time such a mapping is freed,
    so a layer's statistics and temporaries soon come from the heap, where what is freed
    between live allocations stays resident: the peak of calibrating one block then drifts
    upwards from block to block. A fixed threshold keeps it at what the block uses. This holds
    for the rest of the process (glibc has no way back to the moving threshold).

    Returns:
        True when the threshold was set; False where the C library has no ``mallopt`` (not
        glibc), which is logged once.
    """
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


@functools.cache
def _libc_function(name: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError, TypeError):
        logger.info(
            "the C library ({}) has no {}: memory freed between blocks may stay resident "
            "until the allocator reuses it",
            library,
            name,
        )
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function
