"""The table of quantization formats: one row per format.

A format is the element grid values are rounded to, the encoding of its scales, the
compressed-tensors compressor that stores it and whether vLLM serves it. A scheme's
``QuantizationArgs`` pick their format by ``(type, num_bits, scale_dtype)``. Adding a
format is a module with its grid or scale encoding (``grids.py``, ``scales.py``) and a
row here.

vLLM support is read from vLLM's compressed-tensors scheme code
(``vllm/model_executor/layers/quantization/compressed_tensors/``): int weights with 16-bit
activations are served by ``CompressedTensorsWNA16`` (4 and 8 bits; 2 to 8 bits in recent
versions, whose ``WNA16_SUPPORTED_TYPES_MAP`` lists them), int8 weights and activations by
``CompressedTensorsW8A8Int8``, fp8 by ``CompressedTensorsW8A8Fp8`` / ``W8A16Fp8``, NVFP4 weights
by ``CompressedTensorsW4A16Fp4`` (and with NVFP4 activations by ``W4A4Fp4``), MXFP4 weights by
``CompressedTensorsW4A16Mxfp4`` (with MXFP4 activations by ``W4A4Mxfp4``), MXFP8 with MXFP8
activations by ``CompressedTensorsW8A8Mxfp8``.

Where a scheme is touched: ``args.py`` validates it against this table and names the presets;
``ops.py`` takes the grid's bounds, rounding and storage dtype and the scale encoding from its
row; ``observers.py`` and ``calibration.py`` pass the global scale of ``tensor_group``;
``export/schemes.py`` maps ``scale_dtype`` to compressed-tensors, whose own compressors
(picked by ``infer_module_format``) pack each format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_compress.modifiers.quantization.formats.grids import (
    FP4_E2M1,
    FP6_E2M3,
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
        reads_back_in: the one dtype compressed-tensors' decompressor returns its weights in
            (fp4 values and E8M0 scales unpack to bfloat16), or None for the checkpoint's.
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
    reads_back_in: torch.dtype | None = None


_ANY = ("tensor", "channel", "group", "token")

FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(
        name="int",
        type="int",
        num_bits=(1, 2, 3, 4, 5, 6, 7, 8),
        grid=INT,
        scale=LinearScale(),
        scale_dtype=None,
        strategies=_ANY,
        group_size=None,
        compressor=None,
        vllm="weight-only 4/8-bit (2-8 in recent vLLM); int8 W8A8; not int4 activations",
    ),
    QuantFormat(
        name="fp8",
        type="float",
        num_bits=(8,),
        grid=FP8_E4M3,
        scale=LinearScale(),
        scale_dtype=None,
        strategies=(*_ANY, "block", "attn_head"),
        group_size=None,
        compressor="float-quantized",
        vllm="W8A8 (Ada/Hopper and newer), weight-only elsewhere",
    ),
    QuantFormat(
        name="nvfp4",
        type="float",
        num_bits=(4,),
        grid=FP4_E2M1,
        scale=FP8Scale(),
        scale_dtype="float8_e4m3fn",
        strategies=("tensor_group",),
        group_size=16,
        compressor="nvfp4-pack-quantized",
        vllm="W4A16 (CompressedTensorsW4A16Fp4); W4A4 with NVFP4 activations (W4A4Fp4)",
        reads_back_in=torch.bfloat16,
    ),
    QuantFormat(
        name="mxfp4",
        type="float",
        num_bits=(4,),
        grid=FP4_E2M1,
        scale=E8M0Scale(),
        scale_dtype="uint8",
        strategies=("group",),
        group_size=32,
        compressor="mxfp4-pack-quantized",
        vllm="W4A16 (CompressedTensorsW4A16Mxfp4); W4A4 with MXFP4 activations (W4A4Mxfp4)",
        reads_back_in=torch.bfloat16,
    ),
    QuantFormat(
        name="mxfp6",
        type="float",
        num_bits=(6,),
        grid=FP6_E2M3,
        scale=E8M0Scale(element_mantissa=3),
        scale_dtype="uint8",
        strategies=("group",),
        group_size=32,
        compressor="mxfp6-pack-quantized",
        vllm="no MXFP6 scheme in vLLM's compressed-tensors schemes",
        reads_back_in=torch.bfloat16,
    ),
    QuantFormat(
        name="mxfp8",
        type="float",
        num_bits=(8,),
        grid=FP8_E4M3,
        scale=E8M0Scale(),
        scale_dtype="uint8",
        strategies=("group",),
        group_size=32,
        compressor="mxfp8-quantized",
        vllm="W8A16; W8A8 with MXFP8 activations (CompressedTensorsW8A8Mxfp8)",
        reads_back_in=torch.bfloat16,
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
