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


def round_to_fp8_e4m3(values: Tensor, in_place: bool = False) -> Tensor:
    """Rounds to the nearest ``float8_e4m3fn`` value (ties to even), in ``values``' dtype.

    Same values as ``values.to(torch.float8_e4m3fn).to(values.dtype)``. On the CPU the cast to
    fp8 is vectorized and the cast back is not, so the way back reads each code's value from a
    table of the 256 codes instead (a lookup: exact, about 4x faster). Tensors that require a
    gradient take the two casts, which autograd differentiates.

    Args:
        values: values within ``[-448, 448]`` (larger ones become NaN, as in the cast).
        in_place: write the result into ``values`` when it is contiguous and requires no
            gradient (a fresh output of that size is often fresh pages from the system: the
            same lookup about 2x slower).

    Returns:
        The rounded values, of ``values``' shape and dtype: ``values`` itself when written in
        place, else a new tensor.
    """
    encoded = values.to(torch.float8_e4m3fn)
    if values.requires_grad:
        return encoded.to(values.dtype)
    codes = encoded.view(torch.uint8).reshape(-1).to(torch.int32)
    table = _fp8_e4m3_table(values.dtype, values.device)
    if in_place and values.is_contiguous():
        torch.index_select(table, 0, codes, out=values.view(-1))
        return values
    return table.index_select(0, codes).view(values.shape)


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
        return round_to_fp8_e4m3(clamped, in_place=True)


class FP4E2M1Grid(ValueGrid):
    """fp4 e2m1: ``0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6``, rounded to nearest, ties to even.

    Between consecutive grid values the step is ``0.5`` below 2, ``1`` in ``[2, 4)`` and
    ``2`` from 4 on, so ``round(x / step) * step`` (``torch.round`` rounds half to even, and
    divisions by powers of two are exact) gives the nearest value, a tie going to the one
    with an even mantissa, as compressed-tensors' ``cast_to_fp4`` does. The step is half of
    ``2**e``, the power of two at or below ``|x|`` with ``e`` kept within ``[0, 2]``: it is
    read from ``x``'s exponent bits (three integer operations, the same for a GPTQ column as
    for a layer's input). Every value is exact in ``float8_e4m3fn``, which stores them.
    """

    name = "fp4_e2m1"
    storage_dtype = torch.float8_e4m3fn

    def bounds(self, num_bits: int) -> tuple[float, float]:
        return -6.0, 6.0

    def round_(self, clamped: Tensor) -> Tensor:
        step = _fp4_step(clamped)
        return clamped.div_(step).round_().mul_(step)


_FLOAT_LAYOUTS = {
    torch.float64: (torch.int64, 52, 1023),
    torch.float32: (torch.int32, 23, 127),
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float16: (torch.int16, 10, 15),
}
"""Floating dtype -> (the integer dtype of its width, mantissa bits, exponent bias)."""


def _fp4_step(x: Tensor) -> Tensor:
    """``2**(e - 1)`` for ``2**e`` the power of two at or below each ``|x|``, with ``e`` clamped
    to ``[0, 2]`` (0 and subnormals take 0, infinity and NaN 2), in ``x``'s dtype: its bits
    masked to the exponent, clamped, and the exponent lowered by one.

    Raises:
        ValueError: when ``x`` is not float16, bfloat16, float32 or float64.
    """
    if x.dtype not in _FLOAT_LAYOUTS:
        raise ValueError(
            f"rounding to fp4 needs a float16, bfloat16, float32 or float64 tensor, got {x.dtype}"
        )
    integer, mantissa_bits, bias = _FLOAT_LAYOUTS[x.dtype]
    exponent_bits = x.element_size() * 8 - 1 - mantissa_bits
    exponents = x.detach().view(integer).bitwise_and(((1 << exponent_bits) - 1) << mantissa_bits)
    exponents.clamp_(bias << mantissa_bits, (bias + 2) << mantissa_bits)
    return exponents.sub_(1 << mantissa_bits).view(x.dtype)


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
