"""One quantized layer in its compressed-tensors format, the common case without a detour.

compressed-tensors' ``pack-quantized`` compressor recomputes the integer codes with clamps
against tensor bounds, which takes as long as the packing itself, and its ``int-quantized``
compressor divides in the weight's dtype, which in bfloat16 moves a few 8-bit codes by one. For
symmetric int weights in both formats the codes come from this project's own
:func:`~lightning_compress.modifiers.quantization.ops.quantize` (the one the layers were
quantized with; in float32 where the weight's dtype is too coarse to recover them), stored as
int8 (``int-quantized``) or packed as compressed-tensors' ``pack_to_int32`` packs them (4-bit
codes by byte-wise bit operations); the codes are kept beside them, so that the caller can
check the stored codes integer by integer. Every other scheme and format goes through
compressed-tensors' compressor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import Tensor

from lightning_compress.export.schemes import from_ct_scheme
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.ops import quantize

__all__ = ["PackedLayer", "pack_layer"]

PACKED = CompressionFormat.pack_quantized.value
INT_QUANTIZED = CompressionFormat.int_quantized.value


@dataclass(frozen=True)
class PackedLayer:
    """One layer as compressed-tensors stores it.

    Attributes:
        tensors: the compressed tensors by local name (e.g. ``weight_packed``,
            ``weight_shape``, ``weight_scale``), as compressed-tensors' compressor returns them.
        codes: the integer codes packed into ``weight_packed`` when this module packed them
            (symmetric int weights), of the weight's shape; None when compressed-tensors'
            compressor did.
        args: the weight's quantization arguments the codes were computed with, or None.
    """

    tensors: dict[str, Tensor]
    codes: Tensor | None = None
    args: QuantizationArgs | None = None


def pack_layer(tensors: dict[str, Tensor], scheme: CTQuantizationScheme) -> PackedLayer:
    """The tensors compressed-tensors stores for one layer in ``scheme.format``.

    Args:
        tensors: the layer's tensors by local name (``weight``, ``weight_scale``, ...).
        scheme: its compressed-tensors scheme, with ``format`` set.

    Returns:
        The compressed tensors, with the codes they pack where this module packed them.
    """
    weights = scheme.weights
    own_codes = scheme.format in (PACKED, INT_QUANTIZED)
    if not own_codes or weights is None or weights.type != "int" or not weights.symmetric:
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        return PackedLayer(compressor.compress(dict(tensors), scheme))
    weight = tensors["weight"]
    args = from_ct_scheme(scheme).weights
    # symmetric: zero points of 0
    codes = quantize(*_code_inputs(weight, tensors["weight_scale"], weights.num_bits), None, args)
    packed = {
        key: value
        for key, value in tensors.items()
        if key not in ("weight", "weight_zero_point")
        and not (key.endswith("_zero_point") and _symmetric(scheme, key))
    }
    if scheme.format == INT_QUANTIZED:
        packed["weight"] = codes.to(torch.int8)
    else:
        packed["weight_packed"] = _pack(codes, weights.num_bits)
        packed["weight_shape"] = torch.tensor(weight.shape)
    return PackedLayer(packed, codes, args)


def _code_inputs(weight: Tensor, scale: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """The weight and scale to recover a layer's codes from, exactly.

    A weight ``code * scale`` rounded to its dtype, divided by the scale in that dtype, can
    round to the neighbouring code when the dtype's spacing at the largest codes reaches half a
    code (bfloat16 and 8-bit codes: 126.67 becomes 126.5, then 126); in float32 the quotient
    stays within a quarter of the code.

    Args:
        weight: the quantized layer's weight, on its grid.
        scale: its scales.
        num_bits: the width of its codes.

    Returns:
        ``weight`` and ``scale``, in float32 when their dtype is too coarse for the codes.
    """
    if torch.finfo(weight.dtype).eps * 2 ** (num_bits - 1) < 0.25:
        return weight, scale
    return weight.float(), scale.float()


def _pack(codes: Tensor, num_bits: int) -> Tensor:
    """``pack_to_int32(codes, num_bits)``; 4-bit rows of whole int32 words on a little-endian
    host take three operations on 16-bit pairs of codes instead of its general scatter.

    Args:
        codes: ``[rows, columns]`` int8 codes in ``[-2**(num_bits-1), 2**(num_bits-1) - 1]``.
        num_bits: their width.

    Returns:
        ``[rows, ceil(columns * num_bits / 32)]`` int32 words, code ``i`` of a row in bits
        ``num_bits * i`` (offset by ``2**(num_bits-1)``), as compressed-tensors unpacks them.
    """
    if num_bits != 4 or codes.dim() != 2 or codes.shape[1] % 8 or sys.byteorder != "little":
        return pack_to_int32(codes, num_bits)
    # Offset codes lie in [0, 15]: a pair (low byte a, high byte b) becomes a | b << 4 in its
    # low byte, which the conversion to uint8 keeps.
    pairs = (codes + 8).view(torch.int16)
    return (pairs | (pairs >> 4)).to(torch.uint8).view(torch.int32)


def _symmetric(scheme: CTQuantizationScheme, key: str) -> bool:
    """Whether the role a ``<role>_zero_point`` belongs to is symmetric (its zero point is
    not stored)."""
    role = {"input": scheme.input_activations, "output": scheme.output_activations}
    args = role.get(key.removesuffix("_zero_point"))
    return args is not None and args.symmetric
