"""Scale encodings: how a group's largest magnitude becomes the scale that is stored.

* :class:`LinearScale`: ``max|x| / half_range`` as it is (int and fp8 formats).
* :class:`FP8Scale`: the same times an optional per-tensor global scale, rounded to fp8
  e4m3 (NVFP4), as compressed-tensors computes it.
* :class:`E8M0Scale`: a power of two, the exponent stored biased by 127 in a byte (the MX
  formats), as compressed-tensors' ``generate_mx_scales`` computes it.

A zero scale is replaced by a small positive one (the ``eps`` each encoding names), so
that dividing by it is defined.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from lightning_compress.modifiers.quantization.formats.grids import round_to_fp8_e4m3

__all__ = ["E8M0Scale", "FP8Scale", "LinearScale", "ScaleEncoding", "global_scale_for"]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


class ScaleEncoding(ABC):
    """How a group's scale is computed from its largest magnitude.

    Attributes:
        name: the encoding, e.g. ``"fp8_e4m3"``; the ``scale_dtype`` of a scheme names it.
        uses_global_scale: whether the scales are stored times a per-tensor global scale.
    """

    name: str | None
    uses_global_scale: bool = False

    @abstractmethod
    def scale(self, max_abs: Tensor, half_range: float, global_scale: Tensor | None) -> Tensor:
        """Returns the scale of each group.

        Args:
            max_abs: the largest magnitude of each group (0 included in the range).
            half_range: half the width of the value grid, e.g. 127.5 for int8, 6 for fp4.
            global_scale: the per-tensor global scale, for encodings that use one.

        Returns:
            The scales, in ``max_abs``'s dtype.
        """


class LinearScale(ScaleEncoding):
    """``max|x| / half_range``; 0 becomes the ``eps`` of the scale's dtype."""

    name = None

    def scale(self, max_abs: Tensor, half_range: float, global_scale: Tensor | None) -> Tensor:
        return _nonzero(max_abs / half_range, torch.finfo(max_abs.dtype).eps)


class FP8Scale(ScaleEncoding):
    """``global_scale * max|x| / half_range`` rounded to fp8 e4m3 (clamped to ±448); 0 becomes
    0.125, as in compressed-tensors."""

    name = "float8_e4m3fn"
    uses_global_scale = True
    eps = 0.125

    def scale(self, max_abs: Tensor, half_range: float, global_scale: Tensor | None) -> Tensor:
        scale = max_abs / half_range
        if global_scale is not None:
            scale = global_scale * scale  # in float32, as compressed-tensors multiplies
        # every fp8 e4m3 value is exact in bfloat16, float16 and float32
        rounded = round_to_fp8_e4m3(scale.clamp(-FP8_MAX, FP8_MAX)).to(max_abs.dtype)
        return _nonzero(rounded, self.eps)


class E8M0Scale(ScaleEncoding):
    """A power of two: ``2 ** (e - offset)`` where ``2 ** e`` is ``max|x|`` rounded to a power
    of two, up when its mantissa is at least ``2 - 2 ** -element_mantissa`` (1.75 for fp4 and
    fp8, 1.9375 for fp6: just where the group's largest value would round past the grid)
    and down otherwise, and ``offset`` is ``floor(log2(grid max))`` (2 for fp4 and fp6). The
    biased exponent ``e - offset + 127`` is clamped to a byte, ``[0, 255]``. Subnormal
    ``max|x|`` is treated as its exact value.

    Args:
        element_mantissa: the mantissa bits compressed-tensors' ``generate_mx_scales`` rounds
            with: fp6's 3 for MXFP6, fp4's 1 for MXFP4 and MXFP8.
    """

    name = "uint8"

    def __init__(self, element_mantissa: int = 1) -> None:
        # frexp's mantissa lies in [0.5, 1): the threshold halved
        self.round_up_at = 1 - 2.0 ** -(element_mantissa + 2)

    def scale(self, max_abs: Tensor, half_range: float, global_scale: Tensor | None) -> Tensor:
        offset = math.floor(math.log2(half_range))
        mantissa, exponent = torch.frexp(max_abs.float())  # max_abs = mantissa * 2**exponent
        power = exponent - 1 + (mantissa >= self.round_up_at).to(exponent.dtype)
        biased = torch.where(max_abs > 0, power - offset + 127, 0).clamp_(0, 255)
        scale = torch.pow(2.0, (biased - 127).float()).to(max_abs.dtype)
        return _nonzero(scale, 1.0)


def global_scale_for(max_abs: Tensor, grid_max: float, name: str) -> Tensor:
    """The per-tensor global scale that maps the tensor's largest group scale onto fp8's
    largest value: ``448 * grid_max / max|x|``, computed in ``max_abs``'s dtype and returned
    in float32, as compressed-tensors' ``generate_gparam`` does.

    Args:
        max_abs: the largest magnitude of each group of the tensor.
        grid_max: the largest value of the element grid (6 for fp4).
        name: what the tensor is (e.g. ``"layer 'q_proj' weight"``), for the error.

    Returns:
        The global scale, of shape ``[1]``.

    Raises:
        ValueError: naming the tensor when it is all zero or holds a NaN or infinity: no
            finite global scale exists then.
    """
    finite = bool(torch.isfinite(max_abs).all())
    largest = max_abs.amax()
    if not finite or not largest > 0:
        what = "all zero" if finite else "not finite"
        raise ValueError(
            f"{name} is {what}: a per-tensor global scale (448 * {grid_max} / max|x|) needs "
            "finite values, not all zero; leave it out of the scheme (add it to `ignore`)"
        )
    return (FP8_MAX * grid_max / largest).float().reshape(1)


def _nonzero(scale: Tensor, eps: float) -> Tensor:
    return torch.where(scale == 0, eps, scale)
