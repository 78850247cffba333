"""Checks that a packed layer reads back as the weight in memory, before anything is written.

Two checks, the second only where the first cannot decide:

* **Exact, on the integer codes** (symmetric int weights packed by
  :mod:`~lightning_compress.export.packing`): ``weight_packed`` unpacked by compressed-tensors'
  own ``unpack_from_int32`` gives the codes back, and the codes dequantized by this project's
  :func:`~lightning_compress.modifiers.quantization.ops.dequantize` equal the weight bit for
  bit. Integer and elementwise passes only, no float conversion of the whole layer.
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
    ) -> None:
        """Checks that ``packed`` reads back as ``tensors["weight"]``.

        Args:
            name: the layer's name, for error messages.
            tensors: its tensors in memory by local name (``weight``, ``weight_scale``, ...).
            packed: what it is stored as.
            scheme: its compressed-tensors scheme, with ``format`` set.

        Raises:
            ExportError: naming the layer when its packed words do not unpack to its codes,
                or its stored weight would read back different from its weight in memory
                (beyond :data:`ROUNDING_ULPS`): the weight is not on the grid of its qparams
                (it changed after quantization) or not finite.
        """
        weight = tensors["weight"]
        kind = (scheme_key(scheme), tuple(weight.shape), weight.dtype)
        finite = _reads_back_finite(tensors, scheme)
        exact = finite and packed.codes is not None and _codes_read_back(name, tensors, packed)
        if exact and kind in self._decompressed:
            return
        restored = decompress_layer(packed.tensors, scheme)["weight"]
        # Our dequantization and compressed-tensors' round differently, by an ulp at most.
        close = reads_back(restored, weight, ROUNDING_ULPS * torch.finfo(weight.dtype).eps)
        if not (close and (finite or bool(torch.isfinite(weight).all()))):
            error = float((restored.float() - weight.float()).abs().max())
            raise ExportError(
                f"layer '{name}' would be stored with a different weight than it has (max "
                f"difference {error:.3g}): its weight is not finite, or not on the grid of its "
                "weight_scale/weight_zero_point, so it changed after quantization (e.g. trained "
                "without quantization-aware training); quantize it again before saving"
            )
        self._decompressed.add(kind)


def _reads_back_finite(tensors: dict[str, Tensor], scheme: CTQuantizationScheme) -> bool:
    """Whether every value the layer's int codes and scales dequantize to is finite.

    Then a weight equal to what it reads back as is finite too, with no pass over it:
    ``|code - zero_point| < 2**num_bits`` and the scales are few.
    """
    weights = scheme.weights
    scale = tensors.get("weight_scale")
    if weights is None or weights.type != "int" or scale is None or not scale.numel():
        return False
    largest = float(scale.detach().abs().amax())  # NaN when a scale is NaN
    return largest * 2**weights.num_bits <= torch.finfo(tensors["weight"].dtype).max


def _codes_read_back(name: str, tensors: dict[str, Tensor], packed: PackedLayer) -> bool:
    """Whether the packed codes dequantize exactly to the weight.

    Raises:
        ExportError: when ``weight_packed`` does not unpack to the codes it was packed from.
    """
    codes = packed.codes
    stored = packed.tensors
    unpacked = unpack_from_int32(stored["weight_packed"], packed.args.num_bits, codes.shape)
    if not torch.equal(unpacked, codes):
        wrong = int((unpacked != codes).sum()) if unpacked.shape == codes.shape else codes.numel()
        raise ExportError(
            f"layer '{name}': weight_packed unpacks to other codes than it was packed from "
            f"({wrong} of {codes.numel()} differ); the packing is broken, nothing was written"
        )
    weight = tensors["weight"]
    scale = tensors["weight_scale"]
    zero_point = tensors.get("weight_zero_point")
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int8)
    restored = dequantize(codes, scale, zero_point, packed.args)
    return restored.dtype == weight.dtype and torch.equal(restored, weight)


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
