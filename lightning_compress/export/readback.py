"""Checks that a packed layer reads back as the weight in memory, before anything is written.

Two checks, the second only where the first cannot decide:

* **Exact, on the integer codes** (symmetric int weights packed by
  :mod:`~lightning_compress.export.packing`): ``weight_packed`` unpacked by compressed-tensors'
  own ``unpack_from_int32`` gives the codes back, and the codes dequantized by this project's
  :func:`~lightning_compress.modifiers.quantization.ops.dequantize` equal the weight exactly
  (compared bit for bit, zeros of either sign alike). A few elementwise passes, no float32
  copy of the layer.
* **Through compressed-tensors' decompressor**, within :data:`ROUNDING_ULPS`: every other
  format, a weight the exact check does not reproduce (e.g. int8 codes in bfloat16, where
  re-quantizing a dequantized weight can move a code by one at the top of the range), and
  the first layer of each scheme, weight shape and dtype of a save, so the decompressor that
  transformers and vLLM run is tried on every kind of layer written.

NaN and infinite weights never read back, so a layer holding one is refused.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import Tensor

from lightning_compress.export.errors import ExportError
from lightning_compress.export.layout import scheme_key
from lightning_compress.export.packing import PackedLayer
from lightning_compress.modifiers.quantization.ops import dequantize

__all__ = ["ROUNDING_ULPS", "ReadBackCheck", "decompress_layer", "reads_back"]

ROUNDING_ULPS = 2
"""How far (in units of the weight dtype's epsilon, relative) a stored weight may read back."""

LayerKind = tuple[str, tuple[int, ...], torch.dtype]


class ReadBackCheck:
    """Checks the layers of one save, remembering which kinds of layer were decompressed."""

    def __init__(self) -> None:
        self._decompressed: set[LayerKind] = set()

    def __call__(
        self,
        name: str,
        tensors: dict[str, Tensor],
        packed: PackedLayer,
        scheme: CTQuantizationScheme,
    ) -> bool:
        """Checks that ``packed`` reads back as ``tensors["weight"]``.

        Args:
            name: the layer's name, for error messages.
            tensors: its tensors in memory by local name (``weight``, ``weight_scale``, ...).
            packed: what it is stored as.
            scheme: its compressed-tensors scheme, with ``format`` set.

        Returns:
            True when the weight equals its packed codes times its scales exactly; then its
            zero weights are its zero codes.

        Raises:
            ExportError: naming the layer when its packed words do not unpack to its codes,
                or its stored weight would read back different from its weight in memory
                (beyond :data:`ROUNDING_ULPS`): the weight is not on the grid of its qparams
                (it changed after quantization) or not finite.
        """
        weight = tensors["weight"]
        kind = (scheme_key(scheme), tuple(weight.shape), weight.dtype)
        fitting = _scales_fit(tensors, scheme)
        exact = fitting and packed.codes is not None and _codes_read_back(name, tensors, packed)
        if exact and kind in self._decompressed:
            return True
        restored = decompress_layer(packed.tensors, scheme)["weight"]
        # Our dequantization and compressed-tensors' round differently, by an ulp at most.
        close = reads_back(restored, weight, ROUNDING_ULPS * torch.finfo(weight.dtype).eps)
        if not (close and (fitting or bool(torch.isfinite(weight).all()))):
            error = float((restored.float() - weight.float()).abs().max())
            raise ExportError(
                f"layer '{name}' would be stored with a different weight than it has (max "
                f"difference {error:.3g}): its weight is not finite, or not on the grid of its "
                "weight_scale/weight_zero_point, so it changed after quantization (e.g. trained "
                "without quantization-aware training); quantize it again before saving"
            )
        self._decompressed.add(kind)
        return exact


def _scales_fit(tensors: dict[str, Tensor], scheme: CTQuantizationScheme) -> bool:
    """Whether the layer's int codes dequantize to finite values, zero for zero codes only.

    Then a weight equal to what its codes dequantize to is finite and its zeros are its zero
    codes, with no pass over it: ``|code - zero_point| < 2**num_bits``, every scale is finite
    and at least the smallest normal number of the weight's dtype, and the scales are few.
    """
    weights = scheme.weights
    scale = tensors.get("weight_scale")
    if weights is None or weights.type != "int" or scale is None or not scale.numel():
        return False
    magnitudes = scale.detach().abs()
    limits = torch.finfo(tensors["weight"].dtype)
    # NaN scales fail both comparisons
    smallest, largest = float(magnitudes.amin()), float(magnitudes.amax())
    return smallest >= limits.tiny and largest * 2**weights.num_bits <= limits.max


def _codes_read_back(name: str, tensors: dict[str, Tensor], packed: PackedLayer) -> bool:
    """Whether the packed codes (of zero points 0) dequantize exactly to the weight.

    Raises:
        ExportError: when ``weight_packed`` does not unpack to the codes it was packed from.
    """
    codes = packed.codes
    stored = packed.tensors.get("weight_packed")
    unpacked = (
        packed.tensors["weight"]
        if stored is None
        else unpack_from_int32(stored, packed.args.num_bits, codes.shape)
    )
    if unpacked.shape != codes.shape or not _same_bits(unpacked, codes):
        wrong = int((unpacked != codes).sum()) if unpacked.shape == codes.shape else codes.numel()
        raise ExportError(
            f"layer '{name}': the stored weight reads back as other codes than it was made from "
            f"({wrong} of {codes.numel()} differ); the packing is broken, nothing was written"
        )
    weight = tensors["weight"]
    restored = dequantize(codes, tensors["weight_scale"], None, packed.args)
    # Code 0 dequantizes to +0.0 where the weight may hold -0.0: adding 0 makes it +0.0 too.
    return restored.dtype == weight.dtype and _same_bits(restored, weight + 0.0)


def _same_bits(first: Tensor, second: Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bits (NaN equals itself).

    Compared 8 bytes at a time where the sizes allow: ``torch.equal`` compares 16-bit and
    8-bit elements one by one, many times slower.
    """
    if not (first.is_contiguous() and second.is_contiguous()):
        return torch.equal(first, second)
    first, second = first.reshape(-1).view(torch.uint8), second.reshape(-1).view(torch.uint8)
    if first.numel() % 8 == 0:
        first, second = first.view(torch.int64), second.view(torch.int64)
    return torch.equal(first, second)


def reads_back(restored: Tensor, original: Tensor, rtol: float) -> bool:
    """Whether every element of ``restored`` lies within ``rtol`` (relative) of ``original``.

    As ``torch.allclose(restored, original, rtol=rtol, atol=0)`` computed in float32 (NaNs
    never read back, nor infinities of ``original`` that ``restored`` does not hold exactly),
    in fewer passes: a weight that reads back exactly (the usual case) is
    recognized in one, without conversions.

    Args:
        restored: the weight as read back.
        original: the weight in memory, of the same shape.
        rtol: the largest difference relative to ``|original|``.

    Returns:
        True when every ``|restored - original| <= rtol * |original|``.
    """
    if restored.dtype == original.dtype and torch.equal(restored, original):
        return True
    original = original.float()
    difference = (restored.float() - original).abs_()
    bound = original.abs().mul_(rtol).nan_to_num_(posinf=-1.0)  # inf: no bound holds
    return bool((difference <= bound).all())


def decompress_layer(tensors: dict[str, Tensor], scheme: CTQuantizationScheme) -> dict[str, Tensor]:
    """Reads one layer back with compressed-tensors' own decompressor.

    Args:
        tensors: the layer's stored tensors by local name.
        scheme: its compressed-tensors scheme, with ``format`` set.

    Returns:
        The tensors with ``weight`` dequantized (qparams kept as stored).
    """
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.decompress(dict(tensors), scheme)
