"""The table of quantization formats: one row per format.

A format is the element grid values are rounded to, the encoding of its scales, the
compressed-tensors compressor that stores it and whether vLLM serves it. A scheme's
``QuantizationArgs`` pick their format by ``(type, num_bits, scale_dtype)``. Adding a
format is a module with its grid or scale encoding (``grids.py``, ``scales.py``) and a
row here.

vLLM support is read from vLLM's compressed-tensors scheme code
(``vllm/model_executor/layers/quantization/compressed_tensors/``): ``W4A16`` and int
``W8A16`` are served by ``CompressedTensorsWNA16`` (packed int4/int8, group or channel),
int8 ``W8A8`` by ``CompressedTensorsW8A8Int8``, fp8 by ``CompressedTensorsW8A8Fp8`` /
``W8A16Fp8``, NVFP4 by ``CompressedTensorsW4A4Fp4`` / ``W4A16Fp4`` and MXFP4 weights by
``CompressedTensorsW4A16Mxfp4``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_compress.modifiers.quantization.formats.grids import (
    FP4_E2M1,
    FP8_E4M3,
    INT,
    ValueGrid,
)
from lightning_compress.modifiers.quantization.formats.scales import (
    E8M0Scale,
    FP8Scale,
    LinearScale,
    ScaleEncoding,
)

__all__ = ["FORMATS", "QuantFormat", "format_of"]


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format.

    Attributes:
        name: the format's name, e.g. ``"nvfp4"``.
        type: the ``QuantizationArgs.type`` it is chosen by: ``"int"`` or ``"float"``.
        num_bits: the widths it accepts.
        grid: the values a quantized element takes and how it is rounded.
        scale: how scales are computed (and whether a global scale multiplies them).
        scale_dtype: the ``QuantizationArgs.scale_dtype`` it is chosen by (None: scales in
            the weight's dtype).
        strategies: the strategies it can be used with (for weights and activations).
        group_size: the only group size it allows, or None for any.
        compressor: the compressed-tensors format that stores its weights (None: the int
            family, where compressed-tensors picks ``pack-quantized``, ``int-quantized`` or
            ``naive-quantized`` by layer).
        vllm: how vLLM serves it, in a few words.
    """

    name: str
    type: str
    num_bits: tuple[int, ...]
    grid: ValueGrid
    scale: ScaleEncoding
    scale_dtype: str | None
    strategies: tuple[str, ...]
    group_size: int | None
    compressor: str | None
    vllm: str


_ANY = ("tensor", "channel", "group", "token")

FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(
        "int",
        "int",
        (1, 2, 3, 4, 5, 6, 7, 8),
        INT,
        LinearScale(),
        None,
        _ANY,
        None,
        None,
        "W4A16/W8A16 (group, channel), W8A8 int8; not W2/W3",
    ),
    QuantFormat(
        "fp8",
        "float",
        (8,),
        FP8_E4M3,
        LinearScale(),
        None,
        _ANY,
        None,
        "float-quantized",
        "yes (W8A8 on Hopper+, weight-only elsewhere)",
    ),
    QuantFormat(
        "nvfp4",
        "float",
        (4,),
        FP4_E2M1,
        FP8Scale(),
        "float8_e4m3fn",
        ("tensor_group",),
        16,
        "nvfp4-pack-quantized",
        "yes (W4A4 on Blackwell, weight-only elsewhere)",
    ),
    QuantFormat(
        "mxfp4",
        "float",
        (4,),
        FP4_E2M1,
        E8M0Scale(),
        "uint8",
        ("group",),
        32,
        "mxfp4-pack-quantized",
        "weights only (W4A16)",
    ),
)
"""Every format, looked up by :func:`format_of`."""

_BY_KEY = {(f.type, bits, f.scale_dtype): f for f in FORMATS for bits in f.num_bits}


def format_of(type_: str, num_bits: int, scale_dtype: str | None = None) -> QuantFormat:
    """The format of values of ``type_`` and ``num_bits`` with scales in ``scale_dtype``.

    Args:
        type_: ``"int"`` or ``"float"``.
        num_bits: bits per value.
        scale_dtype: the dtype scales are stored in, or None.

    Returns:
        The format's row of :data:`FORMATS`.

    Raises:
        ValueError: when no format has that combination; the message lists those there are.
    """
    found = _BY_KEY.get((type_, num_bits, scale_dtype))
    if found is None:
        known = sorted({(t, b, s or "None") for t, b, s in _BY_KEY}, key=str)
        raise ValueError(
            f"no quantization format has type={type_!r}, num_bits={num_bits!r}, "
            f"scale_dtype={scale_dtype!r}; (type, num_bits, scale_dtype) must be one of {known}"
        )
    return found
