"""How much lightning-compress reports: per-layer metrics and Lightning's own messages.

Libraries should not configure loguru's sinks, and loguru's default sink shows DEBUG, so
the detail is held back here instead: at the default verbosity (``"info"``) the metrics that
session loggers write to loguru below INFO (per-layer quantization errors, sparsities,
seconds) are dropped, and one-shot runs lower Lightning's informational messages (``GPU
available``, ...) to WARNING while they run. Warnings and the end-of-run summary always show.
"""

from __future__ import annotations

__all__ = ["VERBOSITY_LEVELS", "set_verbosity", "shows_details", "verbosity"]

VERBOSITY_LEVELS = ("info", "debug")
"""``info``: warnings, progress bars and summaries; ``debug``: also per-layer metrics (loguru
DEBUG) and Lightning's informational messages."""

_state = {"level": "info"}


def set_verbosity(level: str) -> None:
    """Sets how much lightning-compress reports, for the whole process.

    Args:
        level: ``"info"`` (the default) or ``"debug"`` (per-layer metrics at loguru DEBUG,
            and Lightning's own informational messages during one-shot runs).

    Raises:
        ValueError: for another level.
    """
    if not isinstance(level, str) or level.lower() not in VERBOSITY_LEVELS:
        raise ValueError(f"verbosity: expected one of {list(VERBOSITY_LEVELS)}, got {level!r}")
    _state["level"] = level.lower()


def verbosity() -> str:
    """The current verbosity level (see :data:`VERBOSITY_LEVELS`)."""
    return _state["level"]


def shows_details() -> bool:
    """Whether per-layer metrics and Lightning's informational messages are shown."""
    return _state["level"] == "debug"
