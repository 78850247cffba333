"""Quantization: arguments and presets, the shared quantize/dequantize math, observers, RTN."""

from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.modifier import QuantizationModifier

__all__ = [
    "PRESET_SCHEMES",
    "QuantizationArgs",
    "QuantizationModifier",
    "QuantizationScheme",
    "preset_scheme",
]
