"""Quantization formats: value grids, scale encodings and the table that joins them."""

from lightning_compress.modifiers.quantization.formats.registry import (
    FORMATS,
    QuantFormat,
    format_of,
)

__all__ = ["FORMATS", "QuantFormat", "format_of"]
