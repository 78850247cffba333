"""Lightning's informational messages held back while lightning-compress runs a Trainer."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_compress.core.verbosity import shows_details

__all__ = ["LIGHTNING_LOGGERS", "quiet_lightning"]

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
"""The Python loggers of Lightning's startup and device messages (``GPU available``, ``TPU
available``, the logging-service tip, ``LOCAL_RANK ... CUDA_VISIBLE_DEVICES``)."""
TREESPEC_DEPRECATION = r".*isinstance\(treespec, LeafSpec\)"
"""A deprecation warning that Lightning's own use of torch's pytree API raises on every
run; nothing the user can change."""


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Raises Lightning's loggers to WARNING inside the block, and restores their levels after.

    Lightning's warnings and errors still show. Nothing changes at the ``debug`` verbosity
    (``lightning_compress.set_verbosity("debug")``).
    """
    if shows_details():
        yield
        return
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [item.level for item in loggers]
    try:
        for item in loggers:
            if item.getEffectiveLevel() < logging.WARNING:
                item.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TREESPEC_DEPRECATION)
            yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)
