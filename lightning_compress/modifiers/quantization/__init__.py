"""Quantization: arguments and presets, the shared quantize/dequantize math, observers,
one-shot and quantization-aware ``QuantizationModifier``, ``GPTQModifier``, and the quantized
forward."""

from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.gptq_modifier import GPTQModifier
from lightning_compress.modifiers.quantization.modifier import QuantizationModifier
from lightning_compress.modifiers.quantization.runtime import (
    attach_quantization,
    remove_quantization,
)

__all__ = [
    "PRESET_SCHEMES",
    "GPTQModifier",
    "QuantizationArgs",
    "QuantizationModifier",
    "QuantizationScheme",
    "attach_quantization",
    "preset_scheme",
    "remove_quantization",
]
