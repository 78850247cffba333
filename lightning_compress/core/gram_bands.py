"""An input Hessian's sum kept as its upper triangle's row bands: the layout, and its memory.

``HessianAccumulator`` (``modifiers/hessian.py``) keeps ``S = sum(x x^T)`` as the row bands of
its upper triangle, band ``i`` holding rows ``[start, start + width)`` and the columns from
``start`` on, each a tensor of its own; the pipelines count a stage's statistics with
:func:`accumulator_bytes`.
"""

from __future__ import annotations

import torch

__all__ = ["GRAM_BAND", "accumulator_bytes", "band_width"]

GRAM_BAND = 192
"""Rows per band of the upper-triangular batch products."""


def band_width(in_features: int) -> int:
    """Rows per band: bands of :data:`GRAM_BAND` once there are two (each band is multiplied
    only against the columns from its first one on, which skips most of the lower triangle);
    narrower inputs take one band, the square.

    Args:
        in_features: the layer's input size.

    Returns:
        The rows of every band but maybe the last.
    """
    return in_features if in_features < 2 * GRAM_BAND else GRAM_BAND


def accumulator_bytes(
    in_features: int, dtype: torch.dtype = torch.float64, rows: torch.dtype = torch.float32
) -> int:
    """The bytes an accumulator holds once it has seen a batch: the bands, and the buffers of
    one band's batch product (in the rows' dtype, then converted; none when the rows are
    already in ``dtype``).

    Args:
        in_features: the layer's input size.
        dtype: the accumulation dtype.
        rows: the dtype of the inputs' rows (at least float32).

    Returns:
        The bytes.
    """
    width = band_width(in_features)
    entries = sum(
        min(width, in_features - start) * (in_features - start)
        for start in range(0, in_features, width)
    )
    buffers = 0 if rows == dtype else width * in_features
    sum_bytes, row_bytes = (torch.empty(0, dtype=t).element_size() for t in (dtype, rows))
    return sum_bytes * (entries + buffers) + row_bytes * buffers
