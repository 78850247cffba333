"""Value grids: the numbers a quantized value can take, and how a scaled value is rounded.

A grid is the numerics of one element type, independent of how scales are chosen:
``bounds`` is the clamp range, ``round_`` rounds values already clamped to it, and
``storage_dtype`` holds the rounded values (and zero points) exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cache

import torch
from torch import Tensor

__all__ = [
    "FP4_E2M1",
    "FP6_E2M3",
    "FP8_E4M3",
    "INT",
    "FP4E2M1Grid",
    "FP6E2M3Grid",
    "FP8E4M3Grid",
    "IntGrid",
    "ValueGrid",
    "round_to_fp8_e4m3",
]


def round_to_fp8_e4m3(values: Tensor) -> Tensor:
    """Rounds to the nearest ``float8_e4m3fn`` value (ties to even), in ``values``' dtype.

    Same values as ``values.to(torch.float8_e4m3fn).to(values.dtype)``. On the CPU the cast to
    fp8 is vectorized and the cast back is not, so the way back reads each code's value from a
    table of the 256 codes instead (a lookup: exact, about 4x faster). Tensors that require a
    gradient take the two casts, which autograd differentiates.

    Args:
        values: values within ``[-448, 448]`` (larger ones become NaN, as in the cast).

    Returns:
        A new tensor of ``values``' shape and dtype.
    """
    encoded = values.to(torch.float8_e4m3fn)
    if values.requires_grad:
        return encoded.to(values.dtype)
    codes = encoded.view(torch.uint8).reshape(-1).to(torch.int32)
    return _fp8_e4m3_table(values.dtype, values.device).index_select(0, codes).view(values.shape)


@cache
def _fp8_e4m3_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The value of each ``float8_e4m3fn`` code, in ``dtype`` (every one is exact in bfloat16,
    float16 and float32)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).to(device=device, dtype=dtype)


class ValueGrid(ABC):
    """The values of one element type.

    Attributes:
        name: the element type, e.g. ``"int"`` or ``"fp4_e2m1"``.
        storage_dtype: the dtype that holds every value of the grid exactly.
    """

    name: str
    storage_dtype: torch.dtype

    @abstractmethod
    def bounds(self, num_bits: int) -> tuple[float, float]:
        """Returns ``(qmin, qmax)``, the range values are clamped to.

        Args:
            num_bits: the width of a value.

        Returns:
            The smallest and largest value of the grid.
        """

    @abstractmethod
    def round_(self, clamped: Tensor) -> Tensor:
        """Rounds values already clamped to :meth:`bounds` to the grid.

        Args:
            clamped: a temporary tensor; it may be changed in place.

        Returns:
            The rounded values, in ``clamped``'s dtype.
        """


class IntGrid(ValueGrid):
    """Signed integers ``[-2**(b-1), 2**(b-1) - 1]``, rounded half to even."""

    name = "int"
    storage_dtype = torch.int8

    def bounds(self, num_bits: int) -> tuple[float, float]:
        return float(-(2 ** (num_bits - 1))), float(2 ** (num_bits - 1) - 1)

    def round_(self, clamped: Tensor) -> Tensor:
        return clamped.round_()


class FP8E4M3Grid(ValueGrid):
    """fp8 e4m3 (``float8_e4m3fn``): values in ``[-448, 448]``, rounded as the cast rounds."""

    name = "fp8_e4m3"
    storage_dtype = torch.float8_e4m3fn

    def bounds(self, num_bits: int) -> tuple[float, float]:
        limit = float(torch.finfo(torch.float8_e4m3fn).max)
        return -limit, limit

    def round_(self, clamped: Tensor) -> Tensor:
        return round_to_fp8_e4m3(clamped)


class FP4E2M1Grid(ValueGrid):
    """fp4 e2m1: ``0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6``, rounded to nearest, ties to even.

    Between consecutive grid values the step is ``0.5`` below 2, ``1`` in ``[2, 4)`` and
    ``2`` from 4 on, so ``round(x / step) * step`` (``torch.round`` rounds half to even, and
    divisions by powers of two are exact) gives the nearest value, a tie going to the one
    with an even mantissa, as compressed-tensors' ``cast_to_fp4`` does. Small tensors (a
    GPTQ column) instead look the value up between the midpoints of the grid (fewer
    operations, each costing more per element): the same values. Every value is exact in
    ``float8_e4m3fn``, which stores them.
    """

    name = "fp4_e2m1"
    storage_dtype = torch.float8_e4m3fn
    lookup_below = 4096
    """Tensors with fewer elements are rounded by lookup."""

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def bounds(self, num_bits: int) -> tuple[float, float]:
        return -6.0, 6.0

    def round_(self, clamped: Tensor) -> Tensor:
        if clamped.numel() < self.lookup_below:
            return self._look_up(clamped)
        magnitude = clamped.abs()
        # the step: 0.5 below 2, 1 in [2, 4), 2 from 4 on
        step = (magnitude >= 2).to(clamped.dtype).add_(magnitude >= 4, alpha=2)
        step = step.add_(1).mul_(0.5)
        return clamped.div_(step).round_().mul_(step)

    def _look_up(self, clamped: Tensor) -> Tensor:
        """The nearest value of each magnitude, searched between the grid's midpoints (one
        whose tie rounds up moved down to the next smaller number of the dtype, so that the
        tie falls above it), the sign copied back; NaN stays NaN."""
        values, boundaries = self._table(clamped.dtype, clamped.device)
        codes = torch.bucketize(clamped.abs(), boundaries)
        return torch.take(values, codes).copysign_(clamped)

    def _table(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The grid's non-negative values then NaN, and the boundaries between them (the
        last, infinity, puts NaN, which compares false with every boundary, after it)."""
        key = (dtype, device)
        if key not in self._tables:
            grid = torch.tensor(_E2M1_VALUES, dtype=dtype, device=device)
            midpoints = (grid[:-1] + grid[1:]) / 2  # exact in every floating dtype
            # a tie goes to the even code: up where the upper value's code is even
            up = torch.arange(1, len(_E2M1_VALUES), device=device) % 2 == 0
            below = torch.nextafter(midpoints, torch.zeros_like(midpoints))
            infinity = torch.full((1,), torch.inf, dtype=dtype, device=device)
            boundaries = torch.cat([torch.where(up, below, midpoints), infinity])
            values = torch.cat([grid, torch.full((1,), torch.nan, dtype=dtype, device=device)])
            self._tables[key] = (values, boundaries)
        return self._tables[key]


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""fp4 e2m1's non-negative values; the index is the code (an even code, an even mantissa)."""


class FP6E2M3Grid(ValueGrid):
    """fp6 e2m3: multiples of 0.125 below 2, of 0.25 in ``[2, 4)`` and of 0.5 in ``[4, 7.5]``,
    rounded to nearest, ties to even (as compressed-tensors' ``cast_to_fp6``).

    The step is ``2 ** (exponent - 4)`` for ``|x| = m * 2**exponent`` with m in [0.5, 1),
    at least 0.125 (the subnormals) and at most 0.5. Every value has at most four
    significant bits, so ``float8_e4m3fn`` stores it exactly.
    """

    name = "fp6_e2m3"
    storage_dtype = torch.float8_e4m3fn

    def bounds(self, num_bits: int) -> tuple[float, float]:
        return -7.5, 7.5

    def round_(self, clamped: Tensor) -> Tensor:
        _, exponent = torch.frexp(clamped)
        step = torch.ldexp(torch.ones_like(clamped), (exponent - 4).clamp_(-3, -1))
        return clamped.div_(step).round_().mul_(step)


INT = IntGrid()
FP8_E4M3 = FP8E4M3Grid()
FP4_E2M1 = FP4E2M1Grid()
FP6_E2M3 = FP6E2M3Grid()
