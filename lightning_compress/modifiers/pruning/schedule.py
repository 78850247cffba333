"""Sparsity schedules for gradual pruning (Zhu & Gupta, 2017)."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["INDEX_TOLERANCE", "INTER_FUNCS", "interpolate_sparsity", "update_point"]

INTER_FUNCS = ("cubic", "linear")
# Tolerance for schedule indices, which may be fractional epochs (0.3 / 0.1 < 3 in floats).
INDEX_TOLERANCE = 1e-9


def interpolate_sparsity(
    current: float,
    start: float,
    end: float,
    init: float,
    final: float,
    inter_func: Literal["cubic", "linear"] = "cubic",
) -> float:
    """The target sparsity at ``current`` on the way from ``init`` (at start) to ``final``.

    ``cubic`` is the gradual pruning schedule of Zhu & Gupta (2017),
    ``s = final + (init - final) * (1 - progress) ** 3``: it prunes fast while many
    redundant weights remain and slowly near the end. ``linear`` moves at a constant rate.
    ``current`` is clamped to ``[start, end]``, so the result is exactly ``init`` up to
    ``start`` and exactly ``final`` from ``end`` on.

    Args:
        current: the schedule index (step, or fractional epoch).
        start: the index where the schedule starts.
        end: the index where ``final`` is reached.
        init: the sparsity at ``start``.
        final: the sparsity at ``end``.
        inter_func: ``"cubic"`` or ``"linear"``.

    Returns:
        The target sparsity.

    Raises:
        ValueError: for an unknown ``inter_func``.
    """
    if inter_func not in INTER_FUNCS:
        raise ValueError(f"inter_func: expected one of {list(INTER_FUNCS)}, got {inter_func!r}")
    if current >= end - INDEX_TOLERANCE:
        return final
    if current <= start + INDEX_TOLERANCE:
        return init
    remaining = 1.0 - (current - start) / (end - start)
    if inter_func == "cubic":
        remaining = remaining**3
    return final + (init - final) * remaining


def update_point(current: float, start: float, end: float, update: float | None) -> float:
    """The latest point of the update grid at or before ``current``.

    Masks change only on the grid ``start``, every multiple of ``update`` between ``start``
    and ``end``, and ``end``; in between, the schedule holds the value of the last point.
    So the target at any index is a function of that index alone, and a run resumed at
    any step recomputes what an uninterrupted run holds there.

    Args:
        current: the schedule index.
        start: the first point.
        end: the last point.
        update: the interval between points; None or 0 makes every index a point.

    Returns:
        The grid point, within ``[start, end]``.
    """
    if current >= end - INDEX_TOLERANCE:
        return end
    if not update:
        return max(current, start)
    point = math.floor(current / update + INDEX_TOLERANCE) * update
    return min(max(point, start), end)
